"""Which coefficient table serves a configured diffusers scheduler."""
from . import (table_cogvideox_ddim, table_ddim, table_ddpm, table_dpmpp_2m, table_euler, table_euler_ancestral,
               table_flow_euler, table_lcm, table_pndm, table_unipc)
from .step_table import UnsupportedScheduler

BUILDERS = {
    "DDIMScheduler": table_ddim.table,
    "DDPMScheduler": table_ddpm.table,
    "EulerDiscreteScheduler": table_euler.table,
    "EulerAncestralDiscreteScheduler": table_euler_ancestral.table,
    "DPMSolverMultistepScheduler": table_dpmpp_2m.table,
    "FlowMatchEulerDiscreteScheduler": table_flow_euler.table,
    "LCMScheduler": table_lcm.table,
    "CogVideoXDDIMScheduler": table_cogvideox_ddim.table,
    "PNDMScheduler": table_pndm.table,  # skip_prk_steps=True only (PLMS)
    "UniPCMultistepScheduler": table_unipc.table,  # predict_x0=True, solver_order 1 or 2
}


def table_for(scheduler, **options):
    """StepTable of ``scheduler`` (after ``set_timesteps``). options: DDIM's eta, use_clipped_model_output
    (CogVideoXDDIMScheduler takes them too, at eta=0 and False only: its step ignores both)."""
    name = type(scheduler).__name__
    if name not in BUILDERS:
        raise UnsupportedScheduler(f"{name} is not supported by the fused step; supported: {', '.join(BUILDERS)}")
    if getattr(scheduler, "num_inference_steps", None) is None or getattr(scheduler, "timesteps", None) is None:
        raise UnsupportedScheduler(f"{name} has no schedule yet: call scheduler.set_timesteps(N) first")
    return BUILDERS[name](scheduler, **options)
