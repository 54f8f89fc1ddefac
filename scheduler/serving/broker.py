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

A worker's stderr is the pool's; its stdout is a pipe that tells the pool when the worker is ready, and
from then on a thread reads every line of it into the pool's log (a pipe that nobody reads fills up,
64 KiB on Linux, and blocks the worker's next print).
"""
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from ..logs import fields
from .process import wait_ready
from .security import KeyError_, is_loopback, serve_curve

READY_TIMEOUT_S = 120  # a worker imports torch and diffusers and loads its model before it serves
STOP_TIMEOUT_S = 60  # SIGTERM lets a worker finish its requests in flight; then it is killed
RESTART_DELAY_S = 1.0  # between a worker's death and its replacement: a crash loop must not spin
DRAIN_JOIN_S = 5  # after a worker exits, how long the pool waits for its stdout reader to see the end
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
        self._drains = [None] * workers  # per slot, the thread that reads its worker's stdout once it is ready
        self.restarts = 0
        self._stop = threading.Event()

    def _command(self, slot):
        cmd = [sys.executable, "-m", "latentwire.cli", "cloud", "--connect", self.broker.backend, *self.worker_args]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port + slot)]
        return cmd

    def _spawn(self, slot):
        # stderr (its log) is ours; stdout a pipe: wait_ready, then _drain
        proc = subprocess.Popen(self._command(slot), stdout=subprocess.PIPE, text=True, errors="replace")
        self.procs[slot], self._drains[slot] = proc, None
        return proc

    def _drain(self, slot):
        """Read worker ``slot``'s stdout to its end on a daemon thread, each line into the pool's log; the
        thread closes the pipe when the worker has closed its end."""
        proc = self.procs[slot]

        def read():
            with proc.stdout:
                for line in proc.stdout:
                    log.info("worker stdout", extra=fields(slot=slot, pid=proc.pid, line=line.rstrip("\n")))

        thread = threading.Thread(target=read, name=f"latentwire-worker-{slot}-stdout", daemon=True)
        thread.start()
        self._drains[slot] = thread

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
                if not wait_ready(self._spawn(slot), "serving", READY_TIMEOUT_S):
                    raise RuntimeError(f"worker {slot} did not start within {READY_TIMEOUT_S} s (its log is above)")
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
        for proc, drain in zip(self.procs, self._drains):
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if drain is None:
                proc.stdout.close()
            else:  # it closes the pipe itself; a grandchild holding the pipe open must not hold up the stop
                drain.join(timeout=DRAIN_JOIN_S)
        self.broker.stop()
        self._dir.cleanup()

    def pids(self):
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

