"""The Triton fused-step kernel against its torch reference (interpreted on CPU, compiled on CUDA)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from latentwire.kernels import FusedSampler, fused_step, fused_step_ref
from latentwire.kernels.step_table import NCOEF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _tol(dtype):
    # float32 math in both; the reference rounds the same operations in another order
    return {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 3, 2, 5), (3, 1029)])  # 1029 > BLOCK: a ragged last block
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("flags", ["plain", "noise+hist+x0", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference(shape, k, flags, dtype):
    g = torch.Generator().manual_seed(hash((shape, k, flags)) % 2 ** 31)
    b = shape[0]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    models = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(k)]
    weights = torch.randn(b, k, generator=g).to(DEVICE)
    coef = torch.randn(6, NCOEF, generator=g).to(DEVICE)
    step = torch.randint(0, 6, (b,), generator=g).to(DEVICE)
    noise = hist = clip = None
    if flags == "noise+hist+x0":
        noise, hist = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    if flags == "clip":
        clip = 0.5
    ours = fused_step(x, models, weights, coef, step, noise, hist, clip, want_x0=True, want_m=True, backend="triton")
    ref = fused_step_ref(x, models, weights, coef, step, noise, hist, clip)
    for got, want in zip(ours, ref):  # x_next, x0, m
        assert got.dtype == dtype
        assert (got.float() - want.float()).abs().max().item() <= _tol(dtype) * want.float().abs().max().item()


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(**SD, clip_sample=False),
    lambda: DDPMScheduler(),  # clips x_0 and adds noise
    lambda: EulerAncestralDiscreteScheduler(**SD),
    lambda: DPMSolverMultistepScheduler(**SD),
], ids=["ddim", "ddpm", "euler-ancestral", "dpmpp2m"])
def test_triton_backend_through_the_sampler_matches_the_cpu_path(make):
    s = make()
    s.set_timesteps(6)
    triton_sampler = FusedSampler(s, device=DEVICE, backend="triton")
    cpu_sampler = FusedSampler(s, backend="cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 5, generator=g)
    st_t = st_c = None
    for i in range(triton_sampler.num_steps):
        u, c, z = (torch.randn(x.shape, generator=g) for _ in range(3))
        noise = z if cpu_sampler.stochastic else None
        a, st_t = triton_sampler.step(x.to(DEVICE), i, cond=c.to(DEVICE), uncond=u.to(DEVICE), guidance_scale=5.0,
                                      state=st_t, noise=None if noise is None else noise.to(DEVICE))
        b, st_c = cpu_sampler.step(x, i, cond=c, uncond=u, guidance_scale=5.0, state=st_c, noise=noise)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        x = b
