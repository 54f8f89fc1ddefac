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

NONE, SHUFFLE, LORENZO = 0, 1, 2
NAMES = {"none": NONE, "shuffle": SHUFFLE, "lorenzo": LORENZO}

# Auto mode uses the Lorenzo filter when, on a sample of rows, the mean |residual| is below this
# share of the mean |symbol - mean|. For white noise the ratio is ~2 (four noisy terms), for a
# smooth field ~0.1; 0.7 keeps it off unless it saves about half a bit per value.
LORENZO_GAIN = 0.7
SAMPLE_ROWS = 8


def shuffle(raw, itemsize):
    """Bytes (uint8, length n*itemsize) -> byte planes, plane k holding byte k of every value."""
    return raw.reshape(-1, itemsize).T.copy().reshape(-1)  # copy(): always a new C-order array


def unshuffle(planes, itemsize):
    return planes.reshape(itemsize, -1).T.copy().reshape(-1)


def lorenzo_encode(q):
    """uint8 (..., H, W) -> uint8 residuals (wrapping arithmetic is the modulo)."""
    r = np.diff(q, axis=-1, prepend=np.uint8(0))
    return np.diff(r, axis=-2, prepend=np.uint8(0))


def lorenzo_decode(r):
    """Inverse of ``lorenzo_encode``: running sums over H then W, in uint8 (mod 256)."""
    q = np.cumsum(r, axis=-2, dtype=np.uint8)
    return np.cumsum(q, axis=-1, dtype=np.uint8, out=q)


def lorenzo_pays(q, levels):
    """Whether the Lorenzo filter is expected to shrink these symbols (uint8, (..., H, W))."""
    if q.ndim < 3 or q.shape[-1] < 2 or q.shape[-2] < 2 or q.size == 0:
        return False
    sample = q[..., : SAMPLE_ROWS, :].astype(np.int16)
    r = lorenzo_encode(sample.astype(np.uint8)).astype(np.int16)
    modulus = 256 if levels == 255 else 16
    r = (r % modulus + modulus // 2) % modulus - modulus // 2  # back to a signed residual
    spread = np.abs(sample - sample.mean()).mean()
    return bool(np.abs(r).mean() < LORENZO_GAIN * spread)


def can_lorenzo(shape):
    return len(shape) >= 3 and shape[-1] >= 1 and shape[-2] >= 1
