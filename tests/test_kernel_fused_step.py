"""The Triton fused-step kernel against its torch reference (interpreted on CPU, compiled on CUDA).

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernel runs in Triton's interpreter
on CPU tensors (slow, so the shapes are small); with CUDA it runs compiled on the GPU. Seeds are
derived from each case's parameters with zlib.crc32 (stable across processes, unlike hash()).
"""
import zlib

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from latentwire.kernels import FusedSampler, fused_step, fused_step_ref
from latentwire.kernels.step_table import NCOEF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _seed(*case):
    return zlib.crc32(repr(case).encode())


def _tol(dtype):
    # float32 math in both; the reference rounds the same operations in another order
    return {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 3, 2, 5), (3, 1029)])  # 1029 > BLOCK: a ragged last block
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("flags", ["plain", "noise+hist+x0", "clip", "clip+noise+hist+x0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["per-row", "shared"])  # (B,) steps and (B, K) weights, or an int and K floats
def test_triton_kernel_matches_reference(rows, shape, k, flags, dtype):
    g = torch.Generator().manual_seed(_seed(rows, shape, k, flags, str(dtype)))
    b = shape[0]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    models = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(k)]
    coef = torch.randn(6, NCOEF, generator=g).to(DEVICE)
    if rows == "per-row":
        weights = w_rows = torch.randn(b, k, generator=g).to(DEVICE)
        step = step_rows = torch.randint(0, 6, (b,), generator=g).to(DEVICE)
    else:
        weights = torch.randn(k, generator=g).tolist()
        step = int(torch.randint(0, 6, (1,), generator=g))
        w_rows = torch.tensor([weights], device=DEVICE).expand(b, k)
        step_rows = torch.full((b,), step, device=DEVICE)
    noise = hist = None
    if "noise" in flags:
        noise, hist = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    clip = None
    if "clip" in flags:  # the median |x_0|: about half the values are clamped, half are not
        x0 = fused_step_ref(x, models, w_rows, coef, step_rows).x0.float().abs()
        clip = x0.median().item()
        assert 0 < (x0 > clip).float().mean().item() < 1
    ours = fused_step(x, models, weights, coef, step, noise, hist, clip, want_x0=True, want_m=True, backend="triton")
    ref = fused_step_ref(x, models, w_rows, coef, step_rows, noise, hist, clip)
    for got, want in zip(ours, ref):  # x_next, x0, m
        assert got.dtype == dtype and got.device == x.device
        assert (got.float() - want.float()).abs().max().item() <= _tol(dtype) * want.float().abs().max().item()


@pytest.mark.parametrize("make, options", [
    (lambda: DDIMScheduler(**SD, clip_sample=False), {}),
    (lambda: DDIMScheduler(**SD), {}),  # clip_sample=True, DDIM's default
    (lambda: DDIMScheduler(**SD, prediction_type="v_prediction"), {"eta": 0.5}),
    (lambda: DDIMScheduler(**SD, prediction_type="sample"), {"eta": 1.0, "use_clipped_model_output": True}),
    (lambda: DDPMScheduler(), {}),  # clips x_0 and adds noise
    (lambda: EulerAncestralDiscreteScheduler(**SD), {}),
    (lambda: DPMSolverMultistepScheduler(**SD), {}),
], ids=["ddim", "ddim-clip", "ddim-v-clip-eta", "ddim-sample-clip-eta1-clipped-output", "ddpm", "euler-ancestral",
        "dpmpp2m"])
@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (1, 3, 7, 9)])
def test_triton_backend_through_the_sampler_matches_the_cpu_path(make, options, shape):
    s = make()
    s.set_timesteps(6)
    triton_sampler = FusedSampler(s, device=DEVICE, backend="triton", **options)
    cpu_sampler = FusedSampler(s, backend="cpu", **options)
    g = torch.Generator().manual_seed(_seed(shape, type(s).__name__, options))
    x = torch.randn(shape, generator=g)
    st_t = st_c = None
    for i in range(triton_sampler.num_steps):
        u, c, z = (torch.randn(x.shape, generator=g) for _ in range(3))
        noise = z if cpu_sampler.stochastic else None
        a, st_t = triton_sampler.step(x.to(DEVICE), i, cond=c.to(DEVICE), uncond=u.to(DEVICE), guidance_scale=5.0,
                                      state=st_t, noise=None if noise is None else noise.to(DEVICE))
        b, st_c = cpu_sampler.step(x, i, cond=c, uncond=u, guidance_scale=5.0, state=st_c, noise=noise)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        x = b
