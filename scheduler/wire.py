"""The messages an edge and a cloud exchange, on top of latentwire.protocol's multipart frames.

    edge -> cloud   run      meta: session (SessionSpec msgpack), segments [a, b), session_id, deadline_s
                             tensors: latent (absent: the cloud draws x_T from the seed), solver/x0_prev
    cloud -> edge   preview  meta: step, worker (pid); tensors: latent (int8, every `preview_every` steps)
    cloud -> edge   handoff  meta: step, model_calls, forecast_steps, worker; tensors: latent, solver/x0_prev
    cloud -> edge   error    meta: message, code (refused | limit | busy | deadline | model | unavailable)
    edge -> cloud   cancel   (the id of the request to drop at its next step boundary; no reply)
    cloud -> edge   beat     meta: step; every heartbeat interval while the request is queued or running
    edge -> cloud   health   -> health  meta: status, jobs, pid, max_batch, uptime_s

Every message is [request id] + protocol frames, so replies can be matched to requests on a
DEALER/ROUTER pair. Only msgpack and raw tensor frames cross: no pickle.
"""
from dataclasses import dataclass, field

from latentwire.protocol import ProtocolError, decode_message, encode_message

LATENT, STATE = "latent", "solver/x0_prev"
KINDS = ("run", "preview", "handoff", "error", "cancel", "beat", "health")
# error codes an edge may retry elsewhere: this cloud cannot take or finish the request, another one may
RETRYABLE = ("busy", "unavailable", "deadline")
DEFAULT_CODECS = {"latent": ("int8", 3), "state": ("fp16", 0), "preview": ("int8", 1)}


@dataclass
class Codecs:
    """(codec, zstd level) per message part. Defaults: int8 + zstd for latents, fp16 for solver state."""

    latent: tuple = DEFAULT_CODECS["latent"]
    state: tuple = DEFAULT_CODECS["state"]
    preview: tuple = DEFAULT_CODECS["preview"]

    def to_meta(self):
        return {"latent": list(self.latent), "state": list(self.state), "preview": list(self.preview)}

    @classmethod
    def from_meta(cls, d):
        return cls(**{k: tuple(v) for k, v in (d or {}).items() if k in ("latent", "state", "preview")})


@dataclass
class Message:
    kind: str
    meta: dict = field(default_factory=dict)
    latent: object = None
    x0_prev: object = None


def encode(msg, codecs):
    tensors, chosen = {}, {}
    if msg.latent is not None:
        tensors[LATENT] = msg.latent
        chosen[LATENT] = codecs.preview if msg.kind == "preview" else codecs.latent
    if msg.x0_prev is not None:
        tensors[STATE] = msg.x0_prev
        chosen[STATE] = codecs.state
    return encode_message(tensors, {"kind": msg.kind, **msg.meta}, codecs=chosen)


def decode(frames, limits=None):
    """frames -> Message; limits: a latentwire.protocol.Limits (default: the protocol's)."""
    m = decode_message(frames) if limits is None else decode_message(frames, limits=limits)
    meta = dict(m.meta)
    kind = meta.pop("kind", None)
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    return Message(kind, meta, m.tensors.get(LATENT), m.tensors.get(STATE))


def error(code, text):
    return Message("error", {"code": code, "message": text})


def plain(value):
    """A value as msgpack hands it back (tuples become lists), to compare what a peer sent."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value
