"""The anchors latentwire is measured against, each a pair of callables:

    encode(x: float32 tensor) -> bytes          what would go on the wire
    decode(buf: bytes, shape) -> float32 tensor  what the receiver hands its model

Every anchor takes and gives back float32, as latentwire does (it restores the sender's dtype),
so the fp16 anchors pay for the cast both ways just as latentwire's fp16 codec does.
"""
import io
from dataclasses import dataclass
from typing import Callable

import blosc2
import numpy as np
import safetensors.torch
import torch
import zfpy

import cases

# zfp's fixed-accuracy mode keeps bit planes down to minexp = floor(log2(tolerance)), so only
# powers of two are distinct tolerances; the search below walks those exponents.
ZFP_EXPONENTS = range(-40, 5)


@dataclass(frozen=True)
class Anchor:
    name: str
    encode: Callable
    decode: Callable
    lossless: bool  # decode(encode(x)) == x exactly
    cast: str = "fp32"  # the float type it stores; fp16 anchors equal x.half() exactly


def _writable(buf, dtype):
    """A tensor over a copy of ``buf`` (one memcpy: what a receiver does with a read-only frame)."""
    return torch.frombuffer(bytearray(buf), dtype=dtype)


def _tobytes(dtype):
    def encode(x):
        return x.to(dtype).numpy().tobytes()

    def decode(buf, shape):
        return _writable(buf, dtype).reshape(shape).float()

    return encode, decode


def _safetensors(dtype):
    def encode(x):
        return safetensors.torch.save({"x": x.to(dtype)})

    def decode(buf, shape):
        return safetensors.torch.load(buf)["x"].float()

    return encode, decode


def _torch_save(dtype):
    def encode(x):
        f = io.BytesIO()
        torch.save(x.to(dtype), f)
        return f.getvalue()

    def decode(buf, shape):
        return torch.load(io.BytesIO(buf), weights_only=True).float()

    return encode, decode


def _blosc2(dtype):
    """blosc2 with its byte shuffle and zstd at clevel 1, one thread: the usual fast float compressor."""
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    itemsize = np.dtype(np_dtype).itemsize

    def encode(x):
        return blosc2.compress2(x.to(dtype).numpy(), typesize=itemsize, clevel=1, codec=blosc2.Codec.ZSTD,
                                filters=[blosc2.Filter.SHUFFLE], nthreads=1)

    def decode(buf, shape):
        out = np.empty(shape, np_dtype)
        blosc2.decompress2(buf, dst=out, nthreads=1)
        return torch.from_numpy(out).float()

    return encode, decode


def _zfp_shape(shape):
    """zfp codes 4^d blocks and pads every dimension to a multiple of 4, so a size-1 batch dimension
    would be coded four times over. A 2-D (B*C*[F*]H, W) array keeps each block inside one H x W
    plane (H is a multiple of 4 in every latent here); on these latents it came out no larger, at
    the same RMSE, than the natural (C, H, W) / (C, F, H, W) layout (the video's F = 21 pads to 24)."""
    return (-1, shape[-1])


def zfp(tolerance):
    """zfp fixed-accuracy (|error| <= tolerance) on the float32 latent."""

    def encode(x):
        return zfpy.compress_numpy(x.numpy().reshape(_zfp_shape(x.shape)), tolerance=tolerance)

    def decode(buf, shape):
        return torch.from_numpy(zfpy.decompress_numpy(buf)).reshape(shape)

    return Anchor(f"zfp tol=2^{int(np.log2(tolerance))}", encode, decode, lossless=False)


def matched_zfp(x, target_rmse):
    """The zfp anchor with the largest tolerance whose RMSE on ``x`` is <= target_rmse (binary search).

    RMSE grows with the tolerance exponent, so the search keeps the largest exponent that still
    meets the target. Returns None if even the smallest tolerance misses it.
    """
    def fits(e):
        a = zfp(2.0 ** e)
        return cases.rmse(x, a.decode(a.encode(x), x.shape)) <= target_rmse

    lo, hi = ZFP_EXPONENTS[0], ZFP_EXPONENTS[-1]
    if not fits(lo):
        return None
    while lo < hi:  # invariant: fits(lo)
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return zfp(2.0 ** lo)


def fixed():
    """The anchors that need no tuning: name -> Anchor. 'tobytes fp32' is the memcpy ceiling."""
    out = {}
    for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        lossless = dtype == torch.float32
        for kind, make in (("tobytes", _tobytes), ("safetensors", _safetensors), ("torch.save", _torch_save),
                           ("blosc2", _blosc2)):
            name = f"{kind} {label}"
            out[name] = Anchor(name, *make(dtype), lossless=lossless, cast=label)
    return out


CEILING = "tobytes fp32"
