"""The per-step coefficients every fused update reads: one row per denoising step.

Every scheduler we support takes one step as the same affine map (the paper symbols of each are in
its ``table_*`` file); only the numbers in the row differ:

    m      = sum_k w_k M_k                          model output: guidance (u + g (c - u)) or a forecast
    x0     = PX x + PM m                            prediction of the clean sample, x_0
    x0     = clamp(x0, -clip, clip)                 only when the scheduler clips (DDPM's default)
    eps    = EX x + EM m + E0 x0                    the direction term (eps, or dx/dsigma, or a velocity)
    x_next = AX x + A0 x0 + AE eps + AN z + AH h    z: fresh noise; h: the previous step's x0 (DPM-Solver++)

Rows are computed once in float64 from the scheduler's own float32 schedule, then cast.
"""
from dataclasses import dataclass

import torch

PX, PM, EX, EM, E0, AX, A0, AE, AN, AH = range(10)
NCOEF = 10


class UnsupportedScheduler(ValueError):
    """A scheduler, or a configuration of one, that the fused step does not compute."""


@dataclass(frozen=True)
class StepTable:
    """coef: (steps, NCOEF) float64, row i for the step at scheduler.timesteps[i]."""

    coef: torch.Tensor
    clip: float = None  # clamp x0 to [-clip, clip], or None
    stochastic: bool = False  # some row has AN != 0: step() needs noise
    multistep: bool = False  # some row has AH != 0: step() needs the previous x0
    first_order: torch.Tensor = None  # multistep solvers: the first-order row of every step, for a
    # solver with no history yet (its first step, or a receiver that restarts after a handoff)

    @classmethod
    def from_rows(cls, rows, clip=None, first_order_rows=None):
        coef = torch.tensor(rows, dtype=torch.float64).reshape(-1, NCOEF)
        first = None if first_order_rows is None else torch.tensor(first_order_rows, dtype=torch.float64)
        return cls(coef=coef, clip=clip, stochastic=bool((coef[:, AN] != 0).any()),
                   multistep=bool((coef[:, AH] != 0).any()), first_order=first)


def row(**values):
    """A coefficient row from keyword names (px=..., a0=...), zeros elsewhere."""
    out = [0.0] * NCOEF
    for name, v in values.items():
        out[globals()[name.upper()]] = float(v)
    return out


def require(scheduler, condition, what, fix):
    if not condition:
        raise UnsupportedScheduler(f"{type(scheduler).__name__}: {what} is not supported by the fused step; {fix}")


def prediction_type(scheduler, allowed):
    p = scheduler.config.prediction_type
    require(scheduler, p in allowed, f"prediction_type {p!r}", f"use one of {allowed}")
    return p


def no_thresholding(scheduler):
    require(scheduler, not getattr(scheduler.config, "thresholding", False), "dynamic thresholding",
            "turn thresholding off (it needs a per-sample quantile, not an elementwise update)")
