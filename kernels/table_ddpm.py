"""DDPM ancestral sampling (Ho et al. 2020, eq. 7), as diffusers' DDPMScheduler.step computes it.

    x_{t-1} = sqrt(abar_prev) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
              + sigma_t z,   alpha_t = abar_t / abar_prev, beta_t = 1 - alpha_t, no noise at t = 0
"""
import math

from .step_table import StepTable, no_thresholding, prediction_type, require, row


def table(scheduler):
    no_thresholding(scheduler)
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction"))
    cfg = scheduler.config
    require(scheduler, cfg.variance_type in ("fixed_small", "fixed_small_log", "fixed_large"),
            f"variance_type {cfg.variance_type!r}", "use fixed_small, fixed_small_log or fixed_large")
    abar = scheduler.alphas_cumprod.double()
    ts = scheduler.timesteps.tolist()
    rows = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1  # diffusers' previous_timestep with a schedule
        a, ap = float(abar[t]), (float(abar[prev]) if prev >= 0 else 1.0)
        b, bp = 1 - a, 1 - ap
        alpha, beta = a / ap, 1 - a / ap
        c = {"epsilon": dict(px=1 / math.sqrt(a), pm=-math.sqrt(b) / math.sqrt(a)),
             "sample": dict(pm=1.0),
             "v_prediction": dict(px=math.sqrt(a), pm=-math.sqrt(b))}[pred]
        var = max(bp / b * beta, 1e-20)
        std = 0.0
        if t > 0:
            std = math.sqrt(beta) if cfg.variance_type == "fixed_large" else math.sqrt(var)
        rows.append(row(**c, a0=math.sqrt(ap) * beta / b, ax=math.sqrt(alpha) * bp / b, an=std))
    return StepTable.from_rows(rows, clip=cfg.clip_sample_range if cfg.clip_sample else None)
