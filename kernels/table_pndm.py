"""PLMS, the pseudo linear multistep method (Liu et al. 2022, eqs. 9 and 12), as diffusers' PNDMScheduler
.step computes it with skip_prk_steps=True (Stable Diffusion v1.x's scheduler config).

The transfer from t to t' = t - delta (the paper's eq. 9; diffusers' ``_get_prev_sample``), with
e' the combined model output below (v_prediction: e' = sqrt(abar_t) v' + sqrt(1 - abar_t) x_t, an eps):

    x_t' = sqrt(abar_t' / abar_t) x_t - (abar_t' - abar_t) e' / (abar_t sqrt(1 - abar_t')
                                                              + sqrt(abar_t (1 - abar_t) abar_t'))

and the linear multistep combination of e_i, the guided model output of step i, with the outputs of
earlier steps that the solver kept (its ``ets``, oldest first; newest first below):

    step 0:  e' = e_0                                  from x at t_0;  keep ets = [e_0], sample = x
    step 1:  e' = (e_1 + e_0) / 2                      from sample (not x) over step 0's interval again,
                                                       t_0 -> t_1 (a trapezoid);  e_1 is not kept, sample dropped
    step i >= 2, with n = len(ets) <= 3 outputs kept (n = min(i - 1, 3) in a whole run):
        n = 1:   e' = (3 e_i - e_{-1}) / 2
        n = 2:   e' = (23 e_i - 16 e_{-1} + 5 e_{-2}) / 12
        n = 3:   e' = (55 e_i - 59 e_{-1} + 37 e_{-2} - 9 e_{-3}) / 24
        then ets = (ets + [e_i])[-3:]

Key to diffusers' names: counter -> the step index i (FusedSampler counts steps from 0); ets -> ets;
cur_sample -> sample; model_output after the combination -> e'. Note e_1 is never kept: at step 2 the
outputs are e_2 and e_0 (at timesteps[2] and timesteps[0], a stride apart).

The schedule: set_timesteps(N) gives N + 1 timesteps for N >= 2 (the second one repeated: step 1
re-takes step 0's interval), and 1 for N = 1: the number of steps a plan counts is len(scheduler.timesteps).
The interval of each step is diffusers' rule, whatever the timestep spacing: t -> t - T // N at every
step but step 1, which goes t_1 + T // N -> t_1; abar at a negative timestep is final_alpha_cumprod.

A solver that starts with an empty state at step i > 0 (a receiver that restarts it after a handoff)
takes the formula for the n outputs it has, as diffusers does while its ets fill up: at i >= 2, n = 0
is the first-order step e' = e_i; at step 1, with no sample to restart from, x is already at t_1 (step
0 took it there), so the step keeps x as it is (and keeps no output).

The rows fit the affine step with eps = EX x + EM m (the eps of e'), x_next = AX x + AE eps; PX, PM give
x_0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), which x_next does not read (A0 = 0). Only the rows are
per schedule; the combination weights are fixed (``combination``).
"""
import math
from dataclasses import dataclass

from .step_table import StepTable, prediction_type, require, row

MAX_PREVIOUS = 3  # PLMS's fourth-order formula reads the three kept outputs before the current one

# Adams-Bashforth weights of [e_i, e_{-1}, e_{-2}, e_{-3}] (newest first) by how many earlier outputs there are
ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
TRAPEZOID = (1 / 2, 1 / 2)  # step 1: [e_1, e_0]


@dataclass(frozen=True)
class PLMSTable(StepTable):
    """A StepTable whose step i combines the current model output with earlier ones (``combination``);
    FusedSampler keeps those outputs in the SolverState (ets, sample)."""


def combination(step_index, n_previous):
    """Weights of [e_i, ets[-1], ets[-2], ...] at step ``step_index`` with ``n_previous`` kept outputs (capped at 3)."""
    if step_index == 1:
        return TRAPEZOID
    return ADAMS_BASHFORTH[min(n_previous, MAX_PREVIOUS)]


def table(scheduler):
    cfg = scheduler.config
    require(scheduler, cfg.skip_prk_steps, "skip_prk_steps=False (F-PNDM's Runge-Kutta warm-up, 12 model calls)",
            "set skip_prk_steps=True (PLMS, as Stable Diffusion's scheduler configs do)")
    pred = prediction_type(scheduler, ("epsilon", "v_prediction"))  # what _get_prev_sample takes
    abar = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    stride = cfg.num_train_timesteps // scheduler.num_inference_steps
    rows = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        t, prev = (t + stride, t) if i == 1 else (t, t - stride)  # step 1 re-takes step 0's interval
        a, ap = float(abar[t]), (float(abar[prev]) if prev >= 0 else final)
        sample_coeff = math.sqrt(ap / a)
        denom = a * math.sqrt(1 - ap) + math.sqrt(a * (1 - a) * ap)
        c = {"epsilon": dict(px=1 / math.sqrt(a), pm=-math.sqrt(1 - a) / math.sqrt(a), em=1.0),
             # eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, as diffusers converts it
             "v_prediction": dict(px=math.sqrt(a), pm=-math.sqrt(1 - a), ex=math.sqrt(1 - a), em=math.sqrt(a))}[pred]
        rows.append(row(**c, ax=sample_coeff, ae=-(ap - a) / denom))
    return PLMSTable.from_rows(rows)
