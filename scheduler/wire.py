"""The messages an edge and a cloud exchange, as typed values, on top of latentwire.protocol's frames.

    edge -> cloud   run      Run: session (SessionSpec), segments [a, b), session_id, deadline_s, codecs,
                             latent_space, text_space; tensors latent (absent: the cloud draws x_T from the
                             seed) and the solver state, solver/<name> (x0_prev, ets.0.., sample)
    edge -> cloud   cancel   Cancel: drop the request with this id at its next step boundary (no reply)
    edge -> cloud   health   HealthRequest -> Health
    cloud -> edge   beat     Beat: step, running, load (Load: queued, running, utilisation); every heartbeat
                             interval while the request is queued or running, whether or not a step ends
    cloud -> edge   preview  Preview: step, worker (pid); tensor latent (every `preview_every` steps)
    cloud -> edge   handoff  Handoff: the protocol's own handoff message (SPEC.md section 10): latent,
                             solver/<name>, step_index, timestep, seed; extra: model_calls, forecast_steps,
                             worker, load
    cloud -> edge   error    Error: code (refused | limit | busy | deadline | model | unavailable), message,
                             field (the offending field's dotted path, or nil)
    cloud -> edge   health   Health: status, jobs, running, pid, max_batch, uptime_s, queued, utilisation, and
                             replicas from a gateway in front of a Ray Serve deployment (absent elsewhere)

Every message is [request id] + protocol frames, so replies can be matched to requests on a DEALER/ROUTER
pair. Only msgpack and raw tensor frames cross: no pickle. Each kind is a dataclass; ``parse_request`` and
``parse_reply`` are the one place where frames become those values, every field checked by type, range and
size (scheduler/fields.py), so nothing downstream sees a field of the wrong type.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from latentwire.kernels.sampler import SolverState
from latentwire.protocol import (CODECS, Handoff as ProtocolHandoff, ProtocolError, decode_handoff,
                                 decode_message, encode_handoff, encode_message)
from latentwire.protocol.header import unpack_header

from .fields import (FieldError, need_bool, need_int, need_list, need_map, need_number, need_scalar, need_str)
from .plan import MAX_STEPS
from .session import SessionSpec

LATENT, SOLVER = "latent", "solver/"  # the protocol's tensor names (SPEC.md section 10)
IMAGE = "image"  # a run's conditioning image: an upscaler's low-resolution input (1, 3, h, w) in [-1, 1]
REQUESTS = ("run", "cancel", "health")
REPLIES = ("beat", "preview", "handoff", "error", "health")
CODES = ("refused", "limit", "busy", "deadline", "model", "unavailable")
# error codes an edge may retry elsewhere: this cloud cannot take the request now, another one may
RETRYABLE = ("busy", "unavailable")
DEFAULT_CODECS = {"latent": ("int8", 3), "state": ("fp16", 0), "preview": ("int8", 1)}
MAX_ZSTD_LEVEL = 22
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 4096
MAX_DEADLINE_S = 1e7  # a sanity bound on the wire; a cloud caps deadlines far lower (--max-deadline)
MAX_SPACE_ITEMS = 8  # fields of a latent or text space description


@dataclass(frozen=True)
class Codecs:
    """(codec, zstd level) per message part. Defaults: int8 + zstd for latents, fp16 for solver state."""

    latent: tuple = DEFAULT_CODECS["latent"]
    state: tuple = DEFAULT_CODECS["state"]
    preview: tuple = DEFAULT_CODECS["preview"]

    def to_meta(self):
        return {"latent": list(self.latent), "state": list(self.state), "preview": list(self.preview)}

    @classmethod
    def from_meta(cls, d, field="codecs"):
        need_map(field, d, 3, optional=("latent", "state", "preview"))
        parts = {}
        for part, value in d.items():
            codec, level = need_list(f"{field}.{part}", value, 2, 2)
            parts[part] = (need_str(f"{field}.{part}.0", codec, 8, CODECS),
                           need_int(f"{field}.{part}.1", level, 0, MAX_ZSTD_LEVEL))
        return cls(**parts)


# -- requests -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Run segments [a, b) of the session's plan (all the cloud's) from ``latent`` (None: x_T from the seed).
    image: the conditioning image of a model that takes one (an upscaler's low-resolution input), else None."""

    session: SessionSpec
    segments: tuple
    session_id: str = ""
    deadline_s: Optional[float] = None
    codecs: Codecs = field(default_factory=Codecs)
    latent_space: list = None  # the edge's model's, as plain values: the cloud checks its own against them
    text_space: list = None
    latent: torch.Tensor = None
    state: SolverState = None
    image: torch.Tensor = None

    def to_frames(self):
        meta = {"kind": "run", "session": self.session.to_plain(), "segments": list(self.segments),
                "session_id": self.session_id, "deadline_s": self.deadline_s, "codecs": self.codecs.to_meta(),
                "latent_space": plain(self.latent_space), "text_space": plain(self.text_space)}
        frames = _frames(meta, self.latent, self.state, self.codecs.latent, self.codecs.state, self.image)
        return frames


@dataclass(frozen=True)
class Cancel:
    def to_frames(self):
        return encode_message({}, {"kind": "cancel"})


@dataclass(frozen=True)
class HealthRequest:
    def to_frames(self):
        return encode_message({}, {"kind": "health"})


RUN_FIELDS = ("kind", "session", "segments", "session_id", "deadline_s", "codecs", "latent_space", "text_space")


def parse_request(frames, limits=None, max_steps=MAX_STEPS):
    """Frames from an edge -> Run, Cancel or HealthRequest. Raises ProtocolError (the frames are not a
    message) or FieldError (a field is missing, of the wrong type, out of range or over a limit)."""
    m = _decode(frames, limits)
    kind = m.meta.get("kind")
    if kind not in REQUESTS:
        raise FieldError("kind", kind, f"one of {', '.join(REQUESTS)} (the cloud's requests)")
    if kind != "run":
        need_map("meta", m.meta, 1, required=("kind",))
        if m.tensors:
            raise FieldError("tensors", sorted(m.tensors), f"none: a {kind} request carries no tensors")
        return Cancel() if kind == "cancel" else HealthRequest()
    meta = need_map("meta", m.meta, len(RUN_FIELDS), required=("kind", "session", "segments"), optional=RUN_FIELDS)
    image = m.tensors.get(IMAGE)
    if image is not None and (image.dim() != 4 or image.shape[:2] != (1, 3)):
        raise FieldError(f"tensors.{IMAGE}", tuple(image.shape), "(1, 3, h, w): one RGB image")
    state = _state({k: v for k, v in m.tensors.items() if k != IMAGE})
    session = SessionSpec.from_plain(meta["session"], "session", max_steps)
    a, b = need_list("segments", meta["segments"], 2, 2)
    a, b = need_int("segments.0", a, 0, len(session.plan.segments) - 1), need_int("segments.1", b, 1, len(session.plan.segments))
    if not a < b:
        raise FieldError("segments", [a, b], "[a, b) with a < b")
    deadline = meta.get("deadline_s")
    if deadline is not None:
        deadline = need_number("deadline_s", deadline, 0.0, MAX_DEADLINE_S)
        if deadline <= 0:
            raise FieldError("deadline_s", deadline, "a positive number of seconds")
    spaces = {}
    for name in ("latent_space", "text_space"):
        value = meta.get(name)
        if value is not None:
            for i, v in enumerate(need_list(name, value, MAX_SPACE_ITEMS)):
                need_scalar(f"{name}.{i}", v)
        spaces[name] = value
    return Run(session=session, segments=(a, b), session_id=need_str("session_id", meta.get("session_id", ""), MAX_ID_CHARS),
               deadline_s=deadline, codecs=Codecs.from_meta(meta.get("codecs", {})), **spaces,
               latent=m.tensors.get(LATENT), state=state, image=image)


# -- replies --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """The cloud's load, with every beat and handoff and in health: sessions admitted and waiting for their
    first step (queued), sessions stepping (running), and the share of the last LOAD_WINDOW_S seconds its
    engine (scheduler/engine.py) spent computing (utilisation, 0..1). What an edge reads to decide how much to ask of the cloud."""

    queued: int = 0
    running: int = 0
    utilisation: float = 0.0

    def to_plain(self):
        return {"queued": self.queued, "running": self.running, "utilisation": self.utilisation}

    @classmethod
    def from_plain(cls, field, d):
        need_map(field, d, 3, required=("queued", "running", "utilisation"))
        return cls(need_int(f"{field}.queued", d["queued"], 0), need_int(f"{field}.running", d["running"], 0),
                   need_number(f"{field}.utilisation", d["utilisation"], 0.0, 1.0))


@dataclass(frozen=True)
class Beat:
    step: int
    running: bool = True  # False: still queued
    load: Load = Load()

    def to_frames(self, codecs=None):
        return encode_message({}, {"kind": "beat", "step": self.step, "running": self.running,
                                   "load": self.load.to_plain()})


@dataclass(frozen=True)
class Preview:
    step: int
    worker: int
    latent: torch.Tensor

    def to_frames(self, codecs):
        return _frames({"kind": "preview", "step": self.step, "worker": self.worker}, self.latent, None,
                       codecs.preview, codecs.state)


@dataclass(frozen=True)
class Handoff:
    """The end of a run request: the protocol's handoff (latent, step, solver state), plus what it cost."""

    latent: torch.Tensor
    step_index: int
    timestep: float
    seed: int
    state: SolverState = None
    model_calls: int = 0
    forecast_steps: int = 0
    worker: int = 0
    load: Load = Load()

    def to_frames(self, codecs):
        h = ProtocolHandoff(latent=self.latent, step_index=self.step_index, timestep=float(self.timestep),
                            seed=self.seed, solver_state={} if self.state is None else _wire_tensors(self.state),
                            extra={"model_calls": self.model_calls, "forecast_steps": self.forecast_steps,
                                   "worker": self.worker, "load": self.load.to_plain()})
        return encode_handoff(h, latent_codec=codecs.latent, state_codec=codecs.state)


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    field: Optional[str] = None

    def to_frames(self, codecs=None):
        return encode_message({}, {"kind": "error", "code": self.code, "message": self.message[:MAX_TEXT_CHARS],
                                   "field": self.field})


@dataclass(frozen=True)
class Health:
    status: str
    jobs: int
    running: int
    pid: int
    max_batch: int
    uptime_s: float
    queued: int = 0  # as in Load: jobs = queued + running
    utilisation: float = 0.0
    replicas: Optional[int] = None  # a gateway's (latentwire cloud --ray): the replicas serving behind it

    def to_frames(self, codecs=None):
        meta = {k: v for k, v in self.__dict__.items() if not (k == "replicas" and v is None)}
        return encode_message({}, {"kind": "health", **meta})

    @property
    def load(self):
        return Load(self.queued, self.running, self.utilisation)


@dataclass(frozen=True)
class Relayed:
    """A reply encoded elsewhere (by a Ray Serve replica, scheduler/serving/rayserve), forwarded by a gateway
    as the frames it is: decoding and encoding again would quantise an int8 latent twice."""

    kind: str  # one of REPLIES
    frames: list
    code: Optional[str] = None  # an error's

    def to_frames(self, codecs=None):
        return self.frames


def parse_reply(frames, limits=None):
    """Frames from a cloud -> Beat, Preview, Handoff, Error or Health, every field checked."""
    kind = _peek_kind(frames, limits)
    if kind == "handoff":
        h = decode_handoff(frames, limits=limits) if limits is not None else decode_handoff(frames)
        extra = need_map("extra", h.extra, 4, required=("model_calls", "forecast_steps", "worker", "load"))
        if h.history:
            raise FieldError("tensors.history", len(h.history), "no forecaster history (none travels in a handoff)")
        state = _state({SOLVER + k: v for k, v in h.solver_state.items()}, with_latent=False)
        return Handoff(h.latent, need_int("step_index", h.step_index, 0, MAX_STEPS), h.timestep,
                       need_int("seed", h.seed, 0), state,
                       need_int("extra.model_calls", extra["model_calls"], 0, MAX_STEPS),
                       need_int("extra.forecast_steps", extra["forecast_steps"], 0, MAX_STEPS),
                       need_int("extra.worker", extra["worker"], 0), Load.from_plain("extra.load", extra["load"]))
    m = _decode(frames, limits)
    meta = m.meta
    if kind == "beat":
        need_map("meta", meta, 4, required=("kind", "step", "running", "load"))
        return Beat(need_int("step", meta["step"], 0, MAX_STEPS), need_bool("running", meta["running"]),
                    Load.from_plain("load", meta["load"]))
    if kind == "preview":
        need_map("meta", meta, 3, required=("kind", "step", "worker"))
        if set(m.tensors) != {LATENT}:
            raise FieldError("tensors", sorted(m.tensors), f"one tensor, {LATENT!r}")
        return Preview(need_int("step", meta["step"], 0, MAX_STEPS), need_int("worker", meta["worker"], 0),
                       m.tensors[LATENT])
    if kind == "error":
        need_map("meta", meta, 4, required=("kind", "code", "message"), optional=("field",))
        f = meta.get("field")
        return Error(need_str("code", meta["code"], 16, CODES), need_str("message", meta["message"], MAX_TEXT_CHARS),
                     None if f is None else need_str("field", f, 256))
    if kind == "health":
        names = ("kind", "status", "jobs", "running", "pid", "max_batch", "uptime_s", "queued", "utilisation")
        need_map("meta", meta, len(names) + 1, required=names, optional=("replicas",))
        replicas = meta.get("replicas")
        return Health(need_str("status", meta["status"], 16), need_int("jobs", meta["jobs"], 0),
                      need_int("running", meta["running"], 0), need_int("pid", meta["pid"], 0),
                      need_int("max_batch", meta["max_batch"], 1), need_number("uptime_s", meta["uptime_s"], 0.0),
                      need_int("queued", meta["queued"], 0), need_number("utilisation", meta["utilisation"], 0.0, 1.0),
                      None if replicas is None else need_int("replicas", replicas, 0))
    raise FieldError("kind", kind, f"one of {', '.join(REPLIES)} (the cloud's replies)")


# -- frames ---------------------------------------------------------------------------------------------

def _frames(meta, latent, state, latent_codec, state_codec, image=None):
    tensors, chosen = {}, {}
    if latent is not None:
        tensors[LATENT], chosen[LATENT] = _wire_tensor(latent), tuple(latent_codec)
    if image is not None:  # an image is sent as the latent is: 8-bit is a low-resolution image's own precision
        tensors[IMAGE], chosen[IMAGE] = _wire_tensor(image), tuple(latent_codec)
    for name, t in ({} if state is None else _wire_tensors(state)).items():
        tensors[SOLVER + name], chosen[SOLVER + name] = t, tuple(state_codec)
    return encode_message(tensors, meta, codecs=chosen)


def _wire_tensors(state):
    return {name: _wire_tensor(t) for name, t in state.tensors().items()}


def _state(tensors, with_latent=True):
    """The SolverState of a message's solver/<name> tensors (None if it has none); any other tensor but
    the latent is refused by name."""
    named = {}
    for name, t in tensors.items():
        if name == LATENT and with_latent:
            continue
        if not name.startswith(SOLVER):
            raise FieldError(f"tensors.{name}", name, f"{LATENT!r}, {IMAGE!r} (a run's) or a solver state tensor "
                                                      f"{SOLVER}<name>")
        named[name[len(SOLVER):]] = t
    try:
        state = SolverState.from_tensors(named)
    except ValueError as e:
        raise FieldError.because("tensors", str(e)) from None
    return state if state else None


def _wire_tensor(t):
    """What crosses the wire does not depend on the sender's device: tensors are encoded from the CPU."""
    return t.detach().cpu()


def _decode(frames, limits):
    return decode_message(frames) if limits is None else decode_message(frames, limits=limits)


def _peek_kind(frames, limits):
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("no frames: a message is a header frame followed by one payload frame per tensor")
    from latentwire.protocol import DEFAULT_LIMITS

    header = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    _, meta = unpack_header(memoryview(header), limits or DEFAULT_LIMITS)
    return meta.get("kind")


def plain(value):
    """A value as msgpack hands it back (tuples become lists), to compare what a peer sent."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value
