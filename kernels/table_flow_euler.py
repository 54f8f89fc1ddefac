"""Euler on a rectified-flow ODE (SD3, Flux), as diffusers' FlowMatchEulerDiscreteScheduler.step
computes it. The model predicts the velocity v = eps - x_0.

    x_next = x + (sigma_next - sigma) v                                    (deterministic)
    x_next = (1 - sigma_next) x_0 + sigma_next z,  x_0 = x - sigma v       (stochastic_sampling)
"""
from .step_table import StepTable, require, row


def table(scheduler):
    require(scheduler, not getattr(scheduler.config, "use_dynamic_shifting", False) or scheduler.sigmas is not None,
            "dynamic shifting without set_timesteps(mu=...)", "call set_timesteps with mu first")
    sigmas = scheduler.sigmas.double().tolist()
    stochastic = getattr(scheduler.config, "stochastic_sampling", False)
    rows = []
    for i in range(len(scheduler.timesteps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        if stochastic:
            rows.append(row(px=1.0, pm=-s, a0=1 - s_next, an=s_next))
        else:
            rows.append(row(em=1.0, ax=1.0, ae=s_next - s))
    return StepTable.from_rows(rows)
