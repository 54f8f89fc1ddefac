"""The cloud's engine: admission, step-level batching and stepping, with no sockets.

A serving stack drives it from Python; the ZeroMQ daemon (scheduler/serving/cloud.py) is one front end on it:

    engine = CloudEngine(model, max_batch=8)
    ticket = engine.submit(run, emit=events.append)   # a wire.Run; raises Refused with a wire.Error
    while engine.turn():                              # or engine.run_forever() on a thread of its own
        pass
    # events: wire.Preview every preview_every steps, then one wire.Handoff or wire.Error

``submit``, ``cancel``, ``health`` and ``stop`` may be called from any thread; ``turn`` and
``run_forever`` from one. ``emit`` is called on the stepping thread.

Each turn takes the oldest session's group: up to ``max_batch`` sessions with its schedule (scheduler
class, configuration and length: the model's input scaling depends on it), oldest first. Each session
in the group takes one step: those at a real step share one model forward on their stacked latents,
timesteps and text embeddings; those at a forecast step need none. Each row then takes its own fused
step, the very code a session running alone takes (scheduler/segments.py). A group of one is the plain
case, not a second path: its forward is the one-process run's call, so a split run equals the one-process
run bit for bit; in a larger group a session ends within the forward's own batching rounding (1e-5 on
the tiny models) of the same session alone. A group whose forward fails is run again row by row, so only
the sessions whose own call fails end (with a `model` error); the others go on. A session whose latent
stops being finite, or whose reply cannot be encoded, ends alone too. With max_batch 1 the oldest session
runs whole, then the next.
"""
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from latentwire.kernels import FusedSampler

from . import wire
from .executor import initial_noise, model_device, on_model
from .limits import DEFAULT_SERVING_LIMITS
from .logs import fields
from .metrics import Metrics
from .plan import PlanError
from .segments import SegmentRun

CACHE_ENTRIES = 64  # prompts' text embeddings, and schedules' samplers, the engine keeps
BATCH_HISTORY = 1000  # a daemon runs for weeks: keep the latest group sizes only
IDLE_WAIT_S = 0.1  # how long run_forever sleeps on an empty queue before it looks at its stop flag
LOAD_WINDOW_S = 10.0  # utilisation: the share of the latest this-many seconds the engine spent computing
log = logging.getLogger("latentwire.cloud")


class Refused(Exception):
    """submit() turned a request away; ``error`` is the wire.Error to send back."""

    def __init__(self, error):
        super().__init__(error.message)
        self.error = error


@dataclass
class Ticket:
    """One admitted request as the engine and its front end see it (times: time.monotonic() seconds)."""

    emit: Callable
    client: bytes
    session_id: str
    admitted: float
    deadline: float
    step: int = 0
    started: Optional[float] = None
    cancelled: bool = False
    done: bool = False


def new_ticket(request, emit, client, limits):
    """The Ticket of a wire.Run arriving now, its deadline capped by ``limits`` (--max-deadline)."""
    now = time.monotonic()
    deadline_s = limits.max_deadline_s if request.deadline_s is None else min(request.deadline_s, limits.max_deadline_s)
    return Ticket(emit, client, request.session_id, now, now + deadline_s,
                  step=request.session.plan.segments[request.segments[0]].start)


class Admission:
    """The limits on sessions in flight, from everyone (--max-sessions) and from one client
    (--max-sessions-per-client): what the engine admits, and a gateway in front of many engines
    (scheduler/serving/rayserve) admits the same way. Thread-safe."""

    def __init__(self, limits, metrics):
        self.limits, self.metrics = limits, metrics
        self._lock = threading.Lock()
        self.count, self._per_client = 0, {}

    def admit(self, client):
        """Count one more session of ``client`` -> how many were in flight before it; raise Refused over a limit."""
        with self._lock:
            if self.count >= self.limits.max_sessions:
                raise Refused(wire.Error("busy", f"this cloud worker has {self.count} sessions, its limit "
                                                 "(--max-sessions); try again later"))
            mine = self._per_client.get(client, 0)
            if mine >= self.limits.max_sessions_per_client:
                raise Refused(wire.Error("limit", f"this client already has {mine} sessions here, the limit "
                                                  "(--max-sessions-per-client); wait for one to finish"))
            self.count += 1
            self._per_client[client] = mine + 1
            self.metrics.active.set(self.count)
            return self.count - 1

    def release(self, client):
        with self._lock:
            self.count -= 1
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]
            self.metrics.active.set(self.count)

    def clients(self):
        with self._lock:
            return dict(self._per_client)


@dataclass
class _Session:
    ticket: Ticket
    request: wire.Run
    batch_key: tuple = None
    run: SegmentRun = None
    last_segment: bool = False  # its segments end the plan: no solver state goes back


class CloudEngine:
    """Runs the cloud's segments of many sessions on one model. preview_every: stream the latent every N
    steps (0: never); max_batch: sessions whose steps share one forward; max_wait_s: how long a new group
    that is not full waits for company before its first step; limits: a ServingLimits."""

    def __init__(self, model, *, preview_every=0, max_batch=1, max_wait_s=0.0, limits=DEFAULT_SERVING_LIMITS,
                 metrics=None, worker=None):
        if type(max_batch) is not int or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if type(preview_every) is not int or preview_every < 0:
            raise ValueError(f"preview_every must be an int >= 0, got {preview_every!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self.model, self.preview_every, self.max_batch, self.max_wait_s = model, preview_every, max_batch, max_wait_s
        self.limits, self.metrics = limits, metrics or Metrics()
        self.worker = os.getpid() if worker is None else worker
        self.device = model_device(model)
        self.batch_sizes = deque(maxlen=BATCH_HISTORY)  # rows of the latest forwards (all of them: the metrics)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox, self._active = deque(), []
        self.admission = Admission(limits, self.metrics)
        self._stopping = False
        self._conditioning, self._samplers = {}, {}
        self._started = time.monotonic()
        self._busy = deque()  # (start, end) of the turns that computed, the latest LOAD_WINDOW_S of them
        self.metrics.queued.set_function(lambda: self.load().queued)
        self.metrics.utilisation.set_function(lambda: self.load().utilisation)

    # -- any thread ---------------------------------------------------------------------------------------

    def submit(self, request, emit, client=b""):
        """Admit a wire.Run -> its Ticket, or raise Refused (stopping, busy, over a limit)."""
        ticket = new_ticket(request, emit, client, self.limits)
        with self._lock:
            if self._stopping:
                raise Refused(wire.Error("unavailable", "this cloud worker is stopping; try again"))
            queued = self.admission.admit(client)
            self._inbox.append(_Session(ticket, request))
            self._wake.notify()
        log.info("admitted", extra=fields(session=ticket.session_id, plan=request.session.plan.name,
                                          segments=list(request.segments), steps=request.session.plan.num_steps,
                                          queued=queued))
        return ticket

    def cancel(self, ticket):
        """Drop a request at its next step boundary, silently."""
        ticket.cancelled = True
        with self._lock:
            self._wake.notify()

    def stop(self):
        """Refuse new requests (`unavailable`); run_forever returns once those admitted are done."""
        with self._lock:
            self._stopping = True
            self._wake.notify()

    @property
    def stopping(self):
        return self._stopping

    def health(self):
        load = self.load()
        return wire.Health("stopping" if self._stopping else "ok", load.queued + load.running, load.running,
                           self.worker, self.max_batch, round(time.monotonic() - self._started, 3), load.queued,
                           load.utilisation)

    def load(self):
        """-> wire.Load: sessions admitted and not yet stepping, those stepping, and the share of the last
        LOAD_WINDOW_S seconds (or of the uptime, if shorter) spent in turns that computed."""
        now = time.monotonic()
        with self._lock:
            jobs, busy = self.admission.count, list(self._busy)
        running = min(jobs, sum(1 for s in list(self._active) if s.ticket.started is not None))
        since = now - LOAD_WINDOW_S
        spent = sum(end - max(start, since) for start, end in busy if end > since)
        window = min(LOAD_WINDOW_S, now - self._started)
        return wire.Load(jobs - running, running, round(min(1.0, spent / window), 4) if window > 0 else 0.0)

    # -- the stepping thread ------------------------------------------------------------------------------

    def run_forever(self):
        """Turn until stop() and every admitted request is done."""
        while True:
            with self._lock:
                if self._stopping and not self._inbox and not self._active:
                    return
                if not self._inbox and not self._active:
                    self._wake.wait(IDLE_WAIT_S)
                    continue
            wait = self._safe_turn()
            if wait:
                with self._lock:
                    if not self._inbox:
                        self._wake.wait(wait)

    def turn(self):
        """One turn (see the module doc) -> whether requests remain. For a caller that drives the engine
        itself; a group waiting for company (max_wait_s) waits here."""
        wait = self._safe_turn()
        if wait:
            time.sleep(wait)
        with self._lock:
            return bool(self._inbox or self._active)

    def _safe_turn(self):
        """_turn, and if a bug escapes it (each session's own failures are caught inside), the sessions of
        the turn end with an error rather than being stranded; the engine serves on."""
        try:
            return self._turn()
        except Exception as e:
            log.exception("a turn failed")
            for s in list(self._active):
                self._end(s, "error", wire.Error("model", f"the cloud failed: {type(e).__name__}: {e}"))
            return 0.0

    def _turn(self):
        """-> seconds the oldest group waits for company (0: it stepped, or nothing to do)."""
        self._open_new()
        now = time.monotonic()
        for s in list(self._active):
            if s.ticket.cancelled:
                self._end(s, "cancelled", None)
            elif now > s.ticket.deadline:
                self._end(s, "deadline", wire.Error("deadline", f"the session's deadline passed at step "
                                                                f"{s.run.step} of {s.request.session.plan.num_steps}"))
        if not self._active:
            return 0.0
        first = self._active[0]
        group = [s for s in self._active if s.batch_key == first.batch_key][: self.max_batch]
        wait = self._wait_for_company(group, now)
        if wait:
            return wait
        for s in group:
            if s.ticket.started is None:
                s.ticket.started = now
                self.metrics.queue_wait.observe(now - s.ticket.admitted)
        real = [s for s in group if s.run.wants_model]
        try:
            for s in group:
                if not s.run.wants_model:
                    self._advance(s)
            if real:
                self._forward(real)
            for s in group:
                if s.run.done and not s.ticket.done:
                    if torch.isfinite(s.run.x).all():
                        self._end(s, "finished", self._handoff(s))
                    else:  # nothing could decode it, nor continue from it
                        self._end(s, "error", wire.Error("model", "the session's latent is no longer finite (NaN "
                                                                  "or inf) at its handoff: its inputs or plan diverged"))
        finally:  # the time this turn computed: the utilisation every reply reports
            end = time.monotonic()
            with self._lock:
                self._busy.append((now, end))
                while self._busy and self._busy[0][1] < end - LOAD_WINDOW_S:
                    self._busy.popleft()
        return 0.0

    def _wait_for_company(self, group, now):
        if self.max_batch == 1 or self.max_wait_s <= 0 or len(group) >= self.max_batch:
            return 0.0
        if any(s.ticket.started is not None for s in group):
            return 0.0  # running sessions never stall for newcomers
        return max(0.0, min(s.ticket.admitted for s in group) + self.max_wait_s - now)

    def _forward(self, group):
        """One model call for every session of ``group`` (all at a real step), then each one's own step."""
        try:
            preds = self._predict(group)
        except Exception as e:
            if len(group) == 1:
                return self._fail(group[0], e)
            log.warning("a batched forward failed; running its sessions one by one",
                        extra=fields(sessions=[s.ticket.session_id for s in group], error=repr(e)))
            for s in group:
                try:
                    pred = self._predict([s])
                except Exception as e1:
                    self._fail(s, e1)
                    continue
                self._step(s, *pred[0])
            return
        self.batch_sizes.append(len(group))
        self.metrics.batch_rows.observe(len(group))
        for s, pred in zip(group, preds):
            self._step(s, *pred)

    def _predict(self, group):
        """The model's raw predictions for each session of group -> [(cond, uncond)] rows (B = 1 each)."""
        scheduler = group[0].run.sampler.scheduler
        if len(group) == 1:  # nothing to stack: the very call a session running alone makes
            run = group[0].run
            x, t = run.model_input()
            return [self.model.predict(x, t, *run.conditioning, scheduler=scheduler, guidance=run.guidance)]
        inputs = [s.run.model_input() for s in group]
        x = torch.cat([x for x, _ in inputs])
        t = torch.tensor([t for _, t in inputs], device=x.device)
        cond = _stack([s.run.conditioning[0] for s in group])
        uncond = _stack([s.run.conditioning[1] for s in group])
        guidance = torch.tensor([s.run.guidance for s in group], device=x.device)
        pc, pu = self.model.predict(x, t, cond, uncond, scheduler=scheduler, guidance=guidance)
        return [(pc[r:r + 1], pu[r:r + 1]) for r in range(len(group))]

    def _step(self, s, pred_cond, pred_uncond):
        try:
            s.run.advance(pred_cond, pred_uncond)
        except Exception as e:  # a step on this session's own inputs failed: it ends alone
            return self._fail(s, e)
        s.ticket.step = s.run.step
        self.metrics.steps.labels("real").inc()

    def _advance(self, s):
        try:
            s.run.advance()
        except Exception as e:
            return self._fail(s, e)
        s.ticket.step = s.run.step
        self.metrics.steps.labels("forecast").inc()

    def _fail(self, s, e):
        log.error("model failed", extra=fields(session=s.ticket.session_id, error=f"{type(e).__name__}: {e}"))
        self._end(s, "error", wire.Error("model", f"the cloud's model failed: {type(e).__name__}: {e}"))

    # -- opening and ending -------------------------------------------------------------------------------

    def _open_new(self):
        with self._lock:
            new = list(self._inbox)
            self._inbox.clear()
        for s in new:
            try:
                self._open(s)
            except (PlanError, wire.FieldError, ValueError) as e:
                field = getattr(e, "field", None)
                self._end(s, "refused", wire.Error("refused", f"{type(e).__name__}: {e}", field), opened=False)
                continue
            except Exception as e:  # the model failed on the prompt: say so, and serve on
                log.exception("the model failed on a prompt", extra=fields(session=s.ticket.session_id))
                self._end(s, "error", wire.Error("model", f"the cloud's model failed on this request: "
                                                          f"{type(e).__name__}: {e}"), opened=False)
                continue
            self._active.append(s)

    def _open(self, s):
        """Check a request against this model and set up its run."""
        request, model = s.request, self.model
        spec = request.session
        plan = spec.plan
        a, b = request.segments
        if any(seg.side != "cloud" for seg in plan.segments[a:b]):
            raise wire.FieldError("segments", list(request.segments), f"segments of plan {plan.name!r} that are "
                                                                      "all the cloud's")
        for what in ("latent_space", "text_space"):
            theirs, ours = getattr(request, what), wire.plain(getattr(model, what))
            if theirs is not None and theirs != ours:  # None: the caller does not say (a serving stack's own)
                raise wire.FieldError(what, theirs, f"this cloud's model's {what.replace('_', ' ')} {ours}: a "
                                                    "handoff needs both models the same")
        image = _image(request, model)
        expected = (1, *model.latent_shape) if hasattr(model, "latent_shape") else None
        if image is not None:  # an upscaler's latent is the size of its low-resolution image
            expected = (1, model.latent_shape[0], *image.shape[-2:])
        state_tensors = {} if request.state is None else request.state.tensors()
        for name, tensor in (("latent", request.latent), *((f"solver/{k}", v) for k, v in state_tensors.items())):
            if tensor is None:
                continue
            if expected is not None and tuple(tensor.shape) != expected:
                raise wire.FieldError(f"tensors.{name}", tuple(tensor.shape), f"shape {expected}, this model's latents")
            if not torch.isfinite(tensor).all():
                raise wire.FieldError(f"tensors.{name}", "non-finite values", "finite values")
        # One sampler (its coefficient table) per schedule and one encoding per prompt, kept across
        # requests: both are pure functions of their keys. Samplers are only read, so sessions share them.
        # the schedule, all of it: a session with another mu or sigmas must not step with this one's table
        schedule = (spec.scheduler, repr(sorted(spec.scheduler_config.items())), plan.num_steps,
                    spec.inference_steps, repr(sorted(spec.timestep_kwargs.items())))
        s.batch_key = schedule + (expected,)  # rows stack only if their latents have one shape
        sampler = _cached(self._samplers, schedule,
                          lambda: FusedSampler(spec.make_scheduler(), device=self.device))
        conditioning = _cached(self._conditioning, (spec.prompt, spec.negative_prompt),
                               lambda: model.encode_prompt(spec.prompt, spec.negative_prompt))
        if image is not None:  # (text, noised image, noise level) rows: the image's noise comes from the seed
            conditioning = model.condition(conditioning, on_model(model, image), spec.seed)
        x = on_model(model, request.latent)
        if x is None:
            x = initial_noise(model, spec.seed, sampler.scheduler, None if image is None else tuple(image.shape[-2:]))
        state = None
        if request.state is not None and not spec.restart_solver:
            state = request.state.map(lambda t: on_model(model, t))
        s.last_segment = b == len(plan.segments)
        s.run = SegmentRun(spec, plan.segments[a:b], sampler, conditioning, x, state, callback=self._callback(s))

    def _callback(self, s):
        every, ticket = self.preview_every, s.ticket

        def after_step(i, t, x_t, m, real):
            if every and (i + 1) % every == 0 and torch.isfinite(x_t).all():  # the latent at the start of step
                ticket.emit(wire.Preview(i, self.worker, x_t))  # i: what an edge resumes from

        return after_step

    def _handoff(self, s):
        spec, run = s.request.session, s.run
        # the edge needs the solver state only if it runs steps after these and does not restart
        send_state = bool(run.state) and not s.last_segment and not spec.restart_solver
        step = run.step
        timesteps = run.sampler.timesteps
        timestep = float(timesteps[step]) if step < len(timesteps) else -1.0  # -1: the schedule is done
        return wire.Handoff(run.x, step, timestep, spec.seed, run.state if send_state else None,
                            run.calls, run.forecasts, self.worker, self.load())

    def _end(self, s, outcome, event, opened=True):
        ticket = s.ticket
        ticket.done = True
        if opened:
            self._active.remove(s)
        self.admission.release(ticket.client)
        seconds = time.monotonic() - ticket.admitted
        self.metrics.sessions.labels(outcome).inc()  # counted and logged before the edge hears of it
        if outcome == "finished":
            self.metrics.latency.observe(seconds)
        run = s.run
        log.info(outcome, extra=fields(session=ticket.session_id, step=ticket.step,
                                       model_calls=run.calls if run is not None else 0, seconds=round(seconds, 4),
                                       **({"reason": event.message} if isinstance(event, wire.Error) else {})))
        if event is not None:
            self._emit(ticket, event)

    def _emit(self, ticket, event):
        """Send a session's last event; if it cannot be sent (a latent no codec can encode, say), the
        session gets an error in its place, and never takes another session with it."""
        try:
            ticket.emit(event)
        except Exception as e:
            log.exception("an event could not be sent", extra=fields(session=ticket.session_id))
            if not isinstance(event, wire.Error):
                try:
                    ticket.emit(wire.Error("model", f"the cloud could not send its {type(event).__name__.lower()}: "
                                                    f"{type(e).__name__}: {e}"))
                except Exception:
                    log.exception("nor could its error", extra=fields(session=ticket.session_id))


def _image(request, model):
    """The request's conditioning image, checked against the model: an upscaler (a model with condition())
    needs one, any other model takes none."""
    image, wants = request.image, hasattr(model, "condition")
    if image is None:
        if wants:
            raise wire.FieldError(f"tensors.{wire.IMAGE}", None, "a low-resolution image (1, 3, h, w): this cloud's "
                                                                "model is an upscaler")
        return None
    if not wants:
        raise wire.FieldError(f"tensors.{wire.IMAGE}", tuple(image.shape), "no image: this cloud's model is not an "
                                                                          "upscaler")
    if not torch.isfinite(image).all() or image.abs().max() > 1:
        raise wire.FieldError(f"tensors.{wire.IMAGE}", "values outside [-1, 1]", "an image in [-1, 1]")
    return image


def _stack(conditionings):
    """Rows of conditioning stacked along the batch: a model's conditioning is a tensor (SD's text
    embeddings) or a tuple of them (SDXL's embeddings and pooled embeddings), each with a batch dim of 1."""
    first = conditionings[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(conditionings)
    return type(first)(torch.cat(parts) for parts in zip(*conditionings))


def _cached(cache, key, make):
    """cache[key], made on a miss; the oldest entry goes when the cache is full (insertion order)."""
    if key not in cache:
        if len(cache) >= CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]
