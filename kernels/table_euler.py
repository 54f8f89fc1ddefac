"""Euler on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2 without churn), as
diffusers' EulerDiscreteScheduler.step computes it.

    d = (x - x_0) / sigma,   x_next = x + d (sigma_next - sigma)
"""
import math

from .step_table import StepTable, prediction_type, require, row


def x0_coefficients(pred, sigma):
    """x_0 = PX x + PM m for the sigma-parameterised (k-diffusion) schedulers."""
    return {"epsilon": dict(px=1.0, pm=-sigma),
            "v_prediction": dict(px=1 / (sigma ** 2 + 1), pm=-sigma / math.sqrt(sigma ** 2 + 1)),
            "sample": dict(pm=1.0), "original_sample": dict(pm=1.0)}[pred]


def table(scheduler, s_churn=0.0):
    require(scheduler, s_churn == 0.0, "s_churn > 0", "leave s_churn at 0")
    pred = prediction_type(scheduler, ("epsilon", "v_prediction", "sample", "original_sample"))
    sigmas = scheduler.sigmas.double().tolist()
    rows = []
    for i in range(len(scheduler.timesteps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        rows.append(row(**x0_coefficients(pred, s), ex=1 / s, e0=-1 / s, ax=1.0, ae=s_next - s))
    return StepTable.from_rows(rows)
