"""K-step noise extrapolation against ground truth: forecast and final-sample errors of EC-Diff's rule and
Taylor forecasts when the model is the exact denoiser of a Gaussian mixture.

    .venv/bin/python bench/extrapolation.py            # markdown on stdout, ~10 s on one core
    .venv/bin/python bench/extrapolation.py --steps 25 50 100 200

The model is eps*(x_t, t) = E[eps | x_t] of a Gaussian-mixture data distribution (pipelines/gmm.py), so
the run that calls it at every step is the sampler's exact trajectory, and every error below is the
forecast's alone. For each scheduler and N steps, each forecaster (EC-Diff's rule ECDiff(p=3, k, a=1),
Taylor(order, k), k = 1..5 skipped steps between real calls) reports:

- calls: model calls in the N-step run;
- forecast err: |eps_hat - eps*(x_t)| / |eps*(x_t)| at each skipped step, at the x_t the forecasting run is
  actually at (L2 over the batch), averaged over the skipped steps; and the largest one;
- final err: |x_0 - x_0^ref| / |x_0^ref| against the N-step every-call reference (batch of 8);
- baseline err: the same for the scheduler run with N' = calls steps and no forecast, against the same
  N-step reference. That is the fair comparison: the same number of model calls spent on a coarser grid.
  `fc / base` < 1 means forecasting beat simply taking fewer steps.

Schedulers: DDIM (eta 0) with Stable Diffusion's config (scaled_linear betas 0.00085..0.012,
clip_sample=False, set_alpha_to_one=False, "leading" spacing with steps_offset=1, whose prev timestep
t - 1000 // N is always the next timestep; "trailing" breaks that when N does not divide 1000, so the
baseline's coarser grids would carry an error of their own), and DPM-Solver++(2M) with diffusers'
defaults. Both feed the model x_t at integer timesteps that index alphas_cumprod, as the exact model
expects; Euler-type schedulers (scaled input, fractional timesteps) are left out.
"""
import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from latentwire.kernels import ECDiff, FusedSampler, Taylor, denoise
from latentwire.pipelines.gmm import GaussianMixture

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {"DDIM": "ddim", "DPM-Solver++(2M)": "dpmpp_2m"}
STEPS = (25, 50, 100)
KS = range(1, 6)
ORDERS = (1, 2, 3)
EC_P, EC_A = 3, 1.0  # EC-Diff's defaults in its public code
LATENT = (4, 16, 16)  # D = 1024
COMPONENTS = 6
BATCH = 8
MIXTURE_SEED, NOISE_SEED = 0, 1
FINE_STEPS = 500  # context: how far the N-step reference itself is from a fine grid
SIGMA_STEPS = 50  # the experiment at the end


def make_scheduler(kind, n):
    if kind == "ddim":
        s = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif kind == "dpmpp_2m":
        s = DPMSolverMultistepScheduler(**SD)
    else:
        raise ValueError(f"kind must be one of {sorted(SCHEDULERS.values())}, got {kind!r}")
    s.set_timesteps(n)
    return s


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@dataclass
class Row:
    name: str
    k: int
    calls: int
    fc_mean: float
    fc_max: float
    fc_max_t: int  # the timestep of the largest forecast error
    final: float
    baseline: float


class Study:
    """One mixture, one batch of x_T; references and baselines cached per (scheduler, N)."""

    def __init__(self):
        self.gmm = GaussianMixture.random(LATENT, COMPONENTS, MIXTURE_SEED)
        self.x_T = torch.randn((BATCH, *LATENT), generator=torch.Generator().manual_seed(NOISE_SEED))
        self._runs = {}

    def model(self, scheduler):
        abar = scheduler.alphas_cumprod
        return lambda x, i, t: self.gmm.eps(x, t, abar)

    def plain(self, kind, n):
        """x_0 of the N-step run that calls the model at every step."""
        if (kind, n) not in self._runs:
            s = make_scheduler(kind, n)
            x0, calls = denoise(FusedSampler(s), self.x_T, self.model(s))
            if calls != n:
                raise RuntimeError(f"the every-step run made {calls} calls in {n} steps")
            self._runs[kind, n] = x0
        return self._runs[kind, n]

    def forecast(self, kind, n, forecaster, name, k):
        s = make_scheduler(kind, n)
        forecasts = []  # (t, x_t, eps_hat) of every skipped step

        def keep(i, t, x_t, m, real):
            if not real:
                forecasts.append((t, x_t, m))

        x0, calls = denoise(FusedSampler(s), self.x_T, self.model(s), forecaster, callback=keep)
        errs = [(rel(m, self.gmm.eps(x, t, s.alphas_cumprod)), t) for t, x, m in forecasts]
        worst, worst_t = max(errs)
        reference = self.plain(kind, n)
        return Row(name, k, calls, sum(e for e, _ in errs) / len(errs), worst, worst_t, rel(x0, reference),
                   rel(self.plain(kind, calls), reference))

    def check_reference(self, kind, n):
        """The every-step FusedSampler run is diffusers' own scheduler loop (float32 rounding apart)."""
        s = make_scheduler(kind, n)
        x, model = self.x_T.clone(), self.model(s)
        for i, t in enumerate(s.timesteps):
            x = s.step(model(x, i, int(t)), t, x).prev_sample
        err = rel(self.plain(kind, n), x)
        if err > 1e-5:
            raise RuntimeError(f"{kind} N={n}: FusedSampler's reference is {err:.1e} from diffusers' loop")
        return err


def forecasters():
    for k in KS:
        yield f"EC-Diff p={EC_P} a={EC_A:g}", k, ECDiff(EC_P, k, EC_A)
    for order in ORDERS:
        for k in KS:
            yield f"Taylor {order}", k, Taylor(order, k)


def fmt(v):
    return f"{v:.2e}"


def ratio(a, b):
    r = a / b
    return f"{r:.2f}" if r < 100 else f"{r:.1e}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_environment(steps):
    args = " ".join(sys.argv[1:])
    print("# K-step noise extrapolation against an exact denoiser\n")
    print(f"Command: `python bench/extrapolation.py{' ' + args if args else ''}`; Python "
          f"{platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, numpy "
          f"{np.__version__}; torch threads {torch.get_num_threads()}.\n")
    print(f"Data: GaussianMixture.random({LATENT}, components={COMPONENTS}, seed={MIXTURE_SEED}) (D = "
          f"{math.prod(LATENT)}, stds in [0.2, 0.5]); batch of {BATCH} x_T ~ N(0, I), seed {NOISE_SEED}; "
          f"N = {', '.join(map(str, steps))} steps; EC-Diff p = {EC_P}, a = {EC_A:g}. Errors are relative "
          "L2 over the batch; `fc / base` is the final error over that of the baseline with the same "
          "number of model calls (< 1: forecasting wins).\n")


def print_scheduler(study, label, kind, steps):
    best = []
    for n in steps:
        check = study.check_reference(kind, n)
        fine = rel(study.plain(kind, n), study.plain(kind, FINE_STEPS))
        rows = [study.forecast(kind, n, f, name, k) for name, k, f in forecasters()]
        print(f"### {label}, N = {n}\n")
        print(f"Reference: {n}-step run, model at every step (equals diffusers' scheduler loop to {check:.0e}); "
              f"it is itself {fine:.2e} from a {FINE_STEPS}-step run.\n")
        print(table(["forecaster", "k", "calls", "forecast err mean", "forecast err max (at t)", "final err",
                     "baseline err (N' = calls)", "fc / base"],
                    [[r.name, r.k, r.calls, fmt(r.fc_mean), f"{fmt(r.fc_max)} ({r.fc_max_t})", fmt(r.final),
                      fmt(r.baseline), ratio(r.final, r.baseline)] for r in rows]))
        print()
        for k in KS:
            at_k = [r for r in rows if r.k == k]
            w = min(at_k, key=lambda r: r.final)
            ec = next(r for r in at_k if r.name.startswith("EC-Diff"))
            best.append([n, k, w.name, w.calls, fmt(w.final), ratio(w.final, w.baseline),
                         fmt(ec.final), ratio(ec.final, ec.baseline)])
    print(f"### {label}: lowest final error at each k\n")
    print(table(["N", "k", "best", "calls", "final err", "fc / base", "EC-Diff final err", "EC-Diff fc / base"],
                best))
    print()


def print_sigma_experiment(study):
    print(f"### Taylor in sigma_t instead of t (N = {SIGMA_STEPS}, final err)\n")
    print("The same Taylor forecaster with sigma_t = sqrt((1 - abar_t) / abar_t) as its variable: "
          "Taylor(order, k, variable=\"sigma\").\n")
    rows = []
    for label, kind in SCHEDULERS.items():
        for order in ORDERS:
            row = [label, order]
            for k in KS:
                in_t = study.forecast(kind, SIGMA_STEPS, Taylor(order, k), "t", k)
                in_sigma = study.forecast(kind, SIGMA_STEPS, Taylor(order, k, variable="sigma"), "s", k)
                row.append(f"{fmt(in_t.final)} / {fmt(in_sigma.final)}")
            rows.append(row)
    print(table(["scheduler", "order"] + [f"k={k}: in t / in sigma" for k in KS], rows))
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), metavar="N")
    p.add_argument("--no-sigma", action="store_true", help="skip the sigma-variable experiment")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    print_environment(args.steps)
    study = Study()
    for label, kind in SCHEDULERS.items():
        print(f"## {label}\n")
        print_scheduler(study, label, kind, args.steps)
    if not args.no_sigma:
        print_sigma_experiment(study)
    print(f"<!-- measured and printed in {time.perf_counter() - started:.0f} s -->")


if __name__ == "__main__":
    main()
