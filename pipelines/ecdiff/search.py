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

    stage 1   s over a grid of switch steps, (p, k, a) at the preset's (EC-Diff's, scaled to N steps); if
              no s meets the bound so, the same without forecasting (k = 0: every cloud step real)
    stage 2   (p, k, a) over a grid at stage 1's s, those with a * k < 1 (EC-Diff's rule is unstable past
              that: bench/README.md); with forecasters=("ecdiff", "taylor"), beyond EC-Diff, also
              latentwire's Taylor forecasters at that s: orders 1-3, in t or in sigma, every k + 1 steps

``budget`` caps the quality measurements (cloud-only's reference counts as one). If the best plan found is
slower than cloud-only itself (an edge slower than the cloud, and no forecasting the bound allows), the
answer is cloud-only. A plan found is an ordinary
Plan: ``plan.to_plain()`` is the file `latentwire edge/eval/cost --plan-file` read.
"""
from dataclasses import dataclass, field, replace

from latentwire.scheduler.plan import Plan, PlanError, Segment, ec_diff, make

DEFAULT_BUDGET = 12
DEFAULT_MIN_QUALITY = 0.95
K_GRID = (1, 2, 3, 4, 5)
A_GRID = (0.1, 0.2, 0.3, 0.5, 0.7)
P_OFFSETS = (-2, 0, 2)  # around the preset's p (scaled), p >= 2
TAYLOR_ORDERS = (1, 2, 3)
TAYLOR_VARIABLES = ("t", "sigma")
FORECASTERS = ("ecdiff", "taylor")


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

    def to_plain(self):
        return {"plan": str(self.plan), "params": dict(self.plan.params), "stage": self.stage,
                "latency_s": self.latency_s, "cloud_gpu_s": self.cloud_gpu_s, "quality": self.quality,
                "share": self.share, "confirmed": self.confirmed, "confirmed_share": self.confirmed_share}


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
           s_grid=None, forecasters=("ecdiff",), confirm=None):
    """The two-stage greedy search over ec-diff plans of ``num_steps`` steps -> Result.

    cost(plan) -> a scheduler.cost Cost (latency_s, cloud_gpu_s); judge(plan) -> a quality dict with
    attribute_accuracy and frechet_distance (pipelines.evaluate.evaluate_plan's). s_grid: the switch steps
    stage 1 tries (default: every step from the preset's p + 1 to num_steps - 1 in about 10 even strides).
    forecasters: those stage 2 searches over, from FORECASTERS (ecdiff: EC-Diff's own). confirm(plan) -> a
    quality dict on more prompts than judge's: a candidate that meets the bound on judge's prompts is
    accepted only if it also meets it there (against cloud-only's, confirmed once); a small prompt set's
    Fréchet distance is too noisy to hold a 95% bound alone. Each confirmation counts against the budget."""
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

    def first_feasible(plans, stage):
        ranked = sorted((Trial(p, c.latency_s, c.cloud_gpu_s, stage) for p in plans for c in [cost(p)]),
                        key=lambda t: (t.latency_s, t.cloud_gpu_s))
        for t in ranked:
            if spent["n"] >= budget and t.plan.segments not in measured:
                return None
            q = measure(t.plan)
            t = Trial(t.plan, t.latency_s, t.cloud_gpu_s, stage, q, share(q, reference))
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
        return None

    if s_grid is None:
        lo, hi = p0 + 1, num_steps - 1
        stride = max(1, round((hi - lo) / 10))
        s_grid = sorted({*range(lo, hi + 1, stride), hi})
    stage1 = [plan for s in s_grid for plan in _plans(num_steps, p0, k0, a0, s)]
    if not stage1:
        raise SearchError(f"s_grid {list(s_grid)}: no valid ec-diff plan (s must be in {p0}..{num_steps - 1})")
    best = first_feasible(stage1, 1)
    if best is None:  # no switch step works at the preset's forecasting: where can the edge take over at all?
        best = first_feasible([plan for s in s_grid for plan in _plans(num_steps, p0, 0, a0, s)], 1)
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
    # cloud-only meets any bound (it is the reference): a split slower than it is no answer
    alone = make("cloud-only", num_steps)
    c = cost(alone)
    if (c.latency_s, c.cloud_gpu_s) < (best.latency_s, best.cloud_gpu_s):
        best = Trial(alone, c.latency_s, c.cloud_gpu_s, 0, reference, 1.0, confirmed.get("reference"),
                     1.0 if "reference" in confirmed else None)
    return Result(best.plan, best, reference, spent["n"], trials)


def _taylor(num_steps, order, k, variable, s):
    """EC-Diff's split with latentwire's Taylor forecaster on the cloud's steps (kernels.extrapolate.Taylor:
    order + 1 real calls first, then one every k + 1)."""
    return Plan("ec-diff-taylor", num_steps, (Segment("cloud", 0, s, ("taylor", order, k, variable)),
                                              Segment("edge", s, num_steps)),
                {"order": order, "k": k, "variable": variable, "s": s})


def _plans(num_steps, p, k, a, s):
    try:
        return [ec_diff(num_steps, p=p, k=k, a=a, s=s)]
    except PlanError:
        return []
