"""The edge side: runs its segments of a plan locally and sends the cloud's segments to the cloud.

    session = EdgeClient("tcp://127.0.0.1:5555", model)
    latent, summary = session.generate(spec)
"""
import time
import uuid
from dataclasses import asdict

import zmq

from latentwire.kernels import FusedSampler, SolverState
from latentwire.protocol import wire_bytes

from . import wire
from .executor import Summary, initial_noise, run_segment
from .plan import Segment
from .security import connect_curve

DEFAULT_TIMEOUT_S = 120.0  # a whole cloud segment on a real model; tests pass their own
LINGER_MS = 0


class CloudUnavailable(RuntimeError):
    """The cloud did not answer within the deadline (not running, unreachable, or died mid-request)."""


class CloudError(RuntimeError):
    """The cloud refused a request; the text is the cloud's reason."""


class CloudRefused(CloudUnavailable):
    """The cloud's CURVE handshake rejected this edge (unknown key, wrong server key, or no CURVE)."""


class EdgeClient:
    """Runs generations against one cloud endpoint; one request at a time per client."""

    def __init__(self, connect, model, *, codecs=None, timeout_s=DEFAULT_TIMEOUT_S, on_preview=None, on_step=None,
                 link=None, error_budget=None, sleep=time.sleep, fallback=False, curve_secret=None, server_key=None,
                 context=None):
        """codecs: a wire.Codecs; or None with ``link`` and ``error_budget`` given: the latent codec is
        chosen for that link (least encode + transfer + decode time within the budget), measured once
        on a latent of the model's size. link: an emulated scheduler.link.Link, delaying every message
        sent and received by its transfer time (``sleep`` is how; tests pass a recorder)."""
        self.connect, self.model = connect, model
        if codecs is None and link is not None and error_budget is not None:
            from .link import choose_codec, measure_codecs, sample_latent

            self.codec_costs = measure_codecs(sample_latent(model))
            codecs = wire.Codecs(latent=choose_codec(self.codec_costs, link, error_budget))
        self.codecs = codecs or wire.Codecs()
        self.link, self._sleep = link, sleep
        # fallback: when the cloud does not answer, finish its steps here from the last latent held (its
        # last preview, else the latent sent to it) and mark the result degraded, rather than raise
        self.fallback = fallback
        self._last_preview = None
        self.timeout_s = timeout_s
        self.on_preview = on_preview  # on_preview(step, latent) for each preview the cloud streams
        self.on_step = on_step  # on_step(step, real) after each step run here
        self._ctx = context or zmq.Context.instance()
        self.bytes_up = self.bytes_down = 0
        if (curve_secret is None) != (server_key is None):
            raise ValueError("CURVE needs both this edge's secret key and the cloud's public key")
        self.curve = (curve_secret, server_key) if curve_secret else None

    def generate(self, spec):
        """Run ``spec`` (a SessionSpec) -> (latent, Summary). The edge's own segments run here."""
        plan = spec.plan
        scheduler = spec.make_scheduler()
        sampler = FusedSampler(scheduler)
        summary = Summary(plan=plan.name, steps=plan.num_steps, labels=plan.labels())
        x, state, conditioning = None, None, None
        j = 0
        sock = self._socket()
        try:
            while j < len(plan.segments):
                seg = plan.segments[j]
                if j and seg.side != plan.segments[j - 1].side:
                    summary.handoffs += 1
                    if spec.restart_solver:
                        state = None
                if seg.side == "cloud":
                    k = j
                    while k < len(plan.segments) and plan.segments[k].side == "cloud":
                        k += 1
                    try:
                        x, state, calls, forecasts = self._remote(sock, spec, j, k, x, state)
                    except CloudUnavailable:
                        if not self.fallback:
                            raise
                        if conditioning is None:
                            conditioning = self.model.encode_prompt(spec.prompt, spec.negative_prompt)
                        x, state = self._finish_here(spec, sampler, conditioning, j, k, x, summary)
                        self._close(sock)  # the request may still be queued there: never read its late reply
                        sock = self._socket()
                        j = k
                        continue
                    summary.cloud_model_calls += calls
                    summary.forecast_steps += forecasts
                    j = k
                    continue
                if x is None:
                    x = initial_noise(self.model, spec.seed, scheduler)
                if conditioning is None:
                    conditioning = self.model.encode_prompt(spec.prompt, spec.negative_prompt)
                callback = None if self.on_step is None else (lambda i, t, x_t, m, real: self.on_step(i, real))
                x, state, calls = run_segment(spec, seg, sampler, self.model, conditioning, x, state, callback)
                summary.edge_model_calls += calls
                summary.forecast_steps += (seg.stop - seg.start) - calls
                j += 1
        finally:
            self._close(sock)
        return x, summary

    def _close(self, sock):
        sock.disable_monitor()
        self._monitor.close()
        sock.close()

    def _socket(self):
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = LINGER_MS
        if self.curve is not None:
            connect_curve(sock, *self.curve)
        # handshake events tell a refused edge at once, rather than at its deadline
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.connect)
        return sock

    def _refused(self):
        """The reason the cloud rejected our handshake, if a monitor event says it did."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "it does not admit this edge's key (is NAME.key in the cloud's --allow folder?)"
            return ("the connection's security handshake failed (does one side use CURVE and the other not, "
                    "or is --server-key the cloud's public key?)")
        return None

    def _finish_here(self, spec, sampler, conditioning, a, b, x, summary):
        """Degraded mode: run the cloud's segments [a, b) with the edge's model, from the last preview the
        cloud streamed inside them (the latent at that step), else from the latent sent (x_T if none),
        with the solver restarted at first order. -> (x, state)."""
        plan = spec.plan
        start = plan.segments[a].start
        if self._last_preview is not None and plan.segments[a].start <= self._last_preview[0] < plan.segments[b - 1].stop:
            start, x = self._last_preview
        elif x is None:
            x = initial_noise(self.model, spec.seed, sampler.scheduler)
        summary.degraded = True
        state = None
        for seg in plan.segments[a:b]:
            if seg.stop <= start:
                continue
            local = Segment("edge", max(seg.start, start), seg.stop, renoise=seg.renoise and start <= seg.start)
            x, state, calls = run_segment(spec, local, sampler, self.model, conditioning, x, state)
            summary.edge_model_calls += calls
        return x, state

    def _remote(self, sock, spec, a, b, x, state):
        """Have the cloud run segments [a, b) -> (x, state, model calls, forecast steps)."""
        return self._await(sock, self._send(sock, spec, a, b, x, state))

    def _send(self, sock, spec, a, b, x, state):
        """Send a run request for segments [a, b) from latent x (None: the cloud draws x_T) -> its id."""
        self._last_preview = None
        request_id = uuid.uuid4().bytes
        msg = wire.Message("run", {"session": spec.to_msgpack(), "segments": [a, b],
                                   "codecs": self.codecs.to_meta(),
                                   # the cloud checks its model against these before it runs anything
                                   "latent_space": wire.plain(self.model.latent_space),
                                   "text_space": wire.plain(self.model.text_space)},
                           x, state.x0_prev if state is not None and not spec.restart_solver else None)
        frames = wire.encode(msg, self.codecs)
        self.bytes_up += wire_bytes(frames)
        if self.link is not None:
            self._sleep(self.link.transfer_s(wire_bytes(frames)))  # the request's way up
        sock.send_multipart([request_id] + frames, copy=False)
        return request_id

    def _await(self, sock, request_id):
        """The reply to request_id, previews passed to on_preview on the way."""
        deadline = time.monotonic() + self.timeout_s
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            reason = self._refused() if self._monitor in ready else None
            if reason:
                raise CloudRefused(f"the cloud at {self.connect} refused this edge: {reason}")
            if sock not in ready:
                if time.monotonic() < deadline:
                    continue
                raise CloudUnavailable(f"no answer from the cloud at {self.connect} within {self.timeout_s:g} s: "
                                       "is `latentwire cloud` running there, and reachable?")
            reply = sock.recv_multipart(copy=False)
            if bytes(reply[0]) != request_id:
                continue  # a late reply to an earlier, abandoned request
            self.bytes_down += wire_bytes(reply[1:])
            if self.link is not None:
                self._sleep(self.link.transfer_s(wire_bytes(reply[1:])))  # the reply's way down
            m = wire.decode(reply[1:])
            if m.kind == "preview":
                self._last_preview = (m.meta["step"], m.latent)
                if self.on_preview is not None:
                    self.on_preview(m.meta["step"], m.latent)
                continue
            if m.kind == "error":
                raise CloudError(m.meta.get("message", "the cloud refused the request"))
            state = SolverState(m.x0_prev) if m.x0_prev is not None else None
            return m.latent, state, m.meta["model_calls"], m.meta["forecast_steps"]


def summary_dict(summary, **extra):
    d = asdict(summary)
    d.pop("labels")
    d.update(extra)
    return d
