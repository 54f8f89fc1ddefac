"""Synthetic latents to measure codecs on: what a handoff carries at different points of a schedule.

No model weights are available here, so the clean latent is a stand-in: white noise low-passed by
bicubic (trilinear for video) upsampling from 1/8 resolution, scaled to unit variance per channel,
which is smoother than a real VAE latent (real ones carry texture); the noisy mixtures follow Stable
Diffusion's scaled-linear schedule exactly: x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps.
"""
import torch
import torch.nn.functional as F

# Stable Diffusion v1.5's training schedule: 1000 steps, scaled-linear betas 0.00085 .. 0.012.
_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - _BETAS, 0)
STEPS = {"early": 900, "middle": 500, "late": 100}  # training timesteps of a handoff


def noise(shape, seed=0):
    """x_T: standard normal, float32."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def smooth(shape, seed=1, factor=8):
    """A spatially smooth stand-in for a clean latent x_0: unit variance per channel, float32."""
    low = [max(1, s // factor) for s in shape[2:]]
    base = torch.randn(shape[:2] + tuple(low), generator=torch.Generator().manual_seed(seed))
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(low)]
    x = F.interpolate(base, size=shape[2:], mode=mode, align_corners=False)
    dims = tuple(d for d in range(x.dim()) if d != 1)
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True)


def mixture(shape, t, seed=0):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps = noise(shape, seed): a latent at timestep t."""
    a = ALPHAS_CUMPROD[t].item()
    return (a ** 0.5) * smooth(shape, seed + 1) + ((1 - a) ** 0.5) * noise(shape, seed)


def contents(shape, seed=0):
    """name -> tensor: noise, smooth, and x_t at early, middle and late handoff steps."""
    out = {"noise": noise(shape, seed), "smooth": smooth(shape, seed + 1)}
    out.update({f"x_t {k} (t={t})": mixture(shape, t, seed) for k, t in STEPS.items()})
    return out
