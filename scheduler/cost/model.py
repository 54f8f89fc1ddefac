"""What a plan costs: latency with its parts, cloud GPU-seconds, edge seconds and bytes, as arithmetic over
the plan the executor runs, with every message's size from the protocol's real encoder.

The walk (``predict``), one stretch of one side's segments at a time (scheduler/executor.py's stretches),
in the order EdgeClient.generate runs them:

    edge stretch    T_text,e (once, before its first stretch) + sum over its steps of
                        real: t_unet,e + t_fused,e        forecast: t_fused,e
    cloud stretch   one request:  8 |Run| / B_up  +  RTT  +  W_q  +  S  +  D
                    S   = T_text,c (once per session: the cloud caches a prompt's encoding)
                          + sum over its steps of  real: t_unet,c(B) + t_fused,c   forecast: t_fused,c
                    W_q = rho S / (2 (1 - rho))      the mean wait of an M/D/1 queue at utilisation rho
                    D   = the downlink's time for the previews and the Handoff, first in first out:
                          preview k leaves at max(its step's end, the previous message's arrival), the
                          Handoff at max(S, the last preview's arrival); D = its arrival - S
    end             + T_decode,e  (the edge decodes the final latent)

    bytes_up   = sum |Run|,   bytes_down = sum (|Previews| + |Handoff|)       (wire_bytes of to_frames)
    cloud_gpu_s = T_text,c + sum over real cloud steps (t_unet,c(B) / B + t_fused,c) + forecast t_fused,c
    edge_s      = T_text,e + the edge's steps + T_decode,e

Symbols: B_up, B_down the link's bandwidths in bit/s (Mbit/s * 10^6); RTT its round-trip time, once per
request (the request's propagation up and the reply's down); t_unet(B) the profile's unet_step_s at B = 1,
else unet_step_s_batch[B] (one forward of B sessions' steps: the wall time of each of them; a session's
GPU share is 1/B of it); rho = ``load``.

The queue: M/D/1 (Poisson arrivals, a deterministic service time S: this request's cloud time, one server).
Pollaczek-Khinchine with Var[S] = 0 gives the mean wait before service W_q = rho S / (2 (1 - rho)); 0 at
rho = 0, unbounded as rho -> 1. With cloud_batch > 1 the server is still treated as serving one request at
a time with S its wall time (conservative: a batching server starts a new session at the next step).

Messages (built for real and encoded with the session's codecs, SPEC.md's frames):
- a cloud stretch's wire.Run carries the session (the plan, the scheduler and its config, the prompt), the
  latent (None for the plan's first stretch: the cloud draws x_T itself; else ``latent_shape`` of seeded
  Gaussian noise, NOISE_SEED) and the solver state the scheduler carries at that step (its tensor names
  found by running the plan's steps with the session's real FusedSampler on a 2x2 latent with noise for the
  model, so a multistep scheduler's x0_prev, PLMS's ets and sample, UniPC's history are what they would
  be; each tensor then filled with latent-shaped noise); none where the session restarts its solver.
- the Handoff back carries the latent, the state the edge needs (none if the cloud's segments end the
  plan), step, timestep, seed, model calls and forecast steps, the worker's pid (TYPICAL_PID).
- previews: a wire.Preview of the latent after each cloud step i with (i + 1) % preview_every == 0.

Not counted (named assumptions): the cloud's heartbeats (wire.Beat, 41 bytes a second while a request
runs: BEAT_BYTES), the ZeroMQ request-id frame and ZeroMQ/TCP/IP framing (EdgeClient's byte counters skip
them too), encode/decode time of the codecs, model loading, and any overlap of the edge's text encoding
with the cloud's work (EdgeClient encodes when it reaches its first stretch). Latents and state compress as
Gaussian noise does; real late-step latents compress better under zstd, so bytes are an upper bound there.
"""
from dataclasses import dataclass, field

import torch

from latentwire.protocol import wire_bytes

from .. import wire
from ..executor import stretches
from ..plan import Plan
from ..session import SessionSpec
from .profiles import DeviceProfile, LinkProfile

NOISE_SEED = 0
TYPICAL_PID = 100_000  # a pid in 65536..4194304 (Linux's pid_max): msgpack's 5-byte uint32, as most are
SESSION_ID_CHARS = 32  # uuid4().hex, as EdgeClient names a session
DEADLINE_S = 118.0  # EdgeClient's default deadline (timeout 120 s less its 2 s margin)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"
DEFAULT_SCHEDULER = "DDIMScheduler"  # EC-Diff's and Hybrid SD's sampler
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDMScheduler config; DDIM reads the same)
SD_SCHEDULER_CONFIG = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                       "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# SD 1.x's LatentSpace (channels, VAE scale factor, scaling factor) and TextSpace (hidden, tokens, vocabulary)
SD_SPACES = ([4, 8, 0.18215], [768, 77, 49408])
BEAT_BYTES = 41  # not counted: see the module's docstring
PARTS = ("text_encode", "cloud_steps", "edge_steps", "forecast_steps", "transfer_up", "transfer_down", "rtt",
         "queue", "decode")


class CostError(ValueError):
    """Inputs a prediction cannot use: the text names the argument, the value and the fix."""


@dataclass(frozen=True)
class Cost:
    """One generation's predicted cost. Seconds, bytes; parts: latency_s's terms (they sum to it)."""

    latency_s: float
    cloud_gpu_s: float
    edge_s: float
    bytes_up: int
    bytes_down: int
    parts: dict
    requests: int = 0
    previews: int = 0
    notes: tuple = field(default=(), compare=False)

    def to_plain(self):
        return {"latency_s": self.latency_s, "cloud_gpu_s": self.cloud_gpu_s, "edge_s": self.edge_s,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "parts": dict(self.parts),
                "requests": self.requests, "previews": self.previews, "notes": list(self.notes)}


def md1_wait(load, service_s):
    """The mean wait before service of an M/D/1 queue: W_q = rho S / (2 (1 - rho)), 0 <= rho < 1."""
    if type(load) not in (int, float) or not 0 <= load < 1:
        raise CostError(f"load {load!r}: the cloud's utilisation must be a number in [0, 1) (at 1 the queue grows "
                        "without bound)")
    return load * service_s / (2 * (1 - load))



def default_session(plan, scheduler=DEFAULT_SCHEDULER, prompt=DEFAULT_PROMPT):
    """The SessionSpec an edge would send for ``plan``: SD v1.5's noise schedule under ``scheduler``, with
    the config as SessionSpec.for_model sends it (the diffusers class's full config)."""
    import diffusers

    cls = getattr(diffusers, scheduler, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CostError(f"scheduler {scheduler!r}: name a diffusers scheduler class (e.g. {DEFAULT_SCHEDULER})")
    config = {k: v for k, v in dict(cls.from_config(SD_SCHEDULER_CONFIG).config).items()}
    return SessionSpec(prompt=prompt, plan=plan, scheduler=scheduler, scheduler_config=config)


@dataclass(frozen=True)
class _Stretch:
    side: str
    a: int
    b: int
    steps: tuple  # (step index, real) in order
    state_up: tuple  # solver state tensor names the request carries (a cloud stretch)
    state_down: tuple  # names the Handoff carries back
    stop: int
    timestep: float
    calls: int
    forecasts: int


def trace(session):
    """The plan's stretches as the runners take them -> [_Stretch]: steps, and the solver state's tensor
    names that cross at each end, found by running the session's real sampler on a 2x2 latent with
    seeded noise standing in for the model."""
    from latentwire.kernels import FusedSampler

    from ..segments import SegmentRun

    plan, spec = session.plan, session
    sampler = FusedSampler(spec.make_scheduler())
    g = torch.Generator().manual_seed(NOISE_SEED)
    noise = lambda: torch.randn((1, 1, 2, 2), generator=g)  # noqa: E731
    x, state, out = None, None, []
    for a, b in stretches(plan):
        side = plan.segments[a].side
        if a and spec.restart_solver:
            state = None
        x = noise() if x is None else x
        sent = state if side == "cloud" and state and not spec.restart_solver else None  # EdgeClient._send
        run = SegmentRun(spec, plan.segments[a:b], sampler, (None, None), x, sent if side == "cloud" else state)
        steps = []
        while not run.done:
            i, real = run.step, run.wants_model
            steps.append((i, real))
            run.advance(noise(), noise()) if real else run.advance()
        x, state = run.x, run.state
        back = None
        if side == "cloud":  # CloudEngine._handoff: state only if the edge runs steps after these
            back = state if state and b != len(plan.segments) and not spec.restart_solver else None
            state = back
        ts = sampler.timesteps
        out.append(_Stretch(side, a, b, tuple(steps), tuple(sent.tensors()) if sent else (),
                            tuple(back.tensors()) if back else (), run.step,
                            float(ts[run.step]) if run.step < len(ts) else -1.0, run.calls, run.forecasts))
    return out


def predict(plan, cloud, edge, link, *, load=0.0, codecs=None, latent_shape=None, preview_every=0, cloud_batch=1,
            session=None, spaces=SD_SPACES):
    """The predicted cost of one generation under ``plan`` -> Cost.

    cloud, edge: DeviceProfile (a profile is needed only for a side the plan uses, plus the edge's decode);
    link: LinkProfile. load: the cloud's utilisation rho in [0, 1) (the M/D/1 queue). codecs: wire.Codecs
    (default: the wire's defaults, int8 + zstd 3 latents, fp16 state). latent_shape: one latent without the
    batch dim, (C, H, W) or (F, C, H, W) (default: the profiles' latent_shape, which must agree).
    preview_every: the cloud streams a preview every N steps (0: none). cloud_batch: B sessions share each
    cloud forward (the profile's unet_step_s_batch[B]). session: the SessionSpec sent (default:
    default_session(plan): SD v1.5's schedule under DDIM); its scheduler decides the solver state that
    travels. spaces: (latent_space, text_space) as plain lists, sent in each request (default SD 1.x's).
    """
    if not isinstance(plan, Plan):
        raise CostError(f"plan: expected a latentwire Plan (scheduler.plan.make), got {type(plan).__name__}")
    sides = {seg.side for seg in plan.segments}
    for name, p, kind in (("cloud", cloud, DeviceProfile), ("edge", edge, DeviceProfile), ("link", link, LinkProfile)):
        if not isinstance(p, kind):
            raise CostError(f"{name}: expected a {kind.__name__} (load it with profiles.load_"
                            f"{'link' if kind is LinkProfile else 'device'}), got {type(p).__name__}")
    md1_wait(load, 0.0)  # checks load
    if type(preview_every) is not int or preview_every < 0:
        raise CostError(f"preview_every {preview_every!r}: an int >= 0 (0: no previews)")
    if type(cloud_batch) is not int or cloud_batch < 1:
        raise CostError(f"cloud_batch {cloud_batch!r}: an int >= 1 (sessions per cloud forward)")
    session = default_session(plan) if session is None else session
    if session.plan != plan:
        raise CostError(f"session: its plan {session.plan} is not the plan to predict ({plan})")
    codecs = wire.Codecs() if codecs is None else codecs
    notes = []
    shape = _latent_shape(latent_shape, [p for s, p in (("cloud", cloud), ("edge", edge)) if s in sides] + [edge])

    # step times: (wall, gpu share) per real cloud step; the fused update per step on each side
    t_fused = {s: _fused(p, notes) for s, p in (("cloud", cloud), ("edge", edge))}
    if "cloud" in sides:
        if cloud_batch == 1:
            t_unet_c = cloud.need("unet_step_s")
        else:
            table = cloud.need("unet_step_s_batch")
            if cloud_batch not in table:
                raise CostError(f"cloud_batch {cloud_batch}: cloud profile {cloud.name!r} has unet_step_s_batch for "
                                f"B in {sorted(table)} only; give one of those, or measure B with `latentwire "
                                "profile`")
            t_unet_c = table[cloud_batch]
    t_unet_e = edge.need("unet_step_s") if "edge" in sides else None
    up_bps, down_bps = link.need("up_mbit_s") * 1e6, link.need("down_mbit_s") * 1e6
    rtt = link.need("rtt_ms") / 1e3

    g = torch.Generator().manual_seed(NOISE_SEED)
    latent = torch.randn((1, *shape), generator=g)
    filled = lambda names: (None if not names else  # noqa: E731
                            _state({n: torch.randn((1, *shape), generator=g) for n in names}))
    parts = dict.fromkeys(PARTS, 0.0)
    gpu = edge_s = 0.0
    bytes_up = bytes_down = requests = previews = 0
    encoded = set()
    for k, st in enumerate(trace(session)):
        if st.side == "edge":
            if "edge" not in encoded:
                encoded.add("edge")
                parts["text_encode"] += edge.need("text_encode_s")
                edge_s += edge.need("text_encode_s")
            for _, real in st.steps:
                t = (t_unet_e + t_fused["edge"]) if real else t_fused["edge"]
                parts["edge_steps" if real else "forecast_steps"] += t
                edge_s += t
            continue
        # one cloud request: the Run up, the cloud's time S (previews on the way), the Handoff down
        run = wire.Run(session=session, segments=(st.a, st.b), session_id="0" * SESSION_ID_CHARS,
                       deadline_s=DEADLINE_S, codecs=codecs, latent_space=list(spaces[0]),
                       text_space=list(spaces[1]), latent=None if k == 0 else latent, state=filled(st.state_up))
        up = wire_bytes(run.to_frames())
        requests += 1
        bytes_up += up
        parts["transfer_up"] += 8 * up / up_bps
        parts["rtt"] += rtt
        s, emitted = 0.0, []
        if "cloud" not in encoded:
            encoded.add("cloud")
            s += cloud.need("text_encode_s")
            parts["text_encode"] += cloud.need("text_encode_s")
            gpu += cloud.need("text_encode_s")
        for i, real in st.steps:
            t = (t_unet_c + t_fused["cloud"]) if real else t_fused["cloud"]
            parts["cloud_steps" if real else "forecast_steps"] += t
            gpu += (t_unet_c / cloud_batch + t_fused["cloud"]) if real else t_fused["cloud"]
            s += t
            if preview_every and (i + 1) % preview_every == 0:  # CloudEngine._callback
                emitted.append((s, wire_bytes(wire.Preview(i, TYPICAL_PID, latent).to_frames(codecs))))
        handoff = wire_bytes(wire.Handoff(latent, st.stop, st.timestep, session.seed, filled(st.state_down),
                                          st.calls, st.forecasts, TYPICAL_PID).to_frames(codecs))
        free = 0.0  # the downlink, first in first out: when it finishes the last message given to it
        for at, nbytes in emitted:
            free = max(at, free) + 8 * nbytes / down_bps
            bytes_down += nbytes
            previews += 1
        arrival = max(s, free) + 8 * handoff / down_bps
        bytes_down += handoff
        parts["transfer_down"] += arrival - s
        parts["queue"] += md1_wait(load, s)
    parts["decode"] = edge.need("vae_decode_s")
    edge_s += parts["decode"]
    return Cost(latency_s=sum(parts.values()), cloud_gpu_s=gpu, edge_s=edge_s, bytes_up=bytes_up,
                bytes_down=bytes_down, parts=parts, requests=requests, previews=previews, notes=tuple(notes))


def _state(named):
    from latentwire.kernels.sampler import SolverState

    return SolverState.from_tensors(named)


def _fused(profile, notes):
    if profile.fused_step_s is None:
        notes.append(f"{profile.name}: fused_step_s is null; taken as 0 (the format's default)")
        return 0.0
    return profile.fused_step_s


def _latent_shape(given, profiles):
    if given is not None:
        shape = tuple(given)
        if len(shape) not in (3, 4) or any(type(v) is not int or v < 1 for v in shape):
            raise CostError(f"latent_shape {given!r}: (C, H, W) or (F, C, H, W) of positive ints")
        return shape
    shapes = {p.latent_shape for p in profiles}
    if len(shapes) != 1:
        raise CostError(f"the profiles {', '.join(sorted({p.name for p in profiles}))} differ in latent_shape "
                        f"({' vs '.join(map(str, sorted(shapes)))}): a handoff needs one latent space; give "
                        "latent_shape")
    return shapes.pop()
