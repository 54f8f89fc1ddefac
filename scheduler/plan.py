"""Split plans: which side computes each denoising step, as plain data.

A plan is a sequence of segments over the step indices of one configured diffusers scheduler; each
segment is run by one side (``cloud`` or ``edge``), optionally with K-step noise forecasting (then
some of its steps are ``forecast``: no model call), and the latent crosses the network wherever the
side changes. The built-in plans are the systems latentwire implements, with their papers' defaults:

    cloud-only       C C C C C C C C
    edge-only        E E E E E E E E
    hybrid-sd        C C C E E E E E        the cloud lays out semantics, the edge refines (k steps)
    ec-diff          C C C f C f E E        EC-Diff: cloud with K-step forecasting up to step s, then edge
    preview-refine   E E E E E E E E | C C   DiffusionX: an edge preview, re-noised to `strength` and
                                             refined by the cloud to the end
"""
from dataclasses import dataclass, field

import msgpack

from .fields import FieldError, need_bool, need_int, need_list, need_map, need_number, need_scalar, need_str

SIDES = ("cloud", "edge")
FORECASTERS = ("ecdiff", "taylor")
MAX_STEPS = 10_000  # a schedule longer than any sampler runs; receivers set their own (ServingLimits)
MAX_SEGMENTS = 64
MAX_PARAMS = 16
MAX_NAME_CHARS = 64
MAX_FORECAST_ARGS = 3  # ("taylor", order, k, variable)
MAX_FORECAST_VALUE = 1e6
MAX_GAPS = 64  # kernels.extrapolate.MAX_GAPS: a forecaster's k as a list of gaps (uneven spacing)


class PlanError(ValueError):
    """A plan that cannot run: the text says which part and how to fix it."""


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) run by ``side``. forecast: () for a model call at every step, or
    ("ecdiff", p, k, a) / ("taylor", order, k, variable), k an int (one real call every k + 1 steps) or a
    tuple of gaps (where the calls fall: kernels.extrapolate). renoise: the segment first re-noises the latent it
    receives (taken as a clean x_0) to the noise level of step ``start`` (preview-refine)."""

    side: str
    start: int
    stop: int
    forecast: tuple = ()
    renoise: bool = False


@dataclass(frozen=True)
class Plan:
    name: str
    num_steps: int
    segments: tuple
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check(self)

    def labels(self):
        """Per executed step, in order: (step index, 'cloud' | 'edge' | 'forecast')."""
        out = []
        for seg in self.segments:
            fc = forecaster(seg)
            for i in range(seg.start, seg.stop):
                real = fc is None or fc.is_real(i - seg.start)
                out.append((i, seg.side if real else "forecast"))
        return out

    def crossings(self):
        """Indices into ``segments`` where the latent crosses the network (the side changes)."""
        return [j for j in range(1, len(self.segments)) if self.segments[j].side != self.segments[j - 1].side]

    def __str__(self):
        marks = {"cloud": "C", "edge": "E", "forecast": "f"}
        labels = iter(self.labels())
        parts = [("~" if seg.renoise else "") + "".join(marks[next(labels)[1]] for _ in range(seg.start, seg.stop))
                 for seg in self.segments]
        return f"{self.name} {self.params} [{' | '.join(parts)}]"  # ~: re-noised; f: forecast

    def to_plain(self):
        """The plan as msgpack-native values: what travels inside a session."""
        return {"name": self.name, "num_steps": self.num_steps, "params": dict(self.params),
                "segments": [[s.side, s.start, s.stop, [list(v) if type(v) is tuple else v for v in s.forecast],
                              s.renoise] for s in self.segments]}

    @classmethod
    def from_plain(cls, d, field="plan", max_steps=MAX_STEPS):
        """A plan from msgpack-native values, every field checked by type and range (a FieldError names
        the field) before it is built; max_steps: the longest schedule accepted (a receiver's limit, a
        FieldError with code 'limit' past it), checked before anything is built."""
        need_map(field, d, 4, required=("name", "num_steps", "segments"), optional=("params",))
        name = need_str(f"{field}.name", d["name"], MAX_NAME_CHARS)
        n = need_int(f"{field}.num_steps", d["num_steps"], 1)
        if n > max_steps:
            raise FieldError(f"{field}.num_steps", n, f"at most {max_steps} steps (this receiver's limit)", "limit")
        params = need_map(f"{field}.params", d.get("params", {}), MAX_PARAMS)
        for k, v in params.items():
            need_scalar(f"{field}.params.{k}", v, MAX_NAME_CHARS)
        segments = []
        for j, seg in enumerate(need_list(f"{field}.segments", d["segments"], MAX_SEGMENTS, 1)):
            where = f"{field}.segments.{j}"
            side, start, stop, fc, renoise = need_list(where, seg, 5, 5)
            fc = list(need_list(f"{where}.forecast", fc, 1 + MAX_FORECAST_ARGS))  # a copy: a gap list becomes a tuple
            if fc:
                need_str(f"{where}.forecast.0", fc[0], MAX_NAME_CHARS, FORECASTERS)
                for k, v in enumerate(fc[1:], 1):
                    if type(v) is str:
                        need_str(f"{where}.forecast.{k}", v, MAX_NAME_CHARS)
                    elif type(v) is list:  # uneven spacing: the gaps between real calls (kernels.extrapolate)
                        fc[k] = tuple(need_int(f"{where}.forecast.{k}.{g}", x, 0, MAX_STEPS)
                                      for g, x in enumerate(need_list(f"{where}.forecast.{k}", v, MAX_GAPS, 1)))
                    else:
                        need_number(f"{where}.forecast.{k}", v, -MAX_FORECAST_VALUE, MAX_FORECAST_VALUE)
            segments.append(Segment(need_str(f"{where}.side", side, MAX_NAME_CHARS, SIDES),
                                    need_int(f"{where}.start", start, 0, n), need_int(f"{where}.stop", stop, 0, n),
                                    tuple(fc), need_bool(f"{where}.renoise", renoise)))
        try:
            return cls(name, n, tuple(segments), params)  # check() says what is wrong with their order
        except PlanError as e:
            raise FieldError.because(f"{field}.segments", str(e)) from None

    def to_msgpack(self):
        return msgpack.packb(self.to_plain(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data):
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise PlanError(f"not a serialized plan ({type(e).__name__}: {e})") from None
        try:
            return cls.from_plain(d)
        except FieldError as e:
            raise PlanError(f"not a serialized plan ({e})") from None


def forecaster(seg):
    """The kernels' forecaster for a segment (steps counted from the segment's start), or None."""
    if not seg.forecast:
        return None
    from latentwire.kernels import ECDiff, Taylor

    kind, *args = seg.forecast
    return ECDiff(*args) if kind == "ecdiff" else Taylor(*args)


def check(plan):
    """Raise PlanError unless the plan's segments are well formed."""
    n = plan.num_steps
    if type(n) is not int or n < 1:
        raise PlanError(f"plan {plan.name!r}: num_steps must be a positive int, got {n!r}")
    if not plan.segments:
        raise PlanError(f"plan {plan.name!r} has no segments")
    expected = 0
    for j, seg in enumerate(plan.segments):
        where = f"plan {plan.name!r} segment {j}"
        if seg.side not in SIDES:
            raise PlanError(f"{where}: side must be one of {SIDES}, got {seg.side!r}")
        if not (type(seg.start) is int and type(seg.stop) is int and 0 <= seg.start < seg.stop <= n):
            raise PlanError(f"{where}: steps [{seg.start}, {seg.stop}) are not a non-empty range within 0..{n}")
        if seg.renoise:
            if j == 0:
                raise PlanError(f"{where}: the first segment has no latent to re-noise")
            if any(s.renoise for s in plan.segments[:j]):  # else a plan could redo its schedule without bound
                raise PlanError(f"{where}: a plan re-noises at most once (preview-refine's refine)")
        elif seg.start != expected:
            raise PlanError(f"{where}: starts at step {seg.start}, but the plan is at step {expected}; "
                            "segments must follow each other (only a re-noising segment may go back)")
        if seg.forecast:
            if seg.forecast[0] not in FORECASTERS:
                raise PlanError(f"{where}: forecast must be one of {FORECASTERS}, got {seg.forecast[0]!r}")
            try:
                forecaster(seg)
            except (TypeError, ValueError) as e:
                raise PlanError(f"{where}: {e}") from None
        expected = seg.stop
    if expected != n:
        raise PlanError(f"plan {plan.name!r} ends at step {expected} of {n}: the last segment must reach the end")


def _steps(num_steps, name, value, lo, hi):
    if type(value) is not int or not lo <= value <= hi:
        raise PlanError(f"{name}: {value!r} is outside {lo}..{hi} for a {num_steps}-step schedule")
    return value


def cloud_only(num_steps):
    return Plan("cloud-only", num_steps, (Segment("cloud", 0, num_steps),))


def edge_only(num_steps):
    return Plan("edge-only", num_steps, (Segment("edge", 0, num_steps),))


def hybrid_sd(num_steps, k=None):
    """Hybrid SD: the cloud runs the first k steps (default: the first 40%), the edge the rest."""
    k = round(0.4 * num_steps) if k is None else k
    _steps(num_steps, "hybrid-sd k (cloud steps)", k, 1, num_steps - 1)
    return Plan("hybrid-sd", num_steps, (Segment("cloud", 0, k), Segment("edge", k, num_steps)), {"k": k})


# EC-Diff's published settings, at 50 steps (its public code): p real cloud steps, then one real call every k + 1
# with slope scale a, handing off to the edge at step s. SD (model/sd.py, DDIM): 17 cloud calls, 20 forecast
# steps, 13 edge steps. SDXL: its code hands off at 35 with s = 36. CogVideoX: trailing spacing, v-prediction.
EC_DIFF_PRESETS = {"sd": dict(p=7, k=2, a=0.3, s=37), "sdxl": dict(p=6, k=5, a=0.2, s=36),
                   "cogvideox": dict(p=10, k=3, a=0.2, s=38)}
EC_DIFF_PRESET_STEPS = 50


def ec_diff(num_steps, p=None, k=None, a=None, s=None, preset="sd"):
    """EC-Diff: the cloud runs steps 0..s-1, calling its model at the first p and then every k+1
    (forecasting between), the edge the rest. Defaults: ``preset``'s (EC_DIFF_PRESETS, EC-Diff's published
    settings at 50 steps; "sd": p=7, k=2, a=0.3, s=37), p and s scaled to num_steps (p at least 2, s within
    p..num_steps-1); k and a as published. EC-Diff's rule is stable only for a*k < 1 (bench/README.md)."""
    if preset not in EC_DIFF_PRESETS:
        raise PlanError(f"ec-diff preset {preset!r}: one of {', '.join(EC_DIFF_PRESETS)}")
    d = EC_DIFF_PRESETS[preset]
    scale = num_steps / EC_DIFF_PRESET_STEPS
    p = max(2, round(d["p"] * scale)) if p is None else p
    k = d["k"] if k is None else k
    a = d["a"] if a is None else a
    s = min(max(round(d["s"] * scale), p), num_steps - 1) if s is None else s
    _steps(num_steps, "ec-diff s (switch step)", s, max(p, 1), num_steps - 1)
    return Plan("ec-diff", num_steps, (Segment("cloud", 0, s, ("ecdiff", p, k, a)), Segment("edge", s, num_steps)),
                {"p": p, "k": gaps_text(k), "a": a, "s": s})


def gaps_text(k):
    """A forecaster's k as a plan parameter (a scalar): the int, or uneven gaps as "1,2,3"."""
    return ",".join(map(str, k)) if type(k) is tuple else k


def preview_refine(num_steps, strength=0.5):
    """DiffusionX: the edge runs every step for a preview; the cloud re-noises it to ``strength`` (the
    share of the schedule redone) and denoises to the end."""
    if not 0 < strength <= 1:
        raise PlanError(f"preview-refine strength must be in (0, 1], got {strength!r}")
    start = num_steps - max(1, round(strength * num_steps))
    return Plan("preview-refine", num_steps,
                (Segment("edge", 0, num_steps), Segment("cloud", start, num_steps, renoise=True)),
                {"strength": strength})


BUILT_IN = {"cloud-only": cloud_only, "edge-only": edge_only, "hybrid-sd": hybrid_sd, "ec-diff": ec_diff,
            "preview-refine": preview_refine}


def make(name, num_steps, **params):
    """A built-in plan by name, with its parameters."""
    if name not in BUILT_IN:
        raise PlanError(f"unknown plan {name!r}; built in: {', '.join(BUILT_IN)}")
    try:
        return BUILT_IN[name](num_steps, **params)
    except TypeError as e:
        raise PlanError(f"plan {name!r}: {e}") from None
