"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), as diffusers' DPMSolverMultistepScheduler.step computes it
with algorithm_type='dpmsolver++', solver_order <= 2.

    lambda = log(alpha_t / sigma_t),  h = lambda_next - lambda,  r0 = h_prev / h
    1st order: x_next = sigma_next / sigma x - alpha_next (e^{-h} - 1) x_0
    2nd order: D1 = (x_0 - x_0,prev) / r0, and
        midpoint: x_next = sigma_next / sigma x - alpha_next (e^{-h} - 1) (x_0 + D1 / 2)
        heun:     x_next = sigma_next / sigma x - alpha_next (e^{-h} - 1) x_0 + alpha_next ((e^{-h} - 1) / h + 1) D1
The previous x_0 is the solver state carried between steps (and across a handoff).
"""
import math

from .step_table import StepTable, no_thresholding, prediction_type, require, row


def _alpha_sigma(scheduler, sigma):
    if scheduler.config.use_flow_sigmas:
        return 1 - sigma, sigma
    alpha = 1 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha


def _lambda(alpha, sigma):
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def table(scheduler):
    cfg = scheduler.config
    no_thresholding(scheduler)
    require(scheduler, cfg.algorithm_type == "dpmsolver++", f"algorithm_type {cfg.algorithm_type!r}",
            "use 'dpmsolver++'")
    require(scheduler, cfg.solver_order in (1, 2), f"solver_order {cfg.solver_order}", "use 1 or 2 (2M)")
    require(scheduler, cfg.solver_type in ("midpoint", "heun"), f"solver_type {cfg.solver_type!r}",
            "use 'midpoint' or 'heun'")
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction", "flow_prediction"))
    sigmas = scheduler.sigmas.double().tolist()
    n = len(scheduler.timesteps)
    rows, first_rows = [], []
    for i in range(n):
        alpha_s, sigma_s = _alpha_sigma(scheduler, sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(scheduler, sigmas[i + 1])
        x0 = {"epsilon": dict(px=1 / alpha_s, pm=-sigma_s / alpha_s), "sample": dict(pm=1.0),
              "v_prediction": dict(px=alpha_s, pm=-sigma_s), "flow_prediction": dict(px=1.0, pm=-sigmas[i])}[pred]
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        c = alpha_t * (math.exp(-h) - 1.0)
        ax = sigma_t / sigma_s
        # diffusers' order rule: first order at step 0 and, under these conditions, at the last step
        final_first = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        first_rows.append(row(**x0, ax=ax, a0=-c))
        if cfg.solver_order == 1 or i == 0 or final_first:
            rows.append(row(**x0, ax=ax, a0=-c))
            continue
        alpha_p, sigma_p = _alpha_sigma(scheduler, sigmas[i - 1])
        r0 = (_lambda(alpha_s, sigma_s) - _lambda(alpha_p, sigma_p)) / h
        if cfg.solver_type == "midpoint":
            rows.append(row(**x0, ax=ax, a0=-c * (1 + 0.5 / r0), ah=0.5 * c / r0))
        else:
            k = alpha_t * ((math.exp(-h) - 1.0) / h + 1.0)
            rows.append(row(**x0, ax=ax, a0=-c + k / r0, ah=-k / r0))
    return StepTable.from_rows(rows, first_order_rows=first_rows)
