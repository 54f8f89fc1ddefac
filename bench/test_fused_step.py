"""Benchmark: one denoising step with classifier-free guidance, CPU, one core.

Per scheduler configuration and latent, in one group: diffusers' ``scheduler.step(u + g (c - u), t, x)``
(the eager combine plus the step; the group's baseline) and latentwire's fused CPU path. DDIM runs in
every configuration of its step: clip_sample True (its default) and False x prediction_type epsilon,
v_prediction and sample x eta 0 and 0.5 (with the same variance noise on both sides), on an SD 1.5
latent (1, 4, 64, 64) and an SDXL one (1, 4, 128, 128); Euler and DPM-Solver++(2M) with their defaults.
The SDXL groups of DDIM (clip off and on, epsilon, eta 0), Euler and DPM-Solver++ also time
``torch.compile`` of the same torch reference (after compiling) and a memcpy that moves the bytes the
step must move (read x, u, c and write x: 4 x 256 KiB), the bound no step can beat.

Every timed output is checked: the steps against diffusers' output computed before the timing (max
relative error 1e-5), the memcpy against a copy of its source made before the timing (bit for bit).
extra_info has GB/s of the bytes each step must move.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from latentwire.kernels import FusedSampler, SolverState, fused_step_ref

SHAPES = {"SD": (1, 4, 64, 64), "SDXL": (1, 4, 128, 128)}
G = 7.5
STEP = 12  # a middle step of 25 (second order for DPM-Solver++)
ETA = 0.5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _ddim(clip_sample, prediction_type):
    return lambda: DDIMScheduler(**SD, clip_sample=clip_sample, prediction_type=prediction_type,
                                 set_alpha_to_one=False, steps_offset=1)


# name -> (scheduler factory, DDIM step options: given to diffusers' step() and to FusedSampler alike)
CONFIGS = {
    f"ddim-{'clip' if clip else 'noclip'}-{pred}-eta{eta:g}": (_ddim(clip, pred), {"eta": eta})
    for clip in (False, True) for pred in ("epsilon", "v_prediction", "sample") for eta in (0.0, ETA)
}
CONFIGS.update({
    "euler": (lambda: EulerDiscreteScheduler(**SD), {}),
    "dpmpp2m": (lambda: DPMSolverMultistepScheduler(**SD), {}),
})
# Groups that also time torch.compile(ref) and the memcpy bound (SDXL only: compiling is slow)
HEADLINE = ("ddim-noclip-epsilon-eta0", "ddim-clip-epsilon-eta0", "euler", "dpmpp2m")
_compiled = {}


def _cases():
    for shape in SHAPES:
        for name in CONFIGS:
            extra = ["torch.compile(ref)", "memcpy"] if shape == "SDXL" and name in HEADLINE else []
            for impl in ["diffusers", "fused-cpu"] + extra:
                yield pytest.param(shape, name, impl, id=f"{shape}-{name}-{impl}")


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(5)]  # x, u, c, x0_prev, z


def _diffusers(s, x, u, c, t, h, kwargs):
    if isinstance(s, DPMSolverMultistepScheduler):  # give diffusers the same previous x_0 as latentwire's state
        s.model_outputs = [None, h]  # step() shifts it left, then appends x_0
        s.lower_order_nums = 2
    s._step_index = STEP  # re-run the same step: Euler and DPM-Solver++ advance a private counter
    return s.step(u + G * (c - u), t, x, **kwargs).prev_sample


@pytest.mark.parametrize("shape_name, name, impl", list(_cases()))
def test_fused_step(shape_name, name, impl, benchmark, record):
    torch.set_num_threads(1)
    shape = SHAPES[shape_name]
    make, options = CONFIGS[name]
    s = make()
    s.set_timesteps(25)
    t = s.timesteps[STEP]
    x, u, c, h, z = _inputs(shape)
    sampler = FusedSampler(s, backend="cpu", **options)
    state = SolverState(h) if sampler.table.multistep else None
    noise = z if sampler.stochastic else None
    kwargs = dict(options, variance_noise=z) if sampler.stochastic else dict(options)
    expected = _diffusers(s, x, u, c, t, h, kwargs)
    benchmark.group = f"fused step {name} {shape_name} {shape}"
    if impl == "diffusers":
        out = benchmark(_diffusers, s, x, u, c, t, h, kwargs)
    elif impl == "fused-cpu":
        out = benchmark(lambda: sampler.step(x, STEP, cond=c, uncond=u, guidance_scale=G, state=state, noise=noise)[0])
    elif impl == "torch.compile(ref)":
        fn = _compiled.setdefault("ref", torch.compile(fused_step_ref, dynamic=False))
        args = (x, [u, c], torch.tensor([[1 - G, G]]), sampler.coef, torch.tensor([STEP]), noise,
                h if sampler.table.multistep else None, sampler.table.clip)
        fn(*args)  # compile outside the timing
        out = benchmark(lambda: fn(*args)[0])
    else:  # reads 512 KiB, writes 512 KiB: the step's 1 MiB
        src = torch.cat([x.flatten(), u.flatten()])
        want = src.clone()
        dst = torch.full_like(src, float("nan"))
        copied = benchmark(dst.copy_, src)
        assert torch.equal(copied, want), "memcpy did not copy its source"
    if impl != "memcpy":  # the steps: against diffusers' output
        rel = ((out - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-5, f"{impl} differs from diffusers by {rel:.2e}"
    operands = 4 + (noise is not None) + (state is not None)  # read x, u, c (, z, x0_prev); write x_next
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s moved"] = round(operands * 4 * x.numel() / benchmark.stats.stats.median / 1e9, 3)
    record(x, baseline=impl == "diffusers")  # the summary prints each row's speed over diffusers'
