"""Fused Triton kernels for denoising steps and K-step noise extrapolation, each beside its torch
reference and a CPU path; dispatch picks by device.

    sampler = FusedSampler(scheduler, device=x.device)       # after scheduler.set_timesteps(N)
    x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=7.5, state=state)
"""
from .extrapolate import ECDiff, History, Stepper, Taylor, denoise, lagrange_weights, run_steps
from .fused_step import StepOutput, fused_step, fused_step_ref
from .sampler import FusedSampler, SolverState
from .step_table import StepTable, UnsupportedScheduler
from .tables import table_for

__all__ = ["ECDiff", "FusedSampler", "History", "SolverState", "StepOutput", "StepTable", "Stepper", "Taylor",
           "UnsupportedScheduler", "denoise", "fused_step", "fused_step_ref", "lagrange_weights", "run_steps",
           "table_for"]
