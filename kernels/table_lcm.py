"""Multistep latent consistency sampling (Luo et al. 2023, Alg. 1), as diffusers' LCMScheduler.step computes it.

    x_0      = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                        epsilon
    x_0      = m;   x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v                   sample; v_prediction
    x_0      = clamp(x_0, -clip, clip)                                            only with clip_sample
    f(x_t,t) = c_skip(t) x_t + c_out(t) x_0                                       the consistency function
    x_prev   = sqrt(abar_prev) f(x_t, t) + sqrt(1 - abar_prev) z                  z fresh noise; last step: f
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),  c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with sigma_data = 0.5 and s = timestep_scaling (10), the boundary-condition scalings at the discrete
timestep t. Key to diffusers' names: predicted_original_sample -> x_0, denoised -> f(x_t, t),
prev_sample -> x_prev. abar_prev is abar at the *next entry* of scheduler.timesteps (LCM's own spacing
from set_timesteps: original_inference_steps, strength, or custom timesteps), not at t - stride.

diffusers' step returns (prev_sample, denoised); the LCM pipelines decode the last step's ``denoised``,
which equals its prev_sample (no noise is added at step_index num_inference_steps - 1), so the last
x_next of the table is the pipeline's final latent. (Not so for custom timesteps with strength < 1:
there diffusers' step index never reaches num_inference_steps - 1 and every step, the last included,
adds noise; the table follows the step, so its last x_next is then the noised prev_sample.)

The rows fit the affine step with AX = sqrt(abar_prev) c_skip, A0 = sqrt(abar_prev) c_out,
AN = sqrt(1 - abar_prev) (last step: AX = c_skip, A0 = c_out, AN = 0): the clamp acts on x_0 before the
combination, as in step_table's form.
"""
import math

from .step_table import StepTable, no_thresholding, prediction_type, require, row

SIGMA_DATA = 0.5  # diffusers' get_scalings_for_boundary_condition_discrete, fixed there


def _x0(pred, a, b):
    """x_0 = PX x + PM m from the model output m (key: predicted_original_sample -> x_0)."""
    if pred == "epsilon":
        return dict(px=1 / math.sqrt(a), pm=-math.sqrt(b) / math.sqrt(a))
    if pred == "v_prediction":
        return dict(px=math.sqrt(a), pm=-math.sqrt(b))
    return dict(pm=1.0)  # sample


def table(scheduler):
    no_thresholding(scheduler)
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction"))
    cfg = scheduler.config
    abar = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    ts = scheduler.timesteps.tolist()
    last = scheduler.num_inference_steps - 1  # diffusers' rule: no noise at this step index
    rows = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else t  # diffusers' prev_timestep: the next entry, else t itself
        a, ap = float(abar[t]), (float(abar[prev]) if prev >= 0 else final)
        b = 1 - a
        require(scheduler, a > 0 or pred != "epsilon", f"prediction_type 'epsilon' at timestep {t}, where "
                "alphas_cumprod is 0 (rescale_betas_zero_snr): x_0 divides by sqrt(abar_t) = 0",
                "use prediction_type 'v_prediction' or 'sample' with a zero-terminal-SNR schedule")
        c = _x0(pred, a, b)
        st = t * cfg.timestep_scaling
        c_skip = SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)
        c_out = st / math.sqrt(st ** 2 + SIGMA_DATA ** 2)
        if i == last:  # x_prev = f(x_t, t) = denoised
            rows.append(row(**c, ax=c_skip, a0=c_out))
        else:
            rows.append(row(**c, ax=math.sqrt(ap) * c_skip, a0=math.sqrt(ap) * c_out, an=math.sqrt(1 - ap)))
    return StepTable.from_rows(rows, clip=cfg.clip_sample_range if cfg.clip_sample else None)
