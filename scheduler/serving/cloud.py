"""The cloud daemon: the ZeroMQ front end of the cloud engine (scheduler/engine.py).

Two threads. The I/O thread (the caller of ``serve_forever``) owns the socket: it reads every message,
checks it field by field into a typed request (scheduler/wire.py) and refuses a malformed or over-limit
one with an error reply that names the field, answers `health` at once, passes `run` requests to the
engine and cancels to it, forwards what the engine emits, and beats: every ``heartbeat_s`` each request
queued or running gets a heartbeat, whatever the engine is doing, so an edge tells a cloud that is alive
but slow (a model step longer than its heartbeat timeout, a machine under load) from a dead one. The
engine thread steps the sessions; what it emits (previews, the handoff, errors) reaches the I/O thread
over an inproc socket, since a ZeroMQ socket belongs to one thread.

SIGTERM (or ``stop()``) refuses new requests with `unavailable` (the edge retries elsewhere), finishes
those in flight, then returns.

The server either binds a ROUTER (one daemon, edges connect to it) or connects a DEALER to a broker's
backend (scheduler/serving/broker.py: several workers behind one endpoint); both see [edge id, request id,
frames...] and reply the same way.
"""
import logging
import os
import signal
import threading
import time

import zmq

from latentwire.protocol import ProtocolError, wire_bytes

from .. import wire
from ..engine import CloudEngine, Refused
from ..fields import FieldError
from ..limits import DEFAULT_SERVING_LIMITS
from ..logs import fields
from ..metrics import Metrics
from .security import KeyError_, connect_curve, is_loopback, serve_curve

POLL_MS = 100  # the longest the I/O loop sleeps before it looks at its stop flag and its beats
HEARTBEAT_S = 1.0  # edges presume the cloud dead after several missed beats (EdgeClient.heartbeat_timeout_s)
MAX_READS = 1000  # messages taken per look at the socket, so a flood cannot starve the beats and replies
MAX_READ_S = 0.25  # ... and seconds spent reading them (a fraction of a heartbeat interval)
MAX_REQUEST_ID_BYTES = 64  # the edge's request id, echoed in every reply: a uuid is 16
STOP_LINGER_MS = 2000  # on a graceful stop, how long the last replies may take to leave
FRAME_HEADROOM = 1 << 20
LINGER_MS = 0  # unsent replies are dropped at close: an edge waiting on them times out by itself
STOP_JOIN_S = 10.0  # after a graceful stop the engine has finished already; after an error, its turn in flight
log = logging.getLogger("latentwire.cloud")


class CloudServer:
    """Serve ``model`` on ``bind`` (tcp://127.0.0.1:PORT or ipc://PATH), or as a worker of the broker
    whose backend is ``connect``."""

    def __init__(self, model, bind=None, *, connect=None, preview_every=0, max_batch=1, max_wait_s=0.0,
                 heartbeat_s=HEARTBEAT_S, limits=DEFAULT_SERVING_LIMITS, metrics=None, curve_secret=None,
                 allow=None, server_key=None, insecure=False, context=None, engine=None):
        """curve_secret, allow: the server's NAME.key_secret and a folder of admitted clients' NAME.key
        files (CURVE). A non-loopback ``bind`` needs them, or insecure=True. A worker (``connect``) uses
        curve_secret with server_key, the broker's NAME.key, to reach a CURVE backend. max_batch,
        max_wait_s, preview_every: the engine's. metrics: a scheduler.metrics.Metrics to count into (the
        daemon serves it on --metrics-port). engine: instead of a model, an engine that runs elsewhere (the
        Ray Serve gateway's RayEngine, scheduler/serving/rayserve), with its own metrics, batching and previews."""
        if (bind is None) == (connect is None):
            raise ValueError("give bind (serve edges directly) or connect (a broker's backend), not both")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        if (model is None) == (engine is None):
            raise ValueError("give a model (this process runs it) or an engine (one that runs it elsewhere), not both")
        if engine is not None:
            self.metrics, self.engine = engine.metrics, engine
        else:
            self.metrics = metrics or Metrics()
            self.engine = CloudEngine(model, preview_every=preview_every, max_batch=max_batch,
                                      max_wait_s=max_wait_s, limits=limits, metrics=self.metrics)
        self.model, self.limits, self.heartbeat_s = model, limits, heartbeat_s
        self._decode_limits = limits.protocol()
        self._ctx = context or zmq.Context.instance()
        self._auth = None
        if connect is not None:
            self._sock = self._ctx.socket(zmq.DEALER)
            if (curve_secret is None) != (server_key is None):
                raise KeyError_("a CURVE worker needs both its secret key and the broker's public key")
            if curve_secret is not None:
                connect_curve(self._sock, curve_secret, server_key)
            self._sock.connect(connect)
            self.endpoint = connect
        else:
            if (curve_secret is None) != (allow is None):
                raise KeyError_("CURVE needs both the server's secret key and the folder of allowed client keys")
            if not is_loopback(bind) and curve_secret is None and not insecure:
                raise KeyError_(f"refusing to serve {bind} in the clear: give curve_secret and allow "
                                "(latentwire cloud --curve-secret ... --allow ...), or insecure=True (--insecure)")
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._auth = serve_curve(self._sock, self._ctx, curve_secret, allow) if curve_secret else None
            self._sock.bind(bind)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock.linger = LINGER_MS
        # ZeroMQ's own backstop: a frame this far over the limit is never buffered whole (its connection is
        # dropped); a message over the limit but under this gets an error reply that names the limit
        self._sock.maxmsgsize = limits.max_message_bytes + FRAME_HEADROOM
        # what the engine thread emits comes to the I/O thread here (each end used by one thread only)
        outbox = f"inproc://latentwire-cloud-{id(self)}"
        self._outbox = self._ctx.socket(zmq.PULL)
        self._outbox.bind(outbox)
        self._outbox_push = self._ctx.socket(zmq.PUSH)
        self._outbox_push.connect(outbox)
        for sock in (self._outbox, self._outbox_push):
            sock.linger = 0
        self._tickets = {}  # (peer, request) -> Ticket, for beats and cancels
        self._stop = threading.Event()
        self._last_beat = time.monotonic()
        self.pid = os.getpid()

    @property
    def batch_sizes(self):
        return self.engine.batch_sizes

    def stop(self):
        self._stop.set()

    def health(self):
        return self.engine.health()

    def serve_forever(self, install_signals=True):
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        engine = threading.Thread(target=self.engine.run_forever, name="latentwire-engine", daemon=True)
        engine.start()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        try:
            while engine.is_alive():
                if self._stop.is_set() and not self.engine.stopping:
                    self.engine.stop()  # refuse new requests, finish those in flight
                wait = max(0.0, self._last_beat + self.heartbeat_s - time.monotonic())
                ready = dict(poller.poll(min(POLL_MS, int(wait * 1000) + 1)))
                if self._outbox in ready:
                    self._forward()
                if self._sock in ready:
                    until = time.monotonic() + min(MAX_READ_S, self.heartbeat_s / 2)
                    for _ in range(MAX_READS):
                        self._receive(self._sock.recv_multipart(copy=False))
                        if time.monotonic() > until or not self._sock.poll(0):
                            break
                self._beat()
            self._forward()  # what the engine sent last
            self._sock.linger = STOP_LINGER_MS  # and let it leave before the socket closes
        finally:
            self.engine.stop()
            engine.join(timeout=STOP_JOIN_S)
            if engine.is_alive():  # only after an error in this loop: the engine still owns its socket
                log.error("the engine did not stop in time; its sessions are abandoned")
            else:
                self._outbox_push.close()
            self._outbox.close()
            self._sock.close()
            if self._auth is not None:
                self._auth.stop()

    # -- messages in and out -------------------------------------------------------------------------

    def _beat(self):
        now = time.monotonic()
        if now - self._last_beat < self.heartbeat_s:
            return
        self._last_beat = now
        load = self.engine.load() if self._tickets else None
        for key, ticket in list(self._tickets.items()):
            if ticket.done:
                del self._tickets[key]
                continue
            self._send(*key, wire.Beat(ticket.step, ticket.started is not None, load))

    def _forward(self):
        while self._outbox.poll(0):
            frames = self._outbox.recv_multipart(copy=False)
            self._put(bytes(frames[0]), bytes(frames[1]), frames[3:], kind=bytes(frames[2]).decode())

    def _emitter(self, peer, request, codecs):
        """emit(event) for the engine: encoded on the engine's thread, sent on this one."""
        def emit(event):
            kind = event.kind if isinstance(event, wire.Relayed) else type(event).__name__.lower()
            if kind == "error":
                self.metrics.errors.labels(event.code).inc()
            self._outbox_push.send_multipart([peer, request, kind.encode()] + event.to_frames(codecs), copy=False)
        return emit

    def _send(self, peer, request, msg, codecs=None):
        if isinstance(msg, wire.Error):
            self.metrics.errors.labels(msg.code).inc()
        self._put(peer, request, msg.to_frames(codecs or wire.Codecs()), type(msg).__name__.lower())

    def _put(self, peer, request, frames, kind):
        self.metrics.bytes.labels("out").inc(wire_bytes(frames))
        try:  # never block: a worker whose broker is gone would wait forever on a full queue
            self._sock.send_multipart([peer, request] + list(frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("reply dropped: the way to the edge is full or gone",
                        extra=fields(peer=peer.hex(), request=request.hex(), kind=kind))

    def _receive(self, frames):
        try:
            self._handle(frames)
        except Exception:  # a bug met by some message must not stop the daemon: log it, serve on
            log.exception("a message could not be handled", extra=fields(peer=bytes(frames[0]).hex()))
            if len(frames) >= 2:
                self._send(bytes(frames[0]), bytes(frames[1]), wire.Error("refused", "the cloud could not handle "
                                                                          "this message (its log says why)"))

    def _handle(self, frames):
        if len(frames) < 3:  # not [edge id, request id, header...]: nothing to answer to
            log.warning("dropped a message of %d frames", len(frames), extra=fields(peer=bytes(frames[0]).hex()))
            return
        peer, request, body = bytes(frames[0]), bytes(frames[1]), frames[2:]
        if len(request) > MAX_REQUEST_ID_BYTES:  # it would be held and echoed in every beat: not answered
            log.warning("dropped a message with a %d-byte request id", len(request), extra=fields(peer=peer.hex()))
            return
        size = wire_bytes(body)
        self.metrics.bytes.labels("in").inc(size)
        if size > self.limits.max_message_bytes:
            return self._refuse(peer, request, wire.Error("limit", f"the message is {size} bytes; this cloud takes "
                                                                   f"at most {self.limits.max_message_bytes} "
                                                                   "(--max-message-bytes)"))
        try:
            msg = wire.parse_request(body, self._decode_limits, self.limits.max_steps_per_session)
        except FieldError as e:
            hint = " (--max-steps-per-session)" if e.code == "limit" else ""
            return self._refuse(peer, request, wire.Error(e.code, f"malformed message: {e}{hint}", e.field))
        except (ProtocolError, ValueError) as e:
            return self._refuse(peer, request, wire.Error("refused", f"malformed message: {e}"))
        if isinstance(msg, wire.Cancel):
            ticket = self._tickets.pop((peer, request), None)
            if ticket is not None:
                self.engine.cancel(ticket)
            return
        if isinstance(msg, wire.HealthRequest):
            return self._send(peer, request, self.engine.health())
        if self._stop.is_set():
            return self._refuse(peer, request, wire.Error("unavailable", "this cloud worker is stopping; try again"))
        if (peer, request) in self._tickets and not self._tickets[peer, request].done:
            return self._refuse(peer, request, wire.Error("refused", "a request with this id is in flight already; "
                                                                     "give each request an id of its own"))
        try:
            ticket = self.engine.submit(msg, self._emitter(peer, request, msg.codecs), _client(frames, peer))
        except Refused as e:
            return self._refuse(peer, request, e.error)
        self._tickets[peer, request] = ticket
        # received: the edge's silence clock starts now, and it learns the load it joined
        self._send(peer, request, wire.Beat(ticket.step, False, self.engine.load()))

    def _refuse(self, peer, request, error):
        log.warning("refused", extra=fields(peer=peer.hex(), request=request.hex(), code=error.code,
                                            field=error.field, reason=error.message))
        self.metrics.sessions.labels("refused").inc()
        self._send(peer, request, error)


def _client(frames, peer):
    """The per-client limit's key: the CURVE public key ZeroMQ authenticated, else the connection."""
    try:
        user = frames[-1].get("User-Id")
    except (zmq.ZMQError, AttributeError):
        user = None
    return user.encode() if user else peer
