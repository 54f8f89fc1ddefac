"""The cloud daemon: serves `run` requests, each a whole cloud segment of one generation.

One request runs every step of its segments without a round trip (the edge sent the session with the
prompt, seed, scheduler and plan; the cloud encodes the prompt itself and, at the start of a
generation, draws x_T from the seed, so x_T never crosses the network), streams a small preview every
`preview_every` steps, and replies with the handoff.

Every request is admitted at once into a queue (or refused with an error reply saying why): the loop
reads its socket between steps, so a cancel, a health request or a new session never waits for a whole
generation. ``max_batch`` 1 runs the queue one request at a time, each whole; above 1, compatible
sessions' steps share model forwards (scheduler/batch.py), waiting up to ``max_wait_s`` for company
before their first step. While a request is queued or running its edge gets a heartbeat every
``heartbeat_s``, so a dead cloud is noticed in seconds, not at the edge's deadline. A request past its
deadline ends at the next step boundary with a `deadline` error; a cancelled one ends there silently.
SIGTERM (or `stop()`) refuses new requests with `unavailable` (the edge retries elsewhere), finishes
those in flight, then returns.

The server either binds a ROUTER (one daemon, edges connect to it) or connects a DEALER to a broker's
backend (scheduler/broker.py: several workers behind one endpoint); both see [edge id, request id,
frames...] and reply the same way.
"""
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from latentwire.kernels import FusedSampler, SolverState
from latentwire.protocol import ProtocolError, wire_bytes

from . import batch, wire
from .executor import initial_noise, run_segment
from .limits import DEFAULT_SERVING_LIMITS
from .logs import fields
from .metrics import Metrics
from .plan import PlanError
from .security import KeyError_, connect_curve, is_loopback, serve_curve
from .session import SessionSpec

CACHE_ENTRIES = 64  # prompts' text embeddings, and schedules' samplers, the cloud keeps
POLL_MS = 100  # how often the loop looks at its stop flag while idle
HEARTBEAT_S = 1.0  # edges presume the cloud dead after several missed beats (EdgeClient.heartbeat_timeout_s)
MAX_READS = 1000  # messages taken per look at the socket, so a flood cannot starve the steps in flight
BATCH_HISTORY = 1000  # a daemon runs for weeks: keep the latest only
FRAME_HEADROOM = 1 << 20
LINGER_MS = 0  # unsent replies are dropped at close: an edge waiting on them times out by itself
log = logging.getLogger("latentwire.cloud")


class _Ended(Exception):
    """A request stops at a step boundary: cancelled (reply None) or past its deadline."""

    def __init__(self, outcome, reply=None):
        super().__init__(outcome)
        self.outcome, self.reply = outcome, reply


@dataclass
class Ticket:
    """Who asked for a request, when, and until when (time.monotonic() seconds)."""

    peer: bytes
    request: bytes
    client: bytes  # what the per-client limit counts: the CURVE key, else the connection
    session: str
    admitted: float
    deadline: float
    started: float = None
    cancelled: bool = False


class CloudServer:
    """Serve ``model`` on ``bind`` (tcp://127.0.0.1:PORT or ipc://PATH), or as a worker of the broker
    whose backend is ``connect``."""

    def __init__(self, model, bind=None, *, connect=None, preview_every=0, max_batch=1, max_wait_s=0.0,
                 heartbeat_s=HEARTBEAT_S, limits=DEFAULT_SERVING_LIMITS, metrics=None, curve_secret=None,
                 allow=None, server_key=None, insecure=False, context=None):
        """curve_secret, allow: the server's NAME.key_secret and a folder of admitted clients' NAME.key
        files (CURVE). A non-loopback ``bind`` needs them, or insecure=True. A worker (``connect``) uses
        curve_secret with server_key, the broker's NAME.key, to reach a CURVE backend. max_batch > 1:
        sessions' steps share model forwards; 1: one request at a time, each whole. metrics: a
        scheduler.metrics.Metrics to count into (the daemon serves it on --metrics-port)."""
        if (bind is None) == (connect is None):
            raise ValueError("give bind (serve edges directly) or connect (a broker's backend), not both")
        if type(max_batch) is not int or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not max_wait_s >= 0 or not heartbeat_s > 0:
            raise ValueError(f"max_wait_s must be >= 0 and heartbeat_s > 0, got {max_wait_s!r}, {heartbeat_s!r}")
        self.model, self.preview_every, self.max_batch, self.max_wait_s = model, preview_every, max_batch, max_wait_s
        self.heartbeat_s, self.limits = heartbeat_s, limits
        self.metrics = metrics or Metrics()
        self._decode_limits = limits.protocol()
        self._jobs, self._by_id = [], {}
        self.batch_sizes = deque(maxlen=BATCH_HISTORY)  # rows of the latest batched steps (all: the metrics)
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
        self._stop = threading.Event()
        self._conditioning, self._samplers = {}, {}
        self._started = self._last_beat = time.monotonic()
        self.pid = os.getpid()  # previews and handoffs name the worker that ran them

    def stop(self):
        self._stop.set()

    def serve_forever(self, install_signals=True):
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            while not self._stop.is_set() or self._jobs:  # stopping finishes the steps in flight
                self._pump(0 if self._jobs else POLL_MS)
                if not self._jobs:
                    continue
                wait = self._batch_wait()
                if wait > 0:
                    self._pump(int(wait * 1000) + 1)
                    continue
                self._turn()
        finally:
            self._sock.close()
            if self._auth is not None:
                self._auth.stop()

    # -- messages in and out -------------------------------------------------------------------------

    def _pump(self, timeout_ms=0):
        """Take the messages waiting (waiting up to timeout_ms for the first), then send heartbeats due."""
        if self._sock.poll(timeout_ms):
            for _ in range(MAX_READS):
                self._receive(self._sock.recv_multipart(copy=False))
                if not self._sock.poll(0):
                    break
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            for job in self._jobs:
                job.reply(wire.Message("beat", {"step": job.step}))

    def _send(self, peer, request, msg, codecs):
        frames = wire.encode(msg, codecs)
        self.metrics.bytes.labels("out").inc(wire_bytes(frames))
        if msg.kind == "error":
            self.metrics.errors.labels(msg.meta["code"]).inc()
        try:  # never block: a worker whose broker is gone would wait forever on a full queue
            self._sock.send_multipart([peer, request] + frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("reply dropped: the way to the edge is full or gone",
                        extra=fields(peer=peer.hex(), request=request.hex(), kind=msg.kind))

    def _receive(self, frames):
        if len(frames) < 3:  # not [edge id, request id, header...]: nothing to answer to
            log.warning("dropped a message of %d frames", len(frames), extra=fields(peer=bytes(frames[0]).hex()))
            return
        peer, request, body = bytes(frames[0]), bytes(frames[1]), frames[2:]
        size = wire_bytes(body)
        self.metrics.bytes.labels("in").inc(size)
        codecs = wire.Codecs()
        refuse = lambda code, text: self._send(peer, request, wire.error(code, text), codecs)  # noqa: E731
        if size > self.limits.max_message_bytes:
            return refuse("limit", f"the message is {size} bytes; this cloud takes at most "
                                   f"{self.limits.max_message_bytes} (--max-message-bytes)")
        try:
            msg = wire.decode(body, self._decode_limits)
            codecs = wire.Codecs.from_meta(msg.meta.get("codecs")) if msg.kind == "run" else codecs
        except (ProtocolError, TypeError, ValueError) as e:
            log.warning("malformed message", extra=fields(peer=peer.hex(), error=str(e)))
            return refuse("refused", f"malformed message: {e}")
        if msg.kind == "cancel":
            job = self._by_id.get((peer, request))
            if job is not None:
                job.ticket.cancelled = True
            return
        if msg.kind == "health":
            return self._send(peer, request, wire.Message("health", self.health()), codecs)
        if msg.kind != "run":
            return refuse("refused", f"the cloud serves 'run', 'cancel' and 'health' requests, got {msg.kind!r}")
        try:
            self._admit(peer, request, _client(frames, peer), msg, codecs)
        except _Ended as e:
            log.info("refused", extra=fields(peer=peer.hex(), request=request.hex(), reason=e.reply.meta["message"]))
            self.metrics.sessions.labels("refused").inc()
            self._send(peer, request, e.reply, codecs)
        except (ValueError, ProtocolError) as e:  # PlanError, a bad session or bad latents
            log.warning("refused", extra=fields(peer=peer.hex(), request=request.hex(), reason=str(e)))
            self.metrics.sessions.labels("refused").inc()
            refuse("refused", f"{type(e).__name__}: {e}")
        except Exception as e:  # the model failed on the prompt: say so, and serve on
            log.exception("refused", extra=fields(peer=peer.hex(), request=request.hex()))
            self.metrics.sessions.labels("refused").inc()
            refuse("model", f"the cloud's model failed on this request: {type(e).__name__}: {e}")

    def health(self):
        return {"status": "stopping" if self._stop.is_set() else "ok", "jobs": len(self._jobs), "pid": self.pid,
                "max_batch": self.max_batch, "uptime_s": round(time.monotonic() - self._started, 3)}

    # -- admission ------------------------------------------------------------------------------------

    def _admit(self, peer, request, client, msg, codecs):
        limits = self.limits
        if self._stop.is_set():
            raise _Ended("refused", wire.error("unavailable", "this cloud worker is stopping; try again"))
        if len(self._jobs) >= limits.max_sessions:
            raise _Ended("refused", wire.error("busy", f"this cloud worker has {len(self._jobs)} sessions, its "
                                                       f"limit (--max-sessions); try again later"))
        mine = sum(1 for j in self._jobs if j.ticket.client == client)
        if mine >= limits.max_sessions_per_client:
            raise _Ended("refused", wire.error("limit", f"this client already has {mine} sessions here, the limit "
                                                        "(--max-sessions-per-client); wait for one to finish"))
        spec, a, b, sampler, x, state, conditioning = self._open(msg)
        if spec.plan.num_steps > limits.max_steps_per_session:
            raise _Ended("refused", wire.error("limit", f"plan {spec.plan.name!r} has {spec.plan.num_steps} steps; "
                                                        f"this cloud runs at most {limits.max_steps_per_session} "
                                                        "(--max-steps-per-session)"))
        deadline_s = msg.meta.get("deadline_s", limits.max_deadline_s)
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s > 0:
            raise PlanError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
        now = time.monotonic()
        session = str(msg.meta.get("session_id", ""))[:64]
        ticket = Ticket(peer, request, client, session, now, now + min(float(deadline_s), limits.max_deadline_s))
        reply = lambda m: self._send(peer, request, m, codecs)  # noqa: E731
        preview = lambda step, x: reply(wire.Message("preview", {"step": step, "worker": self.pid}, x))  # noqa: E731
        job = batch.Job(reply, preview, spec, sampler, list(spec.plan.segments[a:b]), conditioning, x, state,
                        ticket=ticket)
        if self.max_batch > 1:
            batch.start_job(job, self.model, sampler.scheduler)
        else:
            job.step = job.segments[0].start
        self._jobs.append(job)
        self._by_id[peer, request] = job
        reply(wire.Message("beat", {"step": job.step}))  # received: the edge's silence clock starts now
        self.metrics.active.set(len(self._jobs))
        log.info("admitted", extra=fields(session=session, request=request.hex(), peer=peer.hex(), plan=spec.plan.name,
                                          segments=[a, b], steps=spec.plan.num_steps, queued=len(self._jobs) - 1))

    def _open(self, msg):
        """Check a run request and set up its session -> (spec, a, b, sampler, x or None, state, conditioning)."""
        spec = SessionSpec.from_msgpack(msg.meta.get("session"))
        segments = msg.meta.get("segments")
        if not (isinstance(segments, list) and len(segments) == 2 and all(type(v) is int for v in segments)):
            raise PlanError(f"segments must be [a, b], two ints, got {segments!r}")
        a, b = segments
        plan = spec.plan
        if not 0 <= a < b <= len(plan.segments) or any(s.side != "cloud" for s in plan.segments[a:b]):
            raise PlanError(f"segments [{a}, {b}) of plan {plan.name!r} are not the cloud's to run")
        for what in ("latent_space", "text_space"):
            theirs, ours = msg.meta.get(what), wire.plain(getattr(self.model, what))
            if theirs != ours:
                raise PlanError(f"the edge's model differs from the cloud's in {what.replace('_', ' ')} "
                                f"({theirs} vs {ours}); a handoff needs both the same")
        expected = (1, *self.model.latent_shape) if hasattr(self.model, "latent_shape") else None
        for name, tensor in (("latent", msg.latent), ("solver state", msg.x0_prev)):
            if tensor is not None and expected is not None and tuple(tensor.shape) != expected:
                raise PlanError(f"the {name} has shape {tuple(tensor.shape)}; this model's latents are {expected}")
        # One sampler (its coefficient table) per schedule and one encoding per prompt, kept across
        # requests: both are pure functions of their keys. Samplers are only read, so jobs share them.
        sampler = _cached(self._samplers, batch.batch_key(spec), lambda: FusedSampler(spec.make_scheduler()))
        state = None if spec.restart_solver or msg.x0_prev is None else SolverState(msg.x0_prev)
        conditioning = _cached(self._conditioning, (spec.prompt, spec.negative_prompt),
                               lambda: self.model.encode_prompt(spec.prompt, spec.negative_prompt))
        return spec, a, b, sampler, msg.latent, state, conditioning

    # -- running --------------------------------------------------------------------------------------

    def _batch_wait(self):
        """Seconds to wait for more sessions before the first step of a batch that is not full."""
        if self.max_batch == 1 or self.max_wait_s <= 0 or not batch.batchable(self._jobs[0]):
            return 0.0
        first = self._jobs[0]
        group = [j for j in self._jobs if j.key == first.key and batch.batchable(j)]
        if len(group) >= self.max_batch or any(j.ticket.started is not None for j in group):
            return 0.0  # running sessions never stall for newcomers
        return max(0.0, min(j.ticket.admitted for j in group) + self.max_wait_s - time.monotonic())

    def _turn(self):
        """End cancelled and overdue requests; then run one request whole (max_batch 1), or one batched
        step of compatible requests (or one request's forecasting segment alone); then reply to those done."""
        now = time.monotonic()
        for job in list(self._jobs):
            try:
                self._check(job, now)
            except _Ended as e:
                self._end(job, e.outcome, e.reply)
        if not self._jobs:
            return
        first = self._jobs[0]
        group = [first]
        try:
            if self.max_batch == 1:
                self._start(first)
                return self._end(first, "finished", self._run(first))
            if not batch.batchable(first):
                self._start(first)
                batch.run_alone(first, self.model, self._callback(first))
            else:
                group = [j for j in self._jobs if j.key == first.key and batch.batchable(j)][: self.max_batch]
                for job in group:
                    self._start(job)
                batch.step_batch(group, self.model, self.preview_every)
                self.batch_sizes.append(len(group))
                self.metrics.batch_rows.observe(len(group))
                self.metrics.steps.labels("real").inc(len(group))
        except _Ended as e:
            return self._end(first, e.outcome, e.reply)
        except Exception as e:  # the model failed on this batch: those sessions end, the others go on
            log.exception("model failed", extra=fields(sessions=[j.ticket.session for j in group]))
            for job in group:
                self._end(job, "error", wire.error("model", f"the cloud's model failed: {type(e).__name__}: {e}"))
            return
        for job in list(self._jobs):
            while job.step == job.segment.stop:
                if job.seg + 1 < len(job.segments):
                    job.seg += 1
                    batch.enter_segment(job)
                    continue
                self._end(job, "finished", self._handoff(job))
                break

    def _start(self, job):
        if job.ticket.started is None:
            job.ticket.started = time.monotonic()
            self.metrics.queue_wait.observe(job.ticket.started - job.ticket.admitted)

    def _check(self, job, now):
        if job.ticket.cancelled:
            raise _Ended("cancelled")
        if now > job.ticket.deadline:
            raise _Ended("deadline", wire.error("deadline", f"the session's deadline passed at step {job.step} of "
                                                            f"{job.spec.plan.num_steps}"))

    def _callback(self, job):
        """After each step a request runs on its own: count it, stream a preview when due, read the
        socket (cancels, new requests, health) and send heartbeats, and stop the request if it has to."""
        every = self.preview_every

        def after_step(i, t, x_t, m, real):
            job.step = i + 1
            self.metrics.steps.labels("real" if real else "forecast").inc()
            if every and (i + 1) % every == 0:  # the latent at the start of step i: what an edge resumes from
                job.preview(i, x_t)
            self._pump()
            self._check(job, time.monotonic())

        return after_step

    def _run(self, job):
        """The whole request, step by step on the scalar path (max_batch 1) -> its handoff message."""
        x, state = job.x, job.state
        if x is None:
            x = initial_noise(self.model, job.spec.seed, job.sampler.scheduler)
        callback = self._callback(job)
        for seg in job.segments:
            x, state, n = run_segment(job.spec, seg, job.sampler, self.model, job.conditioning, x, state, callback)
            job.calls += n
            job.forecasts += (seg.stop - seg.start) - n
        job.x, job.state = x, state
        return self._handoff(job)

    def _handoff(self, job):
        spec = job.spec
        # the edge needs the solver state only if it runs steps after these and does not restart
        last = job.segments[-1] is spec.plan.segments[-1]
        send_state = job.state is not None and not last and not spec.restart_solver
        return wire.Message("handoff", {"step": job.segments[-1].stop, "model_calls": job.calls,
                                        "forecast_steps": job.forecasts, "worker": self.pid},
                            job.x, job.state.x0_prev if send_state else None)

    def _end(self, job, outcome, reply):
        self._jobs.remove(job)
        self._by_id.pop((job.ticket.peer, job.ticket.request), None)
        seconds = time.monotonic() - job.ticket.admitted
        self.metrics.sessions.labels(outcome).inc()  # counted and logged before the edge hears of it
        self.metrics.active.set(len(self._jobs))
        if outcome == "finished":
            self.metrics.latency.observe(seconds)
        log.info(outcome, extra=fields(session=job.ticket.session, request=job.ticket.request.hex(), step=job.step,
                                       model_calls=job.calls, seconds=round(seconds, 4)))
        if reply is not None:
            job.reply(reply)


def _client(frames, peer):
    """The per-client limit's key: the CURVE public key ZeroMQ authenticated, else the connection."""
    try:
        user = frames[-1].get("User-Id")
    except (zmq.ZMQError, AttributeError):
        user = None
    return user.encode() if user else peer


def _cached(cache, key, make):
    """cache[key], made on a miss; the oldest entry goes when the cache is full (insertion order)."""
    if key not in cache:
        if len(cache) >= CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]
