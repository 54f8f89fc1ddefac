"""Several cloud workers behind one endpoint, balanced by ZeroMQ's own device.

    edges (DEALER) --> frontend ROUTER [ zmq.proxy_steerable ] backend DEALER --> workers (CloudServer(connect=))

The frontend ROUTER prefixes each request with its edge's id; the backend DEALER hands requests round
robin to the connected workers, which reply with that id in front, and the frontend routes each reply
back to its edge. The broker holds no state: a worker that dies drops out of the round robin when its
connection closes, and the requests it held are lost there. Their edges notice by the missing
heartbeats and send them again (EdgeClient's retries), and the broker passes them to a live worker;
with retries exhausted an edge with fallback finishes on its own model. No session is lost for good.

``Pool`` runs the broker and N worker processes on one machine (``latentwire cloud --workers N``) and
restarts a worker that dies. On several machines run ``latentwire broker`` on one and ``latentwire
cloud --connect BACKEND`` on each of the others.

Workers are started by the one launcher (process.Child): a worker's stderr is copied into the pool's, and
a worker that dies before it serves fails the start at once with its last stderr lines; its stdout is a
pipe that tells the pool when the worker is ready, and from then on a thread reads every line of it into
the pool's log (a pipe that nobody reads fills up, 64 KiB on Linux, and blocks the worker's next print).
"""
import logging
import signal
import tempfile
import threading
import time

import zmq

from ..logs import fields
from .process import Child, cli_command
from .security import KeyError_, is_loopback, serve_curve

READY_TIMEOUT_S = 120  # a worker imports torch and diffusers and loads its model before it serves
STOP_TIMEOUT_S = 60  # SIGTERM lets a worker finish its requests in flight; then it is killed
RESTART_DELAY_S = 1.0  # between a worker's death and its replacement: a crash loop must not spin
log = logging.getLogger("latentwire.broker")


class Broker:
    """Frontend ROUTER bound for edges, backend DEALER bound for workers, joined by zmq.proxy_steerable."""

    def __init__(self, frontend, backend, *, curve_secret=None, allow=None, insecure=False, context=None):
        """curve_secret, allow: CURVE on both sides (edges' and workers' public keys in ``allow``). A
        non-loopback endpoint without them needs insecure=True."""
        if (curve_secret is None) != (allow is None):
            raise KeyError_("CURVE needs both the broker's secret key and the folder of allowed client keys")
        for endpoint in (frontend, backend):
            if not is_loopback(endpoint) and curve_secret is None and not insecure:
                raise KeyError_(f"refusing to serve {endpoint} in the clear: give --curve-secret and --allow, "
                                "or --insecure")
        self._ctx = context or zmq.Context.instance()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._back = self._ctx.socket(zmq.DEALER)
        self._auth = None
        if curve_secret is not None:
            self._auth = serve_curve(self._front, self._ctx, curve_secret, allow)
            serve_curve(self._back, None, curve_secret, allow, authenticator=self._auth)
        for sock in (self._front, self._back):
            sock.linger = 0
        self._front.bind(frontend)
        self._back.bind(backend)
        self.frontend = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self._back.getsockopt_string(zmq.LAST_ENDPOINT)
        control = f"inproc://latentwire-broker-{id(self)}"
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(control)
        self._stopper = self._ctx.socket(zmq.PAIR)
        self._stopper.connect(control)
        self._thread = None

    def start(self):
        """Move messages on a thread of its own (the caller's thread stays free for signals)."""
        self._thread = threading.Thread(target=self._run, name="latentwire-broker", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        try:
            zmq.proxy_steerable(self._front, self._back, None, self._control)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in (self._front, self._back, self._control):
                sock.close()

    def stop(self):
        if self._thread is not None:
            self._stopper.send(b"TERMINATE")
            self._thread.join(timeout=10)
        self._stopper.close()
        if self._auth is not None:
            self._auth.stop()


class Pool:
    """A broker and ``workers`` processes of ``latentwire cloud --connect`` on this machine.

    worker_args: the rest of each worker's command line (--model, --max-batch, ...). metrics_port: worker
    i serves its metrics on metrics_port + i (0: none)."""

    def __init__(self, bind, workers, worker_args, *, metrics_port=0, curve_secret=None, allow=None,
                 insecure=False):
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self._dir = tempfile.TemporaryDirectory(prefix="latentwire-pool-")
        self.broker = Broker(bind, f"ipc://{self._dir.name}/workers.sock", curve_secret=curve_secret,
                             allow=allow, insecure=insecure)
        self.endpoint = self.broker.frontend
        self.worker_args, self.metrics_port = list(worker_args), metrics_port
        self.procs = [None] * workers
        self.restarts = 0
        self._stop = threading.Event()

    def _command(self, slot):
        cmd = cli_command("cloud", "--connect", self.broker.backend, *self.worker_args)
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port + slot)]
        return cmd

    def _spawn(self, slot):
        # stderr is copied into ours (the pool's log); stdout a pipe: wait_ready, then _drain
        child = Child(self._command(slot), name=f"worker {slot}")
        self.procs[slot] = child
        return child

    def _drain(self, slot):
        """Read worker ``slot``'s stdout to its end on a daemon thread, each line into the pool's log."""
        child = self.procs[slot]
        child.drain(lambda line: log.info("worker stdout", extra=fields(slot=slot, pid=child.pid,
                                                                        line=line.rstrip("\n"))))

    def stop(self):
        self._stop.set()

    def serve_forever(self, on_ready=None, install_signals=True):
        """Start the broker and the workers, call on_ready(), restart workers that die until stop() (or
        SIGTERM), then stop the workers (each finishes its requests in flight) and the broker."""
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.broker.start()
        try:
            for slot in range(len(self.procs)):
                self._spawn(slot).wait_ready("serving", READY_TIMEOUT_S)  # a worker that dies first: ChildFailed
                self._drain(slot)
            if on_ready is not None:
                on_ready()
            while not self._stop.wait(0.2):
                for slot, proc in enumerate(self.procs):
                    if proc.poll() is not None:
                        log.warning("worker died", extra=fields(slot=slot, pid=proc.pid, returncode=proc.returncode))
                        self._stop.wait(RESTART_DELAY_S)
                        if self._stop.is_set():
                            break
                        self._spawn(slot)
                        self._drain(slot)  # the round robin takes it when it connects: no wait for its ready line
                        self.restarts += 1
                        log.info("worker restarted", extra=fields(slot=slot, pid=self.procs[slot].pid))
        finally:
            self._shutdown()

    def _shutdown(self):
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            if proc is not None:
                proc.stop(timeout_s=max(0.1, deadline - time.monotonic()))
        self.broker.stop()
        self._dir.cleanup()

    def pids(self):
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

