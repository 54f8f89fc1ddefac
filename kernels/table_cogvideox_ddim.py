"""Deterministic DDIM (Song et al. 2021, eq. 12 with sigma_t = 0), as diffusers' CogVideoXDDIMScheduler.step
computes it: on an SNR-shifted schedule, and written as a blend of x_t and x_0 rather than of x_0 and eps.

    abar_t = abar'_t / (k + (1 - k) abar'_t)                       k = snr_shift_scale, at construction
    x_0    = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)           epsilon
    x_0    = m;   x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v      sample; v_prediction
    x_prev = a_t x_t + b_t x_0,   a_t = sqrt((1 - abar_prev) / (1 - abar_t)),  b_t = sqrt(abar_prev) - sqrt(abar_t) a_t

abar' is the beta schedule's cumulative product; abar_prev is abar at t - num_train_timesteps // N (the
final alpha below 0), as DDIMScheduler has it. Key to diffusers' names: pred_original_sample -> x_0,
prev_sample -> x_prev. With eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) this is DDIM's
x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps exactly, eps always taken from x_0 (for 'sample'
too); the rows use diffusers' own a_t, b_t so the float32 results follow its code.

The step reads neither clip_sample nor eta: x_0 is never clamped (whatever clip_sample says, True by
default) and no noise is added, so the table has no clamp and no noise term.
"""
import math

from .step_table import StepTable, prediction_type, require, row


def _x0(pred, a, b):
    """x_0 = PX x + PM m from the model output m (key: pred_original_sample -> x_0)."""
    if pred == "epsilon":
        return dict(px=1 / math.sqrt(a), pm=-math.sqrt(b) / math.sqrt(a))
    if pred == "v_prediction":
        return dict(px=math.sqrt(a), pm=-math.sqrt(b))
    return dict(pm=1.0)  # sample


def table(scheduler, eta=0.0, use_clipped_model_output=False):
    require(scheduler, eta == 0, f"eta={eta}", "use eta=0: diffusers' CogVideoXDDIMScheduler.step ignores eta "
            "and always takes the deterministic (eta = 0) step")
    require(scheduler, not use_clipped_model_output, "use_clipped_model_output=True",
            "leave it False: diffusers' CogVideoXDDIMScheduler.step never clips x_0 and ignores it")
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction"))
    cfg = scheduler.config
    abar = scheduler.alphas_cumprod.double()  # already SNR-shifted (and zero-SNR rescaled) by the scheduler
    final = float(scheduler.final_alpha_cumprod)
    stride = cfg.num_train_timesteps // scheduler.num_inference_steps
    rows = []
    for t in scheduler.timesteps.tolist():
        prev = t - stride  # diffusers' rule, whatever the timestep spacing
        a, ap = float(abar[t]), (float(abar[prev]) if prev >= 0 else final)
        require(scheduler, a > 0 or pred != "epsilon", f"prediction_type 'epsilon' at timestep {t}, where "
                "alphas_cumprod is 0 (rescale_betas_zero_snr): x_0 divides by sqrt(abar_t) = 0",
                "use prediction_type 'v_prediction' (CogVideoX's) or 'sample' with a zero-terminal-SNR schedule")
        b = 1 - a
        c = _x0(pred, a, b)
        a_t = math.sqrt((1 - ap) / b)
        b_t = math.sqrt(ap) - math.sqrt(a) * a_t
        rows.append(row(**c, ax=a_t, a0=b_t))
    return StepTable.from_rows(rows)
