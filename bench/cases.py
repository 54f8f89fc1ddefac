"""What the benchmarks measure on: latent shapes, contents, and the error each codec is allowed.

Shared by the pytest benchmarks (through conftest.py) and by report.py, so both measure the same
tensors against the same bounds.
"""
import functools

import numpy as np
import torch

from latentwire.protocol import quant, samples

# Latent shapes (B, C, H, W) or (B, C, F, H, W) of the models the issue names.
SHAPES = {
    "SD1.5": (1, 4, 64, 64),
    "SDXL": (1, 4, 128, 128),
    "SD3/Flux": (1, 16, 128, 128),
    "video": (1, 16, 21, 60, 104),
}
# What a handoff carries: x_T, a clean-latent stand-in x_0, and x_t at the three handoff steps.
CONTENTS = ("noise", "smooth", "early", "middle", "late")
LEVELS = quant.LEVELS  # quantization levels of the int codecs
_F32_EPS = float(np.finfo(np.float32).eps)


def one_core():
    """All figures are one-core figures: torch and blosc2 get one thread (numpy/zstd/zfp use one anyway)."""
    import blosc2

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)


@functools.lru_cache(maxsize=32)
def latent(shape, content):
    """float32 latent of ``shape`` holding ``content`` (one of CONTENTS); same seeds as samples.contents.

    The mixtures are x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps = noise(shape, 0), so
    noise(shape, 0) is the reference a receiver holds for residual coding.
    """
    if content == "noise":
        return samples.noise(shape, 0)
    if content == "smooth":
        return samples.smooth(shape, 1)
    if content not in samples.STEPS:
        raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
    return samples.mixture(shape, samples.STEPS[content], 0)


def shape_label(shape):
    """'SD1.5 (1, 4, 64, 64)' for a shape of SHAPES, else the tuple."""
    name = next((k for k, v in SHAPES.items() if v == tuple(shape)), None)
    return f"{name} {tuple(shape)}" if name else str(tuple(shape))


def content_label(content):
    return f"x_t {content} (t={samples.STEPS[content]})" if content in samples.STEPS else content


def fp32_bytes(x):
    """The bytes GB/s figures are counted in: the latent as float32, whatever the codec sends."""
    return 4 * x.numel()


def rmse(x, y):
    return (y.double() - x.double()).pow(2).mean().sqrt().item()


def max_abs(x, y):
    return (y.double() - x.double()).abs().max().item()


def error_bound(x, codec, reference=None):
    """Per-element bound on |x - decode(encode(x, codec))|, float64, broadcastable to x.

    Float codecs: round to nearest, half an ulp, i.e. |x| * eps/2 (plus half the subnormal spacing).
    Int codecs: half a quantization step per channel, step_c = (hi_c - lo_c) / L, plus the float32
    rounding of (x - lo) * (1/step) + 1/2 (a few eps of L symbols, which can move a rounding
    decision) and of lo + q * step (a few eps of the magnitudes added; with a reference, beta * p
    is added back too, beta <= 1 for x_t).
    """
    xd = x.double()
    if codec == "fp32":
        return torch.zeros(())
    if codec in ("fp16", "bf16"):
        fi = torch.finfo(torch.float16 if codec == "fp16" else torch.bfloat16)
        return (xd.abs() + fi.smallest_normal) * (fi.eps / 2)
    levels = LEVELS[codec]
    c = x.shape[1] if x.dim() >= 2 else 1
    x3 = xd.reshape(x.shape[0], c, -1) if x.dim() >= 2 else xd.reshape(1, 1, -1)
    lo, hi = x3.amin((0, 2)), x3.amax((0, 2))
    step = ((hi - lo) / levels).float().double()
    magnitude = torch.maximum(lo.abs(), hi.abs())
    if reference is not None:
        magnitude = magnitude + reference.double().abs().max()
    bound_c = step * (0.5 + 4 * levels * _F32_EPS) + 4 * _F32_EPS * magnitude
    return bound_c.reshape((1, c) + (1,) * (x.dim() - 2)) if x.dim() >= 2 else bound_c


def check_decoded(x, y, codec, reference=None):
    """Raise AssertionError naming the worst element if y is not x within the codec's bound."""
    if y.shape != x.shape or y.dtype != x.dtype:
        raise AssertionError(f"decoded {tuple(y.shape)} {y.dtype}, expected {tuple(x.shape)} {x.dtype}")
    excess = (y.double() - x.double()).abs() - error_bound(x, codec, reference)
    worst = excess.max().item() if excess.numel() else 0.0
    if worst > 0:
        raise AssertionError(f"{codec}: decoded value off by {worst:.3e} more than the codec's bound")
