"""The quantize kernels (latentwire.kernels.quantize) against their torch reference and the protocol's numpy path.

Without a GPU the Triton kernels run in Triton's interpreter, which executes each program with
numpy's float32 arithmetic: exact, but slow, so the shapes are small. The kernels round every
operation as SPEC.md section 4 writes it (fusion off), so they agree with the reference and with
numpy bit for bit, not merely up to ties.
"""
import contextlib
import importlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # triton 3.9 reads this when @triton.jit decorates a kernel, i.e. when the kernel module is
    # imported, so it must be set before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py does; kept so the file stands alone

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from latentwire.protocol import DEFAULT_LIMITS, ProtocolError, decode, encode, quant, wire  # noqa: E402
from latentwire.protocol.header import unpack_header  # noqa: E402
from latentwire.protocol.samples import smooth  # noqa: E402

kq = importlib.import_module("latentwire.kernels.quantize")  # the module, whatever latentwire.kernels re-exports

EPS32 = float(np.finfo(np.float32).eps)
# (1, 2, 4100): one row spans two min/max chunks, and N is over the kernels' 1024-element block.
SHAPES = [(1, 3, 5, 7), (2, 4, 9, 11), (1, 1, 1), (3, 2, 1, 1, 5), (1, 2, 4100)]
EMPTY = [(0, 3, 4), (2, 0, 5), (1, 3, 0, 2)]


def _latent(shape, seed=0):
    """float32 (B, C, M) on DEVICE, channels with their own scale and offset, as a VAE latent's."""
    b, c, m = quant.channel_view(shape)
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, c).reshape(1, c, 1)
    offset = torch.linspace(-1.0, 2.0, c).reshape(1, c, 1)
    return (torch.randn((b, c, m), generator=g) * scale + offset).to(DEVICE)


def _params(x3, levels):
    """lo and step as the protocol computes them, float32 (C,) on x3's device."""
    lo, hi = quant.channel_ranges(x3.cpu().numpy(), "x")
    step = quant.steps_for(lo, hi, levels)
    return (torch.from_numpy(lo.astype(np.float32)).to(x3.device), torch.from_numpy(step).to(x3.device))


def _numpy_symbols(x3, lo, step, levels, packed):
    q = quant.quantize(x3.cpu().numpy(), lo.cpu().numpy(), step.cpu().numpy(), levels)
    return quant.pack_nibbles(q.reshape(-1)) if packed else q


@pytest.mark.parametrize("shape", SHAPES + EMPTY)
def test_channel_minmax_is_exact(shape):
    x3 = _latent(shape)
    lo, hi = kq.channel_minmax(x3, backend="triton")
    lo_ref, hi_ref = kq.channel_minmax_ref(x3)
    lo_np, hi_np = quant.channel_ranges(x3.cpu().numpy(), "x")
    assert lo.dtype == hi.dtype == torch.float32 and lo.shape == hi.shape == (x3.shape[1],)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
    np.testing.assert_array_equal(lo.cpu().numpy(), lo_np)
    np.testing.assert_array_equal(hi.cpu().numpy(), hi_np)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_channel_minmax_keeps_a_non_finite_value(bad):
    """A NaN must come out as NaN (the min/max instructions may drop it) so the protocol refuses it."""
    x3 = _latent((2, 3, 4100))
    x3[1, 2, 4099] = bad  # in the last partial chunk of the last row
    lo, hi = kq.channel_minmax(x3, backend="triton")
    lo_ref, hi_ref = kq.channel_minmax_ref(x3)
    torch.testing.assert_close(lo, lo_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(hi, hi_ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(lo[:2]).all() and not torch.isfinite(hi[2])


@pytest.mark.parametrize("shape", SHAPES + EMPTY)
@pytest.mark.parametrize("levels, packed", [(255, False), (15, False), (15, True)])
def test_quantize_and_dequantize_match_reference_and_numpy(shape, levels, packed):
    x3 = _latent(shape)
    lo, step = _params(x3, levels)
    q = kq.quantize(x3, lo, step, levels, packed=packed, backend="triton")
    q_ref = kq.quantize_ref(x3, lo, step, levels, packed)
    n = x3.numel()
    assert q.dtype == torch.uint8 and q.shape == (((n + 1) // 2,) if packed else x3.shape)
    assert torch.equal(q, q_ref)
    np.testing.assert_array_equal(q.cpu().numpy(), _numpy_symbols(x3, lo, step, levels, packed))
    assert n == 0 or int(q.max()) <= (255 if packed else levels)
    x_hat = kq.dequantize(q, lo, step, x3.shape, packed=packed, backend="triton")
    assert x_hat.dtype == torch.float32 and x_hat.shape == x3.shape
    assert torch.equal(x_hat, kq.dequantize_ref(q_ref, lo, step, x3.shape, packed))
    q_np = q.cpu().numpy()
    q_np = quant.unpack_nibbles(q_np, n) if packed else q_np
    np.testing.assert_array_equal(x_hat.cpu().numpy(),
                                  quant.dequantize(q_np.reshape(x3.shape), lo.cpu().numpy(), step.cpu().numpy()))


def test_constant_tiny_and_far_offset_channels():
    """step 0 (constant, subnormal range) quantizes to 0 and decodes to lo; a channel at 1e5 with a
    0.01 spread keeps its half-step bound (lo is subtracted before scaling)."""
    g = torch.Generator().manual_seed(1)
    x3 = torch.zeros(2, 4, 33)
    x3[:, 0] = 7.25
    x3[0, 1, 5] = 1e-39
    x3[:, 2] = 1e5 + 0.01 * torch.randn(2, 33, generator=g)
    x3[:, 3] = torch.randn(2, 33, generator=g)
    x3 = x3.to(DEVICE)
    for levels in (255, 15):
        lo, step = _params(x3, levels)
        assert step[0] == 0 and step[1] == 0
        packed = levels == 15
        q = kq.quantize(x3, lo, step, levels, packed=packed, backend="triton")
        assert torch.equal(q, kq.quantize_ref(x3, lo, step, levels, packed))
        x_hat = kq.dequantize(q, lo, step, x3.shape, packed=packed, backend="triton")
        assert torch.equal(x_hat[:, 0], x3[:, 0]) and (x_hat[:, 1] - x3[:, 1]).abs().max() <= 1e-38
        err = (x_hat - x3)[:, 2:].abs().amax(dim=(0, 2)).double()
        bound = step[2:].double() / 2 * (1 + 1e-5) + EPS32 * x3[:, 2:].abs().amax(dim=(0, 2)).double()
        assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8])
def test_int4_packing_is_byte_exact(n):
    """Every symbol 0..15 in every nibble position, odd counts padded with a zero high nibble."""
    sym = np.arange(n, dtype=np.uint8) % 16
    x3 = torch.from_numpy(sym.astype(np.float32)).reshape(1, 1, n).to(DEVICE)
    lo, step = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    packed = kq.quantize(x3, lo, step, 15, packed=True, backend="triton")
    np.testing.assert_array_equal(packed.cpu().numpy(), quant.pack_nibbles(sym))
    assert torch.equal(kq.dequantize(packed, lo, step, (1, 1, n), packed=True, backend="triton"), x3)


@pytest.mark.parametrize("call, match", [
    (lambda x, lo, st: kq.quantize(x.double(), lo, st, 255), "x3 must be a contiguous float32"),
    (lambda x, lo, st: kq.quantize(x.transpose(0, 2), lo, st, 255), "x3 must be a contiguous float32"),
    (lambda x, lo, st: kq.quantize(x, lo[:-1], st, 255), r"lo must be .* shape \(3,\)"),
    (lambda x, lo, st: kq.quantize(x, lo, st, 16), "levels must be one of"),
    (lambda x, lo, st: kq.quantize(x, lo, st, 255, packed=True), "needs levels=15"),
    (lambda x, lo, st: kq.quantize(x, lo, st, 255, backend="numpy"), "backend must be one of"),
    (lambda x, lo, st: kq.dequantize(x.new_zeros(4, dtype=torch.uint8), lo, st, (1, 3, 3), packed=True),
     "sym has 4 bytes, but shape"),
    (lambda x, lo, st: kq.dequantize(x.new_zeros(9), lo, st, (1, 3, 3)), "sym must be a contiguous uint8"),
])
def test_bad_arguments_raise_value_errors_that_name_them(call, match):
    x3 = _latent((1, 3, 3))
    lo, step = _params(x3, 255)
    with pytest.raises(kq.QuantizeInputError, match=match) as info:
        call(x3, lo, step)
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_triton_on_cpu_without_the_interpreter_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(kq, "_quantize_kernel", object())  # what @triton.jit makes without TRITON_INTERPRET
    x3 = _latent((1, 3, 3))
    with pytest.raises(kq.QuantizeInputError, match="TRITON_INTERPRET=1"):
        kq.channel_minmax(x3, backend="triton")


def test_max_numel_at_and_past_the_edge(monkeypatch):
    monkeypatch.setattr(kq, "MAX_NUMEL", 12)
    lo, step = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    kq.quantize(torch.zeros(1, 3, 4, device=DEVICE), lo, step, 255, backend="ref")
    with pytest.raises(kq.QuantizeInputError, match="over MAX_NUMEL = 12"):
        kq.quantize(torch.zeros(1, 3, 5, device=DEVICE), lo, step, 255, backend="ref")
    kq.dequantize(torch.zeros(6, dtype=torch.uint8, device=DEVICE), lo, step, (1, 3, 4), packed=True, backend="ref")
    with pytest.raises(kq.QuantizeInputError, match="over MAX_NUMEL = 12"):
        kq.dequantize(torch.zeros(8, dtype=torch.uint8, device=DEVICE), lo, step, (1, 3, 5), packed=True)


# --- the protocol's accelerator path running on the kernels ----------------------------------------

@contextlib.contextmanager
def _kernel_path(monkeypatch):
    """What a CUDA tensor goes through: the protocol's device path, on the Triton kernels."""
    with monkeypatch.context() as m:
        m.setattr(wire, "_numpy_path", lambda device: False)
        m.setattr(kq, "_default_backend", lambda device: "triton")
        yield


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("level, filt", [(0, "auto"), (3, "none"), (3, "lorenzo")])
def test_kernel_path_encodes_the_cpu_paths_bytes(monkeypatch, codec, level, filt):
    """Same ranges, same symbols: the frames are byte-identical to the numpy path's, and decoding
    them on the device (int4 unpacked there unless Lorenzo-filtered) gives the same values."""
    x = smooth((1, 3, 9, 11))
    cpu_frames = encode(x, codec, level, filter=filt)
    expected = decode(cpu_frames)
    with _kernel_path(monkeypatch):
        frames = encode(x.to(DEVICE), codec, level, filter=filt)
        on_device = decode(frames, device=DEVICE)
    assert [bytes(f) for f in frames] == [bytes(f) for f in cpu_frames]
    assert on_device.device.type == DEVICE and torch.equal(on_device.cpu(), expected)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_kernel_path_residual_coding_keeps_the_bound(monkeypatch, codec):
    """Encoded on the kernels, decoded by the normal CPU path, within half a step plus rounding."""
    shape = (2, 4, 6, 6)
    ref = _latent(shape, seed=1).reshape(shape)
    x = 0.8 * ref + 0.05 * _latent(shape).reshape(shape)  # the residual needs fewer levels than x
    with _kernel_path(monkeypatch):
        frames = encode(x, codec, 3, reference=ref)
    h = _header(frames)
    assert h.reference is not None
    y = decode(frames, reference=ref.cpu())
    x = x.cpu().double().transpose(0, 1).reshape(4, -1)
    err = (x - y.double().transpose(0, 1).reshape(4, -1)).abs().amax(dim=1)
    bound = torch.from_numpy(h.lo_step()[1].astype(np.float64)) / 2 * (1 + 1e-5) + EPS32 * x.abs().amax(dim=1)
    assert (err <= bound).all(), (err, bound)


def test_kernel_path_refuses_nan(monkeypatch):
    x = _latent((1, 4, 5, 5)).reshape(1, 4, 5, 5)
    x[0, 2, 1, 1] = float("nan")
    with _kernel_path(monkeypatch), pytest.raises(ProtocolError, match="channel 2.*fp32"):
        encode(x, "int8")


def _header(frames):
    return unpack_header(frames[0], DEFAULT_LIMITS)[0][0]
