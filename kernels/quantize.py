"""Per-channel int8/int4 quantization of a latent on its device: ranges, symbols (int4 packed), values.

The arithmetic is protocol/SPEC.md section 4, for channel c of x: (B, C, M) and L levels (255 for
int8, 15 for int4):

    lo_c  = min x[:, c, :]                     hi_c = max x[:, c, :]        (channel_minmax)
    q     = floor((x - lo_c) * inv_c + 1/2)    clamped to [0, L]            (quantize)
            inv_c = 1 / step_c, or 0 where step_c = 0
    x_hat = q * step_c + lo_c                  float32: multiply, round, add, round  (dequantize)

int4 packs two symbols a byte: flat C-order element 2i in the low nibble, 2i+1 in the high nibble,
the high nibble of an odd count's last byte 0.

Why fused kernels: the torch reference makes a pass per operation. Quantizing N values reads and
writes ~37N bytes (subtract, scale, offset, clamp: 8N each; the uint8 cast 5N; int4 packing more);
the kernel reads the 4N bytes of x once and writes N (int8) or N/2 (int4) bytes of symbols, so only
those cross PCIe to the sender's socket. Dequantizing is 21N bytes in torch against N + 4N here.

Each operation has three parts: the private ``@triton.jit`` kernel, a launcher that checks,
allocates and launches, and the torch reference ``<op>_ref``. The public ``channel_minmax``,
``quantize`` and ``dequantize`` pick Triton for CUDA tensors and the reference elsewhere; CPU
tensors are better served by protocol/quant.py's numpy functions (see its docstring), which is what
latentwire.protocol uses for them. ``backend="ref"`` forces the reference; ``backend="triton"``
runs the kernels on CPU tensors too when TRITON_INTERPRET=1 was set before this module was
imported (triton 3.9 reads it when decorating; tests/conftest.py sets it).
"""
import torch

from ._triton import AVAILABLE as TRITON, InterpretedFunction, tl, triton

INT8_LEVELS, INT4_LEVELS = 255, 15
LEVELS = (INT8_LEVELS, INT4_LEVELS)
BACKENDS = ("triton", "ref")
# Indices are int32 in the kernels: an offset of up to N plus one block must stay below 2^31. The
# protocol's own limit is 2^27 elements a tensor.
MAX_NUMEL = 1 << 30

# Elements a program handles per iteration / in all. 1024 float32 = 4 KiB a load, 8 per thread at
# 4 warps; a min/max program reads a 16 KiB chunk, so an SDXL latent (4 x 16384) is 16 programs
# and a video latent (16 x 131040) 512, with one partial (lo, hi) per chunk for the second stage.
BLOCK = 1024
MINMAX_CHUNK = 4 * BLOCK


class QuantizeInputError(ValueError):
    """A tensor or argument handed to the quantize kernels has the wrong type, shape, dtype or device."""


# ------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _minmax_partial_kernel(x_ptr, lo_ptr, hi_ptr, C, M, chunks_per_row, partials,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (c, r): min and max of chunk r % chunks_per_row of row (r // chunks_per_row, c)."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = r // chunks_per_row
    start = (r - b * chunks_per_row) * CHUNK
    row_ptr = x_ptr + (b * C + c) * M
    acc_lo = tl.full([BLOCK], float("inf"), tl.float32)
    acc_hi = tl.full([BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < M
        x = tl.load(row_ptr + offs, mask=mask, other=0.0)
        acc_lo = tl.minimum(acc_lo, tl.where(mask, x, float("inf")))
        acc_hi = tl.maximum(acc_hi, tl.where(mask, x, float("-inf")))
        # tl.minimum/maximum need not propagate NaN (PTX min.f32 drops it), yet a NaN must reach
        # the caller, which refuses to quantize it: count NaNs on the side.
        nan = tl.maximum(nan, (x != x).to(tl.int32))
    has_nan = tl.max(nan, axis=0) > 0
    lo = tl.where(has_nan, float("nan"), tl.min(acc_lo, axis=0))
    hi = tl.where(has_nan, float("nan"), tl.max(acc_hi, axis=0))
    tl.store(lo_ptr + c * partials + r, lo)
    tl.store(hi_ptr + c * partials + r, hi)


@triton.jit
def _symbols(x_ptr, lo_ptr, inv_ptr, e, mask, C, M, LEVELS: tl.constexpr):
    """int32 symbols of flat elements ``e`` (0 where masked): floor((x - lo) * inv + 1/2) in [0, L]."""
    c = (e // M) % C
    x = tl.load(x_ptr + e, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    inv = tl.load(inv_ptr + c, mask=mask, other=0.0)
    # Subtract lo before scaling (a folded x * inv - lo * inv loses whole steps when a channel's
    # offset dwarfs its range); after the clamp y >= 0, so the truncating cast is the floor.
    y = (x - lo) * inv + 0.5
    y = tl.minimum(tl.maximum(y, 0.0), LEVELS)
    return tl.where(mask, y.to(tl.int32), 0)


@triton.jit
def _quantize_kernel(x_ptr, lo_ptr, inv_ptr, out_ptr, N, C, M,
                     LEVELS: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """Program p: output bytes [p * BLOCK, (p + 1) * BLOCK), a symbol each or (PACKED) two."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PACKED:
        # Byte k holds elements 2k and 2k+1; their channels may differ when M is odd. The two
        # stride-2 loads touch the same cache lines, so x is still read from memory once.
        e = 2 * k
        q0 = _symbols(x_ptr, lo_ptr, inv_ptr, e, e < N, C, M, LEVELS)
        q1 = _symbols(x_ptr, lo_ptr, inv_ptr, e + 1, e + 1 < N, C, M, LEVELS)  # 0 past an odd N
        tl.store(out_ptr + k, (q0 | (q1 << 4)).to(tl.uint8), mask=e < N)
    else:
        q = _symbols(x_ptr, lo_ptr, inv_ptr, k, k < N, C, M, LEVELS)
        tl.store(out_ptr + k, q.to(tl.uint8), mask=k < N)


@triton.jit
def _dequantize_kernel(sym_ptr, lo_ptr, step_ptr, out_ptr, N, C, M, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """Program p: output elements [p * BLOCK, (p + 1) * BLOCK)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < N
    if PACKED:
        byte = tl.load(sym_ptr + e // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((e & 1) * 4)) & 0xF
    else:
        q = tl.load(sym_ptr + e, mask=mask, other=0).to(tl.int32)
    c = (e // M) % C
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    step = tl.load(step_ptr + c, mask=mask, other=0.0)
    tl.store(out_ptr + e, q.to(tl.float32) * step + lo, mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers

def _channel_minmax_triton(x3):
    b, c, m = x3.shape
    chunks_per_row = triton.cdiv(m, MINMAX_CHUNK)
    partials = b * chunks_per_row
    lo = torch.empty((c, partials), dtype=torch.float32, device=x3.device)
    hi = torch.empty_like(lo)
    _minmax_partial_kernel[(c, partials)](x3, lo, hi, c, m, chunks_per_row, partials,
                                          CHUNK=MINMAX_CHUNK, BLOCK=BLOCK)
    # Second stage: C x (B * ceil(M / CHUNK)) partials, a few KiB; torch's amin/amax keep a NaN.
    return lo.amin(dim=1), hi.amax(dim=1)


def _quantize_triton(x3, lo, inv, levels, packed):
    n = x3.numel()
    _, c, m = x3.shape
    n_out = (n + 1) // 2 if packed else n
    out = torch.empty(n_out, dtype=torch.uint8, device=x3.device)
    # enable_fp_fusion=False: SPEC.md rounds the multiply and the add separately, as numpy and the
    # reference do; a fused multiply-add rounds once and would move ties to the other symbol.
    _quantize_kernel[(triton.cdiv(n_out, BLOCK),)](x3, lo, inv, out, n, c, m, LEVELS=levels, PACKED=packed,
                                                   BLOCK=BLOCK, enable_fp_fusion=False)
    return out if packed else out.view(x3.shape)


def _dequantize_triton(sym, lo, step, shape, packed):
    b, c, m = shape
    n = b * c * m
    out = torch.empty(shape, dtype=torch.float32, device=sym.device)
    # enable_fp_fusion=False: x_hat = lo + q * step rounds the product, then the sum (SPEC.md).
    _dequantize_kernel[(triton.cdiv(n, BLOCK),)](sym, lo, step, out, n, c, m, PACKED=packed, BLOCK=BLOCK,
                                                 enable_fp_fusion=False)
    return out


# ------------------------------------------------------------------------------------------------
# torch references (also the path for accelerators other than CUDA)

def channel_minmax_ref(x3):
    """(lo, hi): float32 (C,) each, of float32 (B, C, M) ``x3``; lo = hi = 0 for an empty channel."""
    b, c, m = x3.shape
    if b * c * m == 0:
        return torch.zeros(c, device=x3.device), torch.zeros(c, device=x3.device)
    return torch.aminmax(x3.transpose(0, 1).reshape(c, -1), dim=1)


def quantize_ref(x3, lo, step, levels, packed=False):
    """uint8 symbols of float32 (B, C, M) ``x3``: (B, C, M), or (ceil(N/2),) bytes if ``packed``."""
    inv = _reciprocal(step)[None, :, None]
    q = (x3 - lo[None, :, None]).mul_(inv).add_(0.5).clamp_(0, levels).to(torch.uint8)
    if not packed:
        return q
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return q[0::2] | (q[1::2] << 4)


def dequantize_ref(sym, lo, step, shape, packed=False):
    """float32 ``shape`` = (B, C, M) from uint8 symbols (or ``packed`` int4 bytes): lo + q * step."""
    if packed:
        sym = torch.stack([sym & 0x0F, sym >> 4], dim=1).reshape(-1)[:shape[0] * shape[1] * shape[2]]
    q = sym.reshape(shape)
    return (q.to(torch.float32) * step[None, :, None]).add_(lo[None, :, None])


def _reciprocal(step):
    """1 / step in float32, 0 where step is 0 (a constant channel: every symbol 0)."""
    return torch.where(step > 0, 1.0 / step, torch.zeros_like(step))


# ------------------------------------------------------------------------------------------------
# public functions

def channel_minmax(x3, *, backend=None):
    """Per-channel min and max of x3: float32 (B, C, M), contiguous, channel on axis 1.

    Returns (lo, hi), float32 (C,) each on x3's device. A channel holding a NaN gets NaN (callers
    refuse to quantize it); an empty channel (B * M == 0) gets lo = hi = 0.
    """
    _check_x3(x3)
    if _backend(backend, x3.device) == "ref" or x3.numel() == 0:  # empty: nothing to launch
        return channel_minmax_ref(x3)
    return _channel_minmax_triton(x3)


def quantize(x3, lo, step, levels, *, packed=False, backend=None):
    """uint8 symbols of x3: float32 (B, C, M), contiguous, given float32 (C,) ``lo`` and ``step``.

    levels: 255 (int8) or 15 (int4). Returns uint8 (B, C, M), or with ``packed`` (int4 only) the
    flat (ceil(N/2),) bytes of SPEC.md: element 2i in the low nibble, 2i+1 in the high one.
    """
    _check_x3(x3)
    _check_channel_params(lo, step, x3.shape[1], x3.device)
    if levels not in LEVELS:
        raise QuantizeInputError(f"levels must be one of {LEVELS} (int8, int4), got {levels!r}")
    if packed and levels != INT4_LEVELS:
        raise QuantizeInputError(f"packed=True puts two symbols in a byte, so it needs levels={INT4_LEVELS} "
                                 f"(int4), got levels={levels}; pass packed=False")
    if _backend(backend, x3.device) == "ref" or x3.numel() == 0:
        return quantize_ref(x3, lo, step, levels, packed)
    return _quantize_triton(x3, lo, _reciprocal(step), levels, packed)


def dequantize(sym, lo, step, shape, *, packed=False, backend=None):
    """float32 ``shape`` = (B, C, M) on sym's device: lo + q * step per channel.

    sym: uint8, contiguous: the N = B*C*M symbols (any shape), or with ``packed`` the (ceil(N/2),)
    int4 bytes ``quantize(..., packed=True)`` makes. lo, step: float32 (C,) on sym's device.
    """
    if not isinstance(sym, torch.Tensor) or sym.dtype != torch.uint8 or not sym.is_contiguous():
        raise QuantizeInputError(f"sym must be a contiguous uint8 tensor, got {_describe(sym)}")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise QuantizeInputError(f"shape must be (B, C, M), three ints >= 0, got {shape!r}")
    n = shape[0] * shape[1] * shape[2]
    expected = (n + 1) // 2 if packed else n
    if sym.numel() != expected:
        raise QuantizeInputError(f"sym has {sym.numel()} bytes, but shape {shape} with packed={packed} needs "
                                 f"{expected}; pass the shape the symbols were made from")
    if n > MAX_NUMEL:
        raise QuantizeInputError(f"shape {shape} has {n} elements, over MAX_NUMEL = {MAX_NUMEL}; split it")
    _check_channel_params(lo, step, shape[1], sym.device)
    if _backend(backend, sym.device) == "ref" or n == 0:
        return dequantize_ref(sym, lo, step, shape, packed)
    return _dequantize_triton(sym, lo, step, shape, packed)


def _default_backend(device):
    """Triton on CUDA where it is installed, the torch reference elsewhere (tests patch this to run the
    kernels on CPU)."""
    return "triton" if device.type == "cuda" and TRITON else "ref"


def _backend(backend, device):
    backend = _default_backend(device) if backend is None else backend
    if backend not in BACKENDS:
        raise QuantizeInputError(f"backend must be one of {BACKENDS} or None (by device), got {backend!r}; the "
                                 "CPU path is latentwire.protocol.quant's numpy functions")
    if backend == "triton" and not TRITON:
        raise QuantizeInputError("backend='triton' needs Triton, which is not installed (it has wheels for Linux "
                                 "only): pip install triton, or use backend=None or 'ref'")
    if backend == "triton" and device.type != "cuda" and not isinstance(_quantize_kernel, InterpretedFunction):
        raise QuantizeInputError(
            f"backend='triton' on a {device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before latentwire.kernels.quantize is imported, or use backend='ref'")
    return backend


def _check_x3(x3):
    if not isinstance(x3, torch.Tensor) or x3.dim() != 3 or x3.dtype != torch.float32 or not x3.is_contiguous():
        raise QuantizeInputError(f"x3 must be a contiguous float32 tensor of shape (B, C, M), got {_describe(x3)}; "
                                 "view it with the channel on axis 1 and call .float().contiguous()")
    if x3.numel() > MAX_NUMEL:
        raise QuantizeInputError(f"x3 has {x3.numel()} elements, over MAX_NUMEL = {MAX_NUMEL}; split it along B")


def _check_channel_params(lo, step, c, device):
    for name, t in (("lo", lo), ("step", step)):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (c,)
                or not t.is_contiguous() or t.device != device):
            raise QuantizeInputError(f"{name} must be a contiguous float32 tensor of shape ({c},) on {device}, "
                                     f"got {_describe(t)}")


def _describe(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    layout = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"{t.dtype} {tuple(t.shape)} {layout} on {t.device}"
