"""The handoff message: a latent plus everything that must travel with it to continue denoising."""
from dataclasses import dataclass, field

import torch

from .errors import ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .wire import decode_message, encode_message

KIND = "handoff"
LATENT = "latent"
SOLVER = "solver/"  # + state name, e.g. solver/model_output.0 for DPM-Solver++ history
HISTORY = "history/"  # + index: real model outputs kept for K-step extrapolation, oldest first


@dataclass
class Handoff:
    """State that lets the other side continue a generation at ``step_index``.

    latent: x_t, (B, C, H, W) or (B, C, F, H, W).
    step_index: index into the scheduler's timesteps of the next step to run.
    timestep: the scheduler timestep at ``step_index`` (a check against a mismatched schedule).
    seed: the generation's seed, so the receiver can redraw x_T (e.g. as a residual reference).
    rng_state: bytes of ``torch.Generator.get_state()`` for stochastic solvers, or None.
    solver_state: a multistep solver's named tensors (e.g. previous model outputs), each (B, C, ...).
    history: real model outputs for noise extrapolation, oldest first.
    extra: further msgpack-native values (str keys).
    """

    latent: torch.Tensor
    step_index: int
    timestep: float
    seed: int = None
    rng_state: bytes = None
    solver_state: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def encode_handoff(h: Handoff, *, latent_codec=("int8", 3), state_codec=("fp16", 0), latent_reference=None):
    """Handoff -> frames. The latent and the state tensors each take their own (codec, zstd level).

    Defaults: the latent goes as int8 + zstd (error <= half a step per channel); solver state and
    history as fp16, because a multistep update multiplies them by coefficients that can exceed 1.
    latent_reference: optional residual reference for the latent (e.g. the x_T both sides can draw).
    """
    if not isinstance(h, Handoff):
        raise ProtocolError(f"encode_handoff takes a Handoff, got {type(h).__name__}")
    tensors = {LATENT: h.latent}
    tensors.update({SOLVER + k: v for k, v in h.solver_state.items()})
    tensors.update({f"{HISTORY}{i}": v for i, v in enumerate(h.history)})
    codecs = {name: (latent_codec if name == LATENT else state_codec) for name in tensors}
    meta = {"kind": KIND, "step_index": h.step_index, "timestep": float(h.timestep), "seed": h.seed,
            "rng_state": h.rng_state, "extra": h.extra}
    refs = None if latent_reference is None else {LATENT: latent_reference}
    return encode_message(tensors, meta, codecs=codecs, references=refs)


def decode_handoff(frames, *, latent_reference=None, limits: Limits = DEFAULT_LIMITS, device=None):
    """Frames made by ``encode_handoff`` -> Handoff."""
    refs = None if latent_reference is None else {LATENT: latent_reference}
    msg = decode_message(frames, references=refs, limits=limits, device=device)
    m = msg.meta
    if m.get("kind") != KIND:
        raise ProtocolError(f"message kind is {m.get('kind')!r}, not {KIND!r}")
    if LATENT not in msg.tensors:
        raise ProtocolError("handoff message has no 'latent' tensor")
    for key, kind in (("step_index", int), ("timestep", float)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise ProtocolError(f"handoff meta {key!r} must be {kind.__name__}, got {m.get(key)!r}")
    if m.get("seed") is not None and type(m["seed"]) is not int:
        raise ProtocolError(f"handoff meta 'seed' must be an int or nil, got {m['seed']!r}")
    if m.get("rng_state") is not None and not isinstance(m["rng_state"], bytes):
        raise ProtocolError("handoff meta 'rng_state' must be bytes or nil")
    if not isinstance(m.get("extra", {}), dict):
        raise ProtocolError("handoff meta 'extra' must be a map")
    solver = {k[len(SOLVER):]: v for k, v in msg.tensors.items() if k.startswith(SOLVER)}
    hist = {k: v for k, v in msg.tensors.items() if k.startswith(HISTORY)}
    try:
        history = [hist[f"{HISTORY}{i}"] for i in range(len(hist))]
    except KeyError:
        raise ProtocolError(f"handoff history tensors must be numbered 0..{len(hist) - 1}, got {sorted(hist)}") from None
    unknown = set(msg.tensors) - {LATENT} - {SOLVER + k for k in solver} - set(hist)
    if unknown:
        raise ProtocolError(f"handoff message has unknown tensors {sorted(unknown)}")
    return Handoff(latent=msg.tensors[LATENT], step_index=m["step_index"], timestep=m["timestep"],
                   seed=m.get("seed"), rng_state=m.get("rng_state"), solver_state=solver, history=history,
                   extra=m.get("extra", {}))
