"""Euler ancestral (k-diffusion's sample_euler_ancestral), as diffusers'
EulerAncestralDiscreteScheduler.step computes it.

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_next = x + (x - x_0) / sigma (sigma_down - sigma) + sigma_up z
"""
import math

from .step_table import StepTable, prediction_type, row
from .table_euler import x0_coefficients


def table(scheduler):
    pred = prediction_type(scheduler, ("epsilon", "v_prediction"))  # diffusers raises for 'sample'
    sigmas = scheduler.sigmas.double().tolist()
    rows = []
    for i in range(len(scheduler.timesteps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        down = math.sqrt(s_next ** 2 - up ** 2)
        rows.append(row(**x0_coefficients(pred, s), ex=1 / s, e0=-1 / s, ax=1.0, ae=down - s, an=up))
    return StepTable.from_rows(rows)
