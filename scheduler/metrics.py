"""Prometheus metrics of one cloud worker, in a registry of its own (several servers may share a process
in tests and embedding stacks, and prometheus-client's default registry would make them collide).

``serve(port)`` exposes them on http://127.0.0.1:PORT/metrics: loopback only, like the daemon itself;
a scraper on another machine goes through the operator's own proxy or tunnel.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# seconds: from a 1-step request on a GPU to a long CPU queue
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.sessions = Counter("latentwire_sessions", "run requests that ended, by outcome",
                                ["outcome"], registry=r)
        self.active = Gauge("latentwire_sessions_active", "run requests queued or running", registry=r)
        self.queued = Gauge("latentwire_sessions_queued", "run requests admitted and not yet stepping", registry=r)
        self.utilisation = Gauge("latentwire_utilisation", "share of the last 10 s the engine spent computing",
                                 registry=r)
        self.steps = Counter("latentwire_steps", "denoising steps run, by kind", ["kind"], registry=r)
        self.batch_rows = Histogram("latentwire_batch_rows", "sessions sharing one model forward",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("latentwire_queue_wait_seconds", "from a request's arrival to its first step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("latentwire_request_seconds", "from a request's arrival to its reply",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.bytes = Counter("latentwire_bytes", "message bytes, by direction", ["direction"], registry=r)
        self.errors = Counter("latentwire_errors", "error replies, by code", ["code"], registry=r)
        self._http = None

    def serve(self, port, addr="127.0.0.1"):
        """Expose /metrics on addr:port (port 0: any free port) -> the port."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self):
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
