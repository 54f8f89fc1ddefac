"""The cloud daemon: serves `run` requests, each a whole cloud segment of one generation.

One request runs every step of its segments without a round trip (the edge sent the session with the
prompt, seed, scheduler and plan; the cloud encodes the prompt itself and, at the start of a
generation, draws x_T from the seed, so x_T never crosses the network), streams a small preview every
`preview_every` steps, and replies with the handoff. Requests are served one at a time here; batching
many sessions' steps is the serving layer's job. SIGTERM (or `stop()`) finishes the request in flight,
then returns.
"""
import logging
import signal
import threading

import zmq

from latentwire.kernels import FusedSampler, SolverState

from . import batch, wire
from .executor import initial_noise, run_segment
from .plan import PlanError
from .security import KeyError_, is_loopback, serve_curve
from .session import SessionSpec

CACHE_ENTRIES = 64  # prompts' text embeddings, and schedules' samplers, the cloud keeps
POLL_MS = 100  # how often the loop looks at its stop flag while idle
LINGER_MS = 0  # unsent replies are dropped at close: an edge waiting on them times out by itself
log = logging.getLogger("latentwire.cloud")


class CloudServer:
    """Serve ``model`` on ``bind`` (tcp://127.0.0.1:PORT or ipc://PATH)."""

    def __init__(self, model, bind, *, preview_every=0, max_batch=1, curve_secret=None, allow=None, insecure=False,
                 context=None):
        """curve_secret, allow: the server's NAME.key_secret and a folder of admitted clients' NAME.key
        files (CURVE). A non-loopback ``bind`` needs them, or insecure=True. max_batch > 1: sessions'
        steps share model forwards (scheduler/batch.py); 1: one request at a time, each whole."""
        self.model = model
        self.preview_every = preview_every
        if type(max_batch) is not int or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.max_batch = max_batch
        self._jobs = []
        self.batch_sizes = []  # rows of each batched step, for monitoring
        if (curve_secret is None) != (allow is None):
            raise KeyError_("CURVE needs both the server's secret key and the folder of allowed client keys")
        if not is_loopback(bind) and curve_secret is None and not insecure:
            raise KeyError_(f"refusing to serve {bind} in the clear: give curve_secret and allow "
                            "(latentwire cloud --curve-secret ... --allow ...), or insecure=True (--insecure)")
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = LINGER_MS
        self._auth = serve_curve(self._sock, self._ctx, curve_secret, allow) if curve_secret else None
        self._sock.bind(bind)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._conditioning, self._samplers = {}, {}

    def stop(self):
        self._stop.set()

    def serve_forever(self, install_signals=True):
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            while not self._stop.is_set() or self._jobs:  # stopping finishes the steps in flight
                if self._sock.poll(0 if self._jobs else POLL_MS):
                    while True:  # take every request waiting, so they can share this turn's batch
                        self._serve_one(self._sock.recv_multipart(copy=False))
                        if self.max_batch == 1 or not self._sock.poll(0):
                            break
                if self._jobs:
                    self._advance()
        finally:
            self._sock.close()
            if self._auth is not None:
                self._auth.stop()

    def _serve_one(self, frames):
        peer, request_id, body = frames[0], frames[1], frames[2:]
        reply = lambda msg, codecs: self._sock.send_multipart([peer, request_id] + wire.encode(msg, codecs), copy=False)  # noqa: E731
        codecs = wire.Codecs()
        try:
            msg = wire.decode(body)
            if msg.kind != "run":
                raise PlanError(f"the cloud serves 'run' requests, got {msg.kind!r}")
            codecs = wire.Codecs.from_meta(msg.meta.get("codecs"))
            preview = lambda step, x: reply(wire.Message("preview", {"step": step}, x), codecs)  # noqa: E731
            if self.max_batch > 1:
                self._jobs.append(self._job(msg, lambda m: reply(m, codecs), preview))
                return
            reply(self._run(msg, preview), codecs)
        except (ValueError, zmq.ZMQError) as e:  # ProtocolError and PlanError are ValueErrors
            log.warning("request refused: %s", e)
            reply(wire.Message("error", {"message": f"{type(e).__name__}: {e}"}), codecs)
        except Exception as e:  # the model failed on this request: say so, and keep serving the others
            log.exception("request failed")
            reply(wire.Message("error", {"message": f"the cloud's model failed: {type(e).__name__}: {e}"}), codecs)

    def _job(self, msg, reply, preview):
        spec, a, b, sampler, x, state, conditioning = self._open(msg)
        job = batch.Job(reply, preview, spec, sampler, list(spec.plan.segments[a:b]), conditioning, x, state)
        batch.start_job(job, self.model, sampler.scheduler)
        return job

    def _advance(self):
        """One turn: step one batch of compatible jobs (or run one job's forecasting segment alone), then
        move finished segments on and reply to finished jobs."""
        first = self._jobs[0]
        group = [first]
        try:
            if not batch.batchable(first):
                batch.run_alone(first, self.model, self.preview_every)
            else:
                group = [j for j in self._jobs if j.key == first.key and batch.batchable(j)][: self.max_batch]
                batch.step_batch(group, self.model, self.preview_every)
                self.batch_sizes.append(len(group))
        except Exception as e:  # the model failed on this batch: those sessions end, the others go on
            log.exception("batch failed")
            for job in group:
                self._jobs.remove(job)
                job.reply(wire.Message("error", {"message": f"the cloud's model failed: {type(e).__name__}: {e}"}))
            return
        for job in list(self._jobs):
            while job.step == job.segment.stop:
                if job.seg + 1 < len(job.segments):
                    job.seg += 1
                    batch.enter_segment(job)
                    continue
                self._jobs.remove(job)
                job.reply(self._handoff(job.spec, job.segments, job.x, job.state, job.calls, job.forecasts))
                break

    def _handoff(self, spec, segments, x, state, calls, forecasts):
        # the edge needs the solver state only if it runs steps after these and does not restart
        last = segments[-1] is spec.plan.segments[-1]
        send_state = state is not None and not last and not spec.restart_solver
        return wire.Message("handoff", {"step": segments[-1].stop, "model_calls": calls, "forecast_steps": forecasts},
                            x, state.x0_prev if send_state else None)

    def _open(self, msg):
        """Check a run request and set up its session -> (spec, a, b, sampler, x or None, state, conditioning)."""
        spec = SessionSpec.from_msgpack(msg.meta["session"])
        a, b = msg.meta["segments"]
        plan = spec.plan
        if not 0 <= a < b <= len(plan.segments) or any(s.side != "cloud" for s in plan.segments[a:b]):
            raise PlanError(f"segments [{a}, {b}) of plan {plan.name!r} are not the cloud's to run")
        for what in ("latent_space", "text_space"):
            theirs, ours = msg.meta.get(what), wire.plain(getattr(self.model, what))
            if theirs != ours:
                raise PlanError(f"the edge's model differs from the cloud's in {what.replace('_', ' ')} "
                                f"({theirs} vs {ours}); a handoff needs both the same")
        # One sampler (its coefficient table) per schedule and one encoding per prompt, kept across
        # requests: both are pure functions of their keys. Samplers are only read, so jobs share them.
        sampler = _cached(self._samplers, batch.batch_key(spec), lambda: FusedSampler(spec.make_scheduler()))
        state = None if spec.restart_solver or msg.x0_prev is None else SolverState(msg.x0_prev)
        conditioning = _cached(self._conditioning, (spec.prompt, spec.negative_prompt),
                               lambda: self.model.encode_prompt(spec.prompt, spec.negative_prompt))
        return spec, a, b, sampler, msg.latent, state, conditioning

    def _run(self, msg, preview):
        spec, a, b, sampler, x, state, conditioning = self._open(msg)
        plan = spec.plan
        if x is None:
            x = initial_noise(self.model, spec.seed, sampler.scheduler)
        calls = forecasts = 0
        every = self.preview_every
        # a preview is the latent at the start of step i: what an edge resumes from if the cloud goes away
        callback = (lambda i, t, x_t, m, real: preview(i, x_t) if (i + 1) % every == 0 else None) if every else None
        for seg in plan.segments[a:b]:
            x, state, n = run_segment(spec, seg, sampler, self.model, conditioning, x, state, callback)
            calls += n
            forecasts += (seg.stop - seg.start) - n
        return self._handoff(spec, list(plan.segments[a:b]), x, state, calls, forecasts)


def _cached(cache, key, make):
    """cache[key], made on a miss; the oldest entry goes when the cache is full (insertion order)."""
    if key not in cache:
        if len(cache) >= CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]
