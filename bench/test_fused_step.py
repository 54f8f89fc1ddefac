"""Benchmark: one denoising step with classifier-free guidance on an SDXL latent, CPU, one core.

Per scheduler, in one group: diffusers' ``scheduler.step(u + g (c - u), t, x)`` (the eager combine
plus the step; the baseline), latentwire's fused CPU path, ``torch.compile`` of the same torch
reference (timed after compiling), and a memcpy that moves the same bytes the step must move (read
x, u, c and write x: 4 x 256 KiB), the bound no step can beat. extra_info has GB/s of bytes moved.
Every timed output is checked against diffusers' (max relative error 1e-5).
"""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from latentwire.kernels import FusedSampler, fused_step_ref

SHAPE = (1, 4, 128, 128)
G = 7.5
STEP = 12  # a middle step of 25 (second order for DPM-Solver++)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "euler": lambda: EulerDiscreteScheduler(**SD),
    "dpmpp2m": lambda: DPMSolverMultistepScheduler(**SD),
}
BYTES_MOVED = 4 * 4 * torch.Size(SHAPE).numel()  # read x, u, c; write x_next (float32)
_compiled = {}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=g) for _ in range(4)]  # x, u, c, x0_prev


def _diffusers(s, x, u, c, t):
    s._step_index = STEP  # re-run the same step: Euler and DPM-Solver++ advance a private counter
    return s.step(u + G * (c - u), t, x).prev_sample


@pytest.mark.parametrize("impl", ["diffusers", "fused-cpu", "torch.compile(ref)", "memcpy"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_fused_step(name, impl, benchmark, record):
    torch.set_num_threads(1)
    s = SCHEDULERS[name]()
    s.set_timesteps(25)
    t = s.timesteps[STEP]
    x, u, c, h = _inputs()
    sampler = FusedSampler(s, backend="cpu")
    from latentwire.kernels import SolverState
    state = SolverState(h) if sampler.table.multistep else None
    if name == "dpmpp2m":  # give diffusers the same previous x_0 as latentwire's state
        s.model_outputs = [None, h]  # step() shifts it left, then appends x_0
        s.lower_order_nums = 2
    expected = _diffusers(s, x, u, c, t)
    if name == "dpmpp2m":
        s.model_outputs = [None, h]  # step() shifts it left, then appends x_0
    benchmark.group = f"fused step {name} SDXL {SHAPE}"
    if impl == "diffusers":
        def run():
            if name == "dpmpp2m":
                s.model_outputs = [None, h]  # step() shifts it left, then appends x_0
            return _diffusers(s, x, u, c, t)
        out = benchmark(run)
    elif impl == "fused-cpu":
        out = benchmark(lambda: sampler.step(x, STEP, cond=c, uncond=u, guidance_scale=G, state=state)[0])
    elif impl == "torch.compile(ref)":
        fn = _compiled.setdefault("ref", torch.compile(fused_step_ref, dynamic=False))
        weights = torch.tensor([[1 - G, G]])
        step = torch.tensor([STEP])
        hist = h if sampler.table.multistep else None
        fn(x, [u, c], weights, sampler.coef, step, None, hist, sampler.table.clip)  # compile outside the timing
        out = benchmark(lambda: fn(x, [u, c], weights, sampler.coef, step, None, hist, sampler.table.clip)[0])
    else:
        src, dst = torch.randn(2 * torch.Size(SHAPE).numel()), torch.empty(2 * torch.Size(SHAPE).numel())
        benchmark(dst.copy_, src)  # reads 512 KiB, writes 512 KiB: the step's 1 MiB
        out = expected
    rel = ((out - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-5, f"{impl} differs from diffusers by {rel:.2e}"
    benchmark.extra_info["GB/s moved"] = round(BYTES_MOVED / benchmark.stats.stats.median / 1e9, 3)
    record(x, baseline=impl == "diffusers")  # the summary prints each row's speed over diffusers'

