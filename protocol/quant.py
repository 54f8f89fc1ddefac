"""Per-channel affine quantization: the int8 and int4 codecs (SPEC.md section 4, which is normative).

For channel c of x: (B, C, M) and L levels (255 for int8, 15 for int4), each line one rounding:

    lo_c, hi_c = min, max of x[:, c, :]                     float32, exact
    span_c     = hi_c - lo_c                                binary64 (refused if > float32's max)
    step_c     = float32(span_c / L)                        binary64 quotient, then float32; 0 if span_c < L * 2^-126
    inv_c      = 1 / step_c                                 float32 division; 0 where step_c = 0
    q          = trunc(min(max((x - lo_c) * inv_c + 1/2, 0), L))   float32: subtract, multiply, add, each rounded
    x_hat      = lo_c + q * step_c                          float32: multiply, round, add, round

all rounding to nearest even, no fused multiply-add. Multiplying by the rounded reciprocal is not
``floor((x - lo_c) / step_c + 1/2)``: the two differ on exact ties (a value at lo + 127.5 steps).
|x - x_hat| <= step_c / 2 plus float32 rounding. "Channel" is dim 1 of a tensor of rank >= 2 and
the whole tensor for rank 1; a channel whose range is below float32's smallest normal number times
L gets step 0: every value decodes to lo_c, off by less than L * 2^-126.

Two implementations of the same arithmetic, bit for bit: numpy for CPU tensors (measured faster
than the same torch ops on one core here: bench/test_quantize.py), latentwire.kernels.quantize for
tensors on an accelerator (Triton on CUDA, its torch reference elsewhere) so that only the 1-byte
symbols, int4's packed two a byte, cross PCIe. tests/test_spec_encoder.py rebuilds the vectors'
bytes from SPEC.md's text alone.
"""
import numpy as np
import torch

from .errors import ProtocolError

LEVELS = {"int8": 255, "int4": 15}
_TINY = float(np.finfo(np.float32).tiny)


def channel_view(shape):
    """(B, C, M) such that a C-order tensor of ``shape`` reshapes to it with channel on axis 1."""
    if len(shape) == 1:
        return 1, 1, shape[0]
    inner = 1
    for d in shape[2:]:
        inner *= d
    return shape[0], shape[1], inner


def channel_ranges(x3, name):
    """Per-channel (lo, hi) of a float32 (B, C, M) numpy array, as float64; finite or ProtocolError."""
    b, c, m = x3.shape
    if b * m == 0:
        return np.zeros(c), np.zeros(c)
    lo = x3.min(axis=(0, 2)).astype(np.float64)
    hi = x3.max(axis=(0, 2)).astype(np.float64)
    check_span(lo, hi, name)
    return lo, hi


_FLT_MAX = float(np.finfo(np.float32).max)


def check_span(lo, hi, name):
    """Raise ProtocolError unless every channel is finite and its span fits float32."""
    if (hi - lo <= _FLT_MAX).all():  # one test: NaN fails the comparison, Inf exceeds the bound
        return
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise ProtocolError(
            f"tensor {name!r} has NaN or Inf in channel {c}: the quantizing codecs need finite values; "
            "send it with codec 'fp32', 'fp16' or 'bf16', or replace the non-finite values first"
        )
    c = int(np.flatnonzero(hi - lo > _FLT_MAX)[0])
    raise ProtocolError(
        f"tensor {name!r} channel {c} spans [{lo[c]:g}, {hi[c]:g}], wider than float32 can subtract; "
        "send it with codec 'fp32'"
    )


def steps_for(lo, hi, levels):
    """float32 step per channel for the range [lo, hi] (float64 arrays holding float32 values).

    span and span / L are rounded in binary64, then the step once more to float32 (SPEC.md section 4).
    """
    span = hi - lo
    step = np.where(span >= _TINY * levels, span / levels, 0.0)
    return step.astype(np.float32)


def quantize(x3, lo, step, levels):
    """Symbols (uint8, shape of x3) of float32 (B, C, M) ``x3`` given float32-representable lo/step per channel."""
    step32 = step.astype(np.float32)
    # inv = 1 / step in float32 (a correctly rounded float32 division), then a multiply: not a
    # division per value. SPEC.md states it this way, ties included.
    inv = np.divide(np.float32(1.0), step32, out=np.zeros_like(step32), where=step32 > 0)[None, :, None]
    # floor((x - lo) * inv + 1/2) is the truncating cast for values >= 0. Subtracting lo first keeps
    # the product small and exact enough when a channel's offset dwarfs its range (x ~ 1e5 + 0.01 z);
    # folding lo into an offset term loses whole steps there. The clip keeps float32 rounding (and a
    # residual that exceeds the plain range by rounding) from wrapping past L in the uint8 cast.
    y = np.subtract(x3, lo.astype(np.float32)[None, :, None])
    y *= inv
    y += np.float32(0.5)
    np.clip(y, 0, levels, out=y)
    return y.astype(np.uint8)


def dequantize(q3, lo, step, out=None):
    """float32 (B, C, M) from uint8 symbols and per-channel float32 lo/step: lo + q * step."""
    out = np.multiply(q3, step.astype(np.float32)[None, :, None], out=out, dtype=np.float32)
    out += lo.astype(np.float32)[None, :, None]
    return out


# --- the same arithmetic on an accelerator: latentwire.kernels.quantize (Triton on CUDA) ------------
# protocol and kernels are both at the bottom of the package (the project's style guide, shared/STYLE.md
# beside the repository): protocol may use kernels, and kernels never import protocol. The import is inside
# each function because CPU tensors never need Triton (importing it costs ~0.5 s) and Triton fixes its
# interpreter mode when the kernels are decorated, at import. The names come from the module path,
# kernels.quantize, so that a function latentwire.kernels might one day re-export as ``quantize`` cannot stand
# in for the module.


def _on(device, values):
    return torch.from_numpy(np.array(values, np.float32)).to(device)  # a copy: header views are read-only


def channel_ranges_torch(x3, name):
    b, c, m = x3.shape
    if b * m == 0:
        return np.zeros(c), np.zeros(c)
    from ..kernels.quantize import channel_minmax
    lo, hi = channel_minmax(x3)
    lo, hi = lo.double().cpu().numpy(), hi.double().cpu().numpy()
    check_span(lo, hi, name)
    return lo, hi


def quantize_torch(x3, lo, step, levels, packed=False):
    """Symbols of a float32 (B, C, M) tensor on its device: uint8 (B, C, M), or int4 ``packed`` bytes."""
    from ..kernels.quantize import quantize as quantize_on_device
    return quantize_on_device(x3, _on(x3.device, lo), _on(x3.device, step), levels, packed=packed)


def dequantize_torch(q, lo, step, shape=None, packed=False):
    """float32 (B, C, M) = ``shape`` (default q's) on q's device from uint8 symbols or ``packed`` int4 bytes."""
    shape = tuple(q.shape) if shape is None else shape
    from ..kernels.quantize import dequantize as dequantize_on_device
    return dequantize_on_device(q, _on(q.device, lo), _on(q.device, step), shape, packed=packed)


# --- int4: two symbols a byte ---------------------------------------------------------------------

def pack_nibbles(sym):
    """uint8 symbols in [0, 15] (flat) -> bytes: element 2i in the low nibble, 2i+1 in the high one."""
    n = sym.size
    if n % 2:
        sym = np.concatenate([sym, np.zeros(1, np.uint8)])
    pairs = sym.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed, n):
    """Inverse of ``pack_nibbles``: the first ``n`` symbols."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]
