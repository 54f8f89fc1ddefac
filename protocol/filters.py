"""Reversible filters applied before zstd, so that it is given something it can shrink.

- ``shuffle`` (float codecs): byte k of every value goes together (as blosc does). The sign and
  exponent bytes of a latent are nearly constant; the low mantissa bytes are noise.
- ``lorenzo`` (int codecs): each symbol minus its 2-D Lorenzo prediction from the already-coded
  neighbours, over the last two dims (H, W), modulo 2^8:

      r[h, w] = q[h, w] - q[h, w-1] - q[h-1, w] + q[h-1, w-1]       (missing neighbours are 0)

  It is lossless on the symbols, so the error is exactly the quantizer's; on a smooth latent it
  turns ~7 bits of symbol entropy into ~3. Decoding is two running sums, modulo 2^8.
"""
import numpy as np
import torch

NONE, SHUFFLE, LORENZO = 0, 1, 2
NAMES = {"none": NONE, "shuffle": SHUFFLE, "lorenzo": LORENZO}

# Auto mode uses the Lorenzo filter when, on a sample of rows, the mean |residual| is below this
# share of the mean |symbol - mean|. For white noise the ratio is ~2 (four noisy terms), for a
# smooth field ~0.1; 0.7 keeps it off unless it saves about half a bit per value.
LORENZO_GAIN = 0.7
SAMPLE_ROWS = 8


def shuffle(raw, itemsize):
    """Bytes (uint8, length n*itemsize) -> byte planes, plane k holding byte k of every value."""
    # Shifts on the whole word are ~10x faster here than numpy's strided byte transpose.
    words = raw.view(_WORD[itemsize])
    n = words.size
    out = np.empty(n * itemsize, np.uint8)
    for k in range(itemsize):
        np.right_shift(words, 8 * k, out=out[k * n:(k + 1) * n], casting="unsafe")
    return out


def unshuffle(planes, itemsize):
    """Byte planes -> the interleaved bytes (a new, writable uint8 array)."""
    n = planes.size // itemsize
    words = planes[(itemsize - 1) * n:].astype(_WORD[itemsize])
    for k in range(itemsize - 2, -1, -1):
        words <<= 8
        words |= planes[k * n:(k + 1) * n]
    return words.view(np.uint8)


_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def lorenzo_encode(q):
    """uint8 (..., H, W) -> uint8 residuals (wrapping arithmetic is the modulo)."""
    d = q.copy()
    d[..., 1:] -= q[..., :-1]
    r = d.copy()
    r[..., 1:, :] -= d[..., :-1, :]
    return r


def lorenzo_decode(r):
    """Inverse of ``lorenzo_encode``: running sums over H then W, in uint8 (mod 256)."""
    # torch's uint8 cumsum runs ~3x faster than numpy's on this kind of machine (bench/README.md).
    t = torch.from_numpy(r if r.flags.writeable else r.copy())  # torch wants writable memory
    t = torch.cumsum(t, -2, dtype=torch.uint8)
    return torch.cumsum(t, -1, dtype=torch.uint8).numpy()


def lorenzo_pays(q, levels):
    """Whether the Lorenzo filter is expected to shrink these symbols (uint8, (..., H, W))."""
    if q.ndim < 3 or q.shape[-1] < 2 or q.shape[-2] < 2 or q.size == 0:
        return False
    sample = q[..., :SAMPLE_ROWS, :]
    r = lorenzo_encode(sample)
    if levels == 255:
        resid = np.abs(r.view(np.int8), dtype=np.int16)  # the int8 view is the residual modulo 256, signed
    else:
        r &= 0x0F
        resid = np.minimum(r, 16 - r)
    spread = np.abs(sample - np.float32(sample.mean()), dtype=np.float32)
    return bool(resid.mean() < LORENZO_GAIN * spread.mean())


def can_lorenzo(shape):
    return len(shape) >= 3 and shape[-1] >= 1 and shape[-2] >= 1
