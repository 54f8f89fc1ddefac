"""EC-Diff's handoff search: the plan with the least predicted latency whose measured quality is within a
bound of cloud-only's.

EC-Diff (the paper) picks its switch step s and its forecasting parameters (k, a) by "a two-stage greedy
search"; its public code has no search. This is one, with its objective stated:

    minimise    latency_s(plan)                        the cost model (scheduler/cost), for named profiles
    subject to  share(plan) >= min_quality             share = min(accuracy / cloud-only's accuracy,
                                                                  cloud-only's Fréchet distance / its own)

quality measured by ``judge(plan)`` (on the world: pipelines/evaluate.py), which is the expensive part; the
cost model is arithmetic. So each stage orders its candidates by predicted latency and measures them in
that order until one meets the bound: the first that does is the stage's best (no candidate of lower
latency is feasible), after as few measurements as the bound allows.

    stage 1   s over a grid of switch steps (with handoff_optional also s = N: no edge steps), (p, k, a) at the preset's (EC-Diff's, scaled to N steps); if
              no s meets the bound so, the same without forecasting (k = 0: every cloud step real)
    stage 2   (p, k, a) over a grid at stage 1's s, those with a * k < 1 (EC-Diff's rule is unstable past
              that: bench/README.md); with forecasters=("ecdiff", "taylor"), beyond EC-Diff, also
              latentwire's Taylor forecasters at that s: orders 1-3, in t or in sigma, every k + 1 steps

    stage 3   (with spacing=True, beyond EC-Diff) where the cloud's calls fall: stage 2's forecaster at its
              s, with 1 to SPACING_EXTRA more forecast steps than its best, placed evenly, early or late
              in the cloud's steps (kernels.extrapolate's gaps, not EC-Diff's fixed cycle)

With ``rank(plan)``, a cheap proxy for quality lost (latentwire search's: the final latent's distance from
cloud-only's on a few prompts, no judge), the search does two things more. Candidates of equal predicted
latency (the same calls, placed differently) are measured in its order, the likeliest to pass first. And a
candidate whose proxy is SCREEN_MARGIN times or more that of one measured and failed at the same switch step
s (so with the same edge steps after it) is screened out unmeasured. The margin is there because the proxy
is a latent distance and the bound is on a distribution (the Fréchet distance): on the world's exact
denoiser, Taylor order 1 in sigma came 0.027 from cloud-only's latents and failed (0.94) where EC-Diff's rule
at 0.042 passed (0.99); without a margin the first screened out the second. No candidate at twice a
failure's proxy passed in any measurement there (bench/README.md). It is a heuristic all the same: on the
trained world cloud EC-Diff's rule at p = 2, k = 1 (10 calls) came 0.025 from cloud-only's latents and failed
(0.94) while Taylor order 1 in t at k = 3 (6 calls) came 0.113 and passed (1.00); measured in latency order
the cheaper one came first and nothing was lost, but a screen can throw away the answer (screen_margin=0
turns it off).

``budget`` caps the quality measurements (cloud-only's reference counts as one). If the best plan found is
slower than cloud-only itself (an edge slower than the cloud, and no forecasting the bound allows), the
answer is cloud-only. A plan found is an ordinary
Plan: ``plan.to_plain()`` is the file `latentwire edge/eval/cost --plan-file` read.
"""
from dataclasses import dataclass, field, replace

from latentwire.kernels.extrapolate import max_gap
from latentwire.scheduler.plan import Plan, PlanError, Segment, ec_diff, gaps_text, make

DEFAULT_BUDGET = 12
DEFAULT_MIN_QUALITY = 0.95
K_GRID = (1, 2, 3, 4, 5)
A_GRID = (0.1, 0.2, 0.3, 0.5, 0.7)
P_OFFSETS = (-2, 0, 2)  # around the preset's p (scaled), p >= 2
TAYLOR_ORDERS = (1, 2, 3)
TAYLOR_VARIABLES = ("t", "sigma")
FORECASTERS = ("ecdiff", "taylor")
SCREEN_MARGIN = 2.0  # a candidate this many times a failure's proxy (at its switch step) is not measured
SPACING_EXTRA = 3  # stage 3: up to this many more forecast steps than stage 2's best
# stage 3's placements: forecast j of f at the quantile ((j + 0.5) / f) ** power of the cloud's steps after its
# warm-up, so 1 spreads them evenly, 2 packs them early (high noise), 0.5 late (near the handoff)
PLACEMENTS = {"even": 1.0, "early": 2.0, "late": 0.5}


class SearchError(ValueError):
    """A search that cannot run as asked: the text says which input and what to do."""


@dataclass(frozen=True)
class Trial:
    """One candidate: its predicted cost, and its quality if it was measured (None: not measured)."""

    plan: object
    latency_s: float
    cloud_gpu_s: float
    stage: int
    quality: dict = None
    share: float = None
    confirmed: dict = None  # its quality on the confirmation prompts, if it passed on the search's
    confirmed_share: float = None
    proxy: float = None      # rank(plan), where the search computed it
    screened: bool = False   # skipped unmeasured: its proxy was SCREEN_MARGIN x a failure's at its switch step

    def to_plain(self):
        return {"plan": str(self.plan), "params": dict(self.plan.params), "stage": self.stage,
                "latency_s": self.latency_s, "cloud_gpu_s": self.cloud_gpu_s, "quality": self.quality,
                "share": self.share, "confirmed": self.confirmed, "confirmed_share": self.confirmed_share,
                "proxy": self.proxy, "screened": self.screened}


@dataclass
class Result:
    """The search's answer: the best plan found (None if none met the bound), cloud-only's reference
    quality, the evaluations spent and every trial in the order measured."""

    plan: object
    trial: Trial
    reference: dict
    evaluations: int
    trials: list = field(default_factory=list)

    def to_plain(self):
        t = self.trial
        return {"plan": None if self.plan is None else self.plan.to_plain(),
                "plan_text": None if self.plan is None else str(self.plan),
                "quality": None if t is None else t.quality, "share": None if t is None else t.share,
                "latency_s": None if t is None else t.latency_s, "cloud_gpu_s": None if t is None else t.cloud_gpu_s,
                "confirmed": None if t is None else t.confirmed,
                "confirmed_share": None if t is None else t.confirmed_share,
                "reference": self.reference, "evaluations": self.evaluations,
                "trials": [x.to_plain() for x in self.trials]}


def share(quality, reference):
    """How much of cloud-only's quality a plan keeps: the lesser of its attribute accuracy as a share of
    cloud-only's and cloud-only's Fréchet distance as a share of its own (1: as good; lower: worse)."""
    acc = quality["attribute_accuracy"] / max(reference["attribute_accuracy"], 1e-12)
    fd = reference["frechet_distance"] / max(quality["frechet_distance"], 1e-12)
    return min(acc, fd)


def search(num_steps, cost, judge, *, min_quality=DEFAULT_MIN_QUALITY, budget=DEFAULT_BUDGET, preset="sd",
           s_grid=None, forecasters=("ecdiff",), confirm=None, spacing=False, rank=None, handoff_optional=False,
           screen_margin=SCREEN_MARGIN):
    """The two-stage greedy search over ec-diff plans of ``num_steps`` steps -> Result.

    cost(plan) -> a scheduler.cost Cost (latency_s, cloud_gpu_s); judge(plan) -> a quality dict with
    attribute_accuracy and frechet_distance (pipelines.evaluate.evaluate_plan's). s_grid: the switch steps
    stage 1 tries (default: every step from the preset's p + 1 to num_steps - 1 in about 10 even strides).
    forecasters: those stage 2 searches over, from FORECASTERS (ecdiff: EC-Diff's own). confirm(plan) -> a
    quality dict on more prompts than judge's: a candidate that meets the bound on judge's prompts is
    accepted only if it also meets it there (against cloud-only's, confirmed once); a small prompt set's
    Fréchet distance is too noisy to hold a 95% bound alone. Each confirmation counts against the budget.
    spacing: run stage 3 (where the calls fall). handoff_optional: stage 1 also tries s = num_steps (the cloud
    forecasts to the end, no edge steps: beyond EC-Diff, for an edge slower than the cloud). screen_margin: the
    screen's factor (0 or None: no screen, the proxy only breaks ties). rank(plan) -> float: the tie-break among candidates of equal
    predicted latency, lower first (not counted against the budget: it must be cheap)."""
    if type(num_steps) is not int or num_steps < 4:
        raise SearchError(f"num_steps {num_steps!r}: an int >= 4 (EC-Diff needs p >= 2 real steps, a forecast "
                          "and an edge step)")
    if not 0 < min_quality <= 1:
        raise SearchError(f"min_quality {min_quality!r}: a share of cloud-only's quality in (0, 1]")
    if not forecasters or any(f not in FORECASTERS for f in forecasters):
        raise SearchError(f"forecasters {forecasters!r}: one or more of {', '.join(FORECASTERS)}")
    if type(budget) is not int or budget < 2:
        raise SearchError(f"budget {budget!r}: at least 2 quality measurements (cloud-only's reference and one "
                          "candidate)")
    base = ec_diff(num_steps, preset=preset)
    p0, k0, a0 = base.params["p"], base.params["k"], base.params["a"]
    spent = {"n": 0}
    trials, measured, confirmed = [], {}, {}

    def measure(plan):
        key = plan.segments
        if key not in measured:
            spent["n"] += 1
            measured[key] = judge(plan)
        return measured[key]

    reference = measure(make("cloud-only", num_steps))
    ranks = {}
    failed = {}  # switch step s -> the least proxy of a candidate there that failed the bound (measured)

    def ranked_by(plan):
        if plan.segments not in ranks:
            ranks[plan.segments] = rank(plan)
        return ranks[plan.segments]

    def first_feasible(plans, stage):
        tie = lambda t: (round(t.latency_s, 9), round(t.cloud_gpu_s, 9))  # noqa: E731 (sums in another order)
        ranked = sorted((Trial(p, c.latency_s, c.cloud_gpu_s, stage) for p in plans for c in [cost(p)]), key=tie)
        if rank is not None:
            ranked = _break_ties(ranked, tie, ranked_by)
        for t in ranked:
            where = t.plan.params.get("s")
            proxy = None if rank is None else ranked_by(t.plan)
            if proxy is not None and screen_margin and where in failed and proxy >= screen_margin * failed[where]:
                trials.append(replace(t, proxy=proxy, screened=True))  # dominated by a measured failure
                continue
            if spent["n"] >= budget and t.plan.segments not in measured:
                return None
            q = measure(t.plan)
            t = Trial(t.plan, t.latency_s, t.cloud_gpu_s, stage, q, share(q, reference), proxy=proxy)
            if t.share >= min_quality and confirm is not None:
                key = t.plan.segments
                if spent["n"] + (key not in confirmed) + ("reference" not in confirmed) > budget:
                    trials.append(t)
                    return None
                for k, plan in (("reference", make("cloud-only", num_steps)), (key, t.plan)):
                    if k not in confirmed:
                        spent["n"] += 1
                        confirmed[k] = confirm(plan)
                t = replace(t, confirmed=confirmed[key],
                            confirmed_share=share(confirmed[key], confirmed["reference"]))
            trials.append(t)
            if t.share >= min_quality and (confirm is None or t.confirmed_share >= min_quality):
                return t
            if proxy is not None:
                failed[where] = min(failed.get(where, proxy), proxy)
        return None

    if s_grid is None:
        lo, hi = p0 + 1, num_steps - 1
        stride = max(1, round((hi - lo) / 10))
        s_grid = sorted({*range(lo, hi + 1, stride), hi} | ({num_steps} if handoff_optional else set()))
    stage1 = [plan for s in s_grid for plan in _plans(num_steps, p0, k0, a0, s)]
    if not stage1:
        raise SearchError(f"s_grid {list(s_grid)}: no valid ec-diff plan (s must be in {p0}..{num_steps - 1}, or "
                          f"{num_steps} with handoff_optional)")
    best = first_feasible(stage1, 1)
    if best is None:  # no switch step works at the preset's forecasting: where can the edge take over at all?
        best = first_feasible([plan for s in s_grid if s < num_steps for plan in _plans(num_steps, p0, 0, a0, s)], 1)
    if best is None:
        return Result(None, None, reference, spent["n"], trials)
    s = best.plan.params["s"]
    stage2 = [plan for k in K_GRID for a in A_GRID if a * k < 1 for dp in P_OFFSETS
              for plan in _plans(num_steps, max(2, p0 + dp), k, a, s)] if "ecdiff" in forecasters else []
    if "taylor" in forecasters:
        stage2 += [_taylor(num_steps, order, k, v, s) for order in TAYLOR_ORDERS for k in K_GRID
                   for v in TAYLOR_VARIABLES if order + 1 < s]
    second = first_feasible(stage2 + [best.plan], 2)
    if second is not None and (second.latency_s, second.cloud_gpu_s) < (best.latency_s, best.cloud_gpu_s):
        best = second
    if spacing:
        stage3 = _placements(num_steps, best.plan, p0, a0, "taylor" in forecasters)
        third = first_feasible(stage3 + [best.plan], 3) if stage3 else None
        if third is not None and (third.latency_s, third.cloud_gpu_s) < (best.latency_s, best.cloud_gpu_s):
            best = third
    # cloud-only meets any bound (it is the reference): a split slower than it is no answer
    alone = make("cloud-only", num_steps)
    c = cost(alone)
    if (c.latency_s, c.cloud_gpu_s) < (best.latency_s, best.cloud_gpu_s):
        best = Trial(alone, c.latency_s, c.cloud_gpu_s, 0, reference, 1.0, confirmed.get("reference"),
                     1.0 if "reference" in confirmed else None)
    return Result(best.plan, best, reference, spent["n"], trials)


def _break_ties(ranked, tie, rank):
    """``ranked`` with each run of equal ``tie`` keys ordered by ``rank`` (lowest first), lazily: a run is
    ranked only when the search reaches it (the stage may end before)."""
    groups = {}
    for t in ranked:
        groups.setdefault(tie(t), []).append(t)
    for group in groups.values():
        yield from sorted(group, key=lambda t: rank(t.plan)) if len(group) > 1 else group


def _taylor(num_steps, order, k, variable, s):
    """EC-Diff's split with latentwire's Taylor forecaster on the cloud's steps (kernels.extrapolate.Taylor:
    order + 1 real calls first, then one every k + 1, or k a tuple of gaps)."""
    forecast, params = ("taylor", order, k, variable), {"order": order, "k": gaps_text(k), "variable": variable}
    if s == num_steps:
        return _whole(num_steps, forecast, params)
    return Plan("ec-diff-taylor", num_steps, (Segment("cloud", 0, s, forecast), Segment("edge", s, num_steps)),
                {**params, "s": s})


def placed_gaps(warmup, steps, forecasts, power):
    """The gaps (kernels.extrapolate's tuple k) that put ``forecasts`` forecast steps among the ``steps`` cloud
    steps after ``warmup`` real ones, forecast j at the quantile ((j + 0.5) / forecasts) ** power (a taken
    slot moves to the nearest free one) -> tuple, or None if they do not fit (at least one real call)."""
    free = steps - warmup
    if not 0 < forecasts < free:
        return None
    taken = set()
    for j in range(forecasts):
        want = min(free - 1, int(((j + 0.5) / forecasts) ** power * free))
        slot = min((x for x in range(free) if x not in taken), key=lambda x: (abs(x - want), x))
        taken.add(slot)
    gaps, run = [], 0
    for x in range(free):
        if x in taken:
            run += 1
        else:
            gaps.append(run)
            run = 0
    return tuple(gaps + [run]) if run else tuple(gaps)  # a last gap reaching past the segment: all forecasts


def _forecasts(plan):
    return sum(1 for _, label in plan.labels() if label == "forecast")


def _placements(num_steps, plan, p0, a0, taylor):
    """Stage 3's candidates: ``plan``'s forecaster (EC-Diff's at the preset's p and a, and Taylor order 1 in
    sigma if allowed, when the plan forecasts nothing) with 1..SPACING_EXTRA more forecast steps, each placed
    per PLACEMENTS."""
    if plan.segments[0].side != "cloud" or "s" not in plan.params:  # cloud-only: nothing to place
        return []
    s, seg = plan.params["s"], plan.segments[0]
    kinds = [seg.forecast] if seg.forecast and max_gap(seg.forecast[2]) > 0 else \
        [("ecdiff", p0, 0, a0)] + ([("taylor", 1, 0, "sigma")] if taylor else [])
    out = []
    for kind, first, _, third in kinds:
        warmup = first if kind == "ecdiff" else first + 1
        for f in range(_forecasts(plan) + 1, _forecasts(plan) + SPACING_EXTRA + 1):
            for power in PLACEMENTS.values():
                gaps = placed_gaps(warmup, s, f, power)
                if gaps is None or (kind == "ecdiff" and third * max_gap(gaps) >= 1):
                    continue
                out += (_plans(num_steps, first, gaps, third, s) if kind == "ecdiff"
                        else [_taylor(num_steps, first, gaps, third, s)])
    return list({p.segments: p for p in out}.values())


def _plans(num_steps, p, k, a, s):
    if s == num_steps:  # no handoff: the cloud forecasts to the end (handoff_optional)
        return [] if p >= s else [_whole(num_steps, ("ecdiff", p, k, a), {"p": p, "k": gaps_text(k), "a": a})]
    try:
        return [ec_diff(num_steps, p=p, k=k, a=a, s=s)]
    except PlanError:
        return []


def _whole(num_steps, forecast, params):
    """Every step on the cloud, forecasting: EC-Diff's cloud part without the handoff."""
    return Plan("cloud-forecast", num_steps, (Segment("cloud", 0, num_steps, forecast),), {**params, "s": num_steps})
