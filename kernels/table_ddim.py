"""DDIM (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step computes it.

    x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z,
    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
"""
import math

from .step_table import StepTable, no_thresholding, prediction_type, row


def table(scheduler, eta=0.0, use_clipped_model_output=False):
    no_thresholding(scheduler)
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction"))
    cfg = scheduler.config
    abar = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    stride = cfg.num_train_timesteps // scheduler.num_inference_steps
    rows = []
    for t in scheduler.timesteps.tolist():
        prev = t - stride  # diffusers' rule, whatever the timestep spacing
        a, ap = float(abar[t]), (float(abar[prev]) if prev >= 0 else final)
        b = 1 - a
        # x_0 and eps from the model output m (key: pred_original_sample -> x0, pred_epsilon -> eps)
        c = {"epsilon": dict(px=1 / math.sqrt(a), pm=-math.sqrt(b) / math.sqrt(a), em=1.0),
             # eps from the unclipped x_0 = m, as diffusers computes it before clipping
             "sample": dict(pm=1.0, ex=1 / math.sqrt(b), em=-math.sqrt(a) / math.sqrt(b)),
             "v_prediction": dict(px=math.sqrt(a), pm=-math.sqrt(b), ex=math.sqrt(b), em=math.sqrt(a))}[pred]
        if use_clipped_model_output:  # eps recomputed from the (clipped) x_0
            c.update(ex=1 / math.sqrt(b), em=0.0, e0=-math.sqrt(a) / math.sqrt(b))
        variance = ((1 - ap) / b) * (1 - a / ap)
        std = eta * math.sqrt(variance)
        rows.append(row(**c, a0=math.sqrt(ap), ae=math.sqrt(1 - ap - std ** 2), an=std))
    return StepTable.from_rows(rows, clip=cfg.clip_sample_range if cfg.clip_sample else None)
