"""Reversible filters applied before zstd, so that it is given something it can shrink.

- ``shuffle`` (float codecs): byte k of every value goes together (as blosc does). The sign and
  exponent bytes of a latent are nearly constant; the low mantissa bytes are noise. With zstd each
  plane is its own frame: one Huffman table per plane, and the noise planes are stored raw at
  memcpy speed (one frame over all planes cost 14.7 bits/value on fp16 noise, one a plane 13.5).
- ``lorenzo`` (int codecs): each symbol minus its 2-D Lorenzo prediction from the already-coded
  neighbours, over the last two dims (H, W), modulo 2^8:

      r[h, w] = q[h, w] - q[h, w-1] - q[h-1, w] + q[h-1, w-1]       (missing neighbours are 0)

  It is lossless on the symbols, so the error is exactly the quantizer's; on a smooth latent it
  turns ~7 bits of symbol entropy into ~3. Decoding is two running sums, modulo 2^8.
"""
import numpy as np
import torch

NONE, SHUFFLE, LORENZO = 0, 1, 2

# Auto mode uses the Lorenzo filter when, on a sample of rows, the residuals' standard deviation is
# below this share of the symbols'. For white noise the ratio is 2 (four noisy terms), for a smooth
# field ~0.1; 0.7 keeps it off unless it saves about half a bit per value (log2 of the ratio).
LORENZO_GAIN = 0.7
SAMPLE_ROWS = 8


def shuffle(raw, itemsize):
    """Bytes (uint8, length n*itemsize) -> ``itemsize`` byte planes (uint8, n each), plane k holding
    byte k of every value."""
    # Shifts on the whole word are ~10x faster here than numpy's strided byte transpose.
    words = raw.view(_WORD[itemsize])
    return [np.right_shift(words, 8 * k).astype(np.uint8) for k in range(itemsize)]


def unshuffle(planes, itemsize):
    """Byte planes (a list of ``itemsize`` uint8 arrays) -> the interleaved bytes, a new writable array."""
    words = planes[itemsize - 1].astype(_WORD[itemsize])
    for k in range(itemsize - 2, -1, -1):
        words <<= 8
        words |= planes[k]
    return words.view(np.uint8)


def split_planes(raw, itemsize):
    """One buffer holding ``itemsize`` planes back to back -> the list of planes."""
    n = raw.size // itemsize
    return [raw[k * n:(k + 1) * n] for k in range(itemsize)]


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
    """Whether the Lorenzo filter is expected to shrink these symbols (uint8, (..., H, W)).

    Compares the spread of the residuals with that of the symbols on the first SAMPLE_ROWS rows:
    zstd's cost per value grows with log2 of the spread, for the residuals and the symbols alike.
    """
    if q.ndim < 3 or q.shape[-1] < 2 or q.shape[-2] < 2 or q.size == 0:
        return False
    sample = q[..., :SAMPLE_ROWS, :]
    r = lorenzo_encode(sample).view(np.int8)  # the residual modulo 256, as a signed value
    if levels != 255:
        r = ((r + 8) & 0x0F) - 8  # modulo 16, signed
    # Variances by dot products: numpy's std() costs ~20 us of Python per call at these sizes.
    r = r.astype(np.float32).ravel()
    s = sample.astype(np.float32).ravel()
    n = s.size
    var_r = np.dot(r, r) / n  # residuals are centred on 0 by construction
    var_s = np.dot(s, s) / n - (s.sum() / n) ** 2
    return bool(var_r < LORENZO_GAIN ** 2 * var_s)


def can_lorenzo(shape):
    return len(shape) >= 3 and shape[-1] >= 1 and shape[-2] >= 1
