"""Adaptive steps and scale: for a request's target resolution and latency budget, the edge's denoising
steps and the SR scale (the paper's first decision), from the cost model and a quality model measured on
the world.

    choice = choose(target_factor=4, budget_s=3.0, quality=load_quality(), latency=fn)

How. Each candidate is (steps N, scale S) with S >= target_factor (the output is at least the target; a
larger one is downsampled). Its quality is the world's measurement (QUALITY_PATH, written by
``bench/hybrid_sr_table.py --quality``): the share of generated-then-upscaled images the judges find right
in every attribute and in texture, at N edge steps and scale S. Its latency is ``latency(N, S)``: the
caller's prediction (bench/hybrid_sr_table.py uses the cost model: the edge's N steps, then predict_sr).
The choice is the best quality whose predicted latency is within the budget, the faster on a tie; if
none is within it, the fastest candidate, with ``within_budget`` False.
"""
import json
import os
from dataclasses import dataclass

QUALITY_PATH = os.path.join(os.path.dirname(__file__), "quality.json")


@dataclass(frozen=True)
class Choice:
    steps: int
    scale: int
    latency_s: float
    quality: float
    within_budget: bool
    candidates: tuple  # (steps, scale, latency_s, quality) for every candidate, in the order tried

    @property
    def pick(self):
        return self.steps, self.scale


def load_quality(path=QUALITY_PATH):
    """{(steps, scale): quality} from a quality file: {"rows": [{"steps", "scale", "quality"}, ...]}. The
    shipped one measured 16 scenes only (its "command"): a coarse model, enough to order the candidates."""
    with open(path) as f:
        d = json.load(f)
    rows = d.get("rows") if isinstance(d, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected {{\"rows\": [{{\"steps\": N, \"scale\": S, \"quality\": Q}}, ...]}}")
    out = {}
    for i, r in enumerate(rows):
        steps, scale, q = (r.get(k) if isinstance(r, dict) else None for k in ("steps", "scale", "quality"))
        if type(steps) is not int or steps < 1 or type(scale) is not int or scale < 1 or \
                type(q) not in (int, float) or not 0 <= q <= 1:
            raise ValueError(f"{path}: rows.{i} must have int steps >= 1, int scale >= 1 and quality in [0, 1], "
                             f"got {r!r}")
        out[(steps, scale)] = float(q)
    return out


def choose(target_factor, budget_s, quality, latency):
    """The (steps, scale) to run -> Choice; quality {(steps, scale): q}; latency(steps, scale) -> seconds."""
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s!r}")
    tried = [(n, s, float(latency(n, s)), q) for (n, s), q in sorted(quality.items()) if s >= target_factor]
    if not tried:
        raise ValueError(f"no measured scale reaches x{target_factor} (measured: "
                         f"{sorted({s for _, s in quality})})")
    fits = [c for c in tried if c[2] <= budget_s]
    if fits:
        best = max(fits, key=lambda c: (c[3], -c[2]))
    else:
        best = min(tried, key=lambda c: c[2])
    return Choice(best[0], best[1], best[2], best[3], bool(fits), tuple(tried))
