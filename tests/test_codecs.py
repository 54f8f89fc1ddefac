"""Round trips of every codec, with error bounds that follow from the codec's own rounding."""
import numpy as np
import pytest
import torch

from latentwire.protocol import DEFAULT_LIMITS, ProtocolError, decode, encode, wire_bytes
from latentwire.protocol import quant, wire
from latentwire.protocol.header import CODECS, unpack_header
from latentwire.protocol.samples import noise, smooth

SHAPES = [(7,), (3, 5), (3, 4, 17, 23), (1, 4, 64, 64), (2, 16, 3, 9, 11), (1, 3, 1, 1), (6, 42, 1, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS32 = float(np.finfo(np.float32).eps)


def _latent(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Channels with different scales and offsets, as a VAE latent has.
    c = shape[1] if len(shape) > 1 else 1
    scale = torch.linspace(0.5, 3.0, c).reshape((1, c) + (1,) * (len(shape) - 2)) if len(shape) > 1 else 2.0
    offset = torch.linspace(-1.0, 2.0, c).reshape((1, c) + (1,) * (len(shape) - 2)) if len(shape) > 1 else 0.5
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype)


def header(frames):
    return unpack_header(frames[0], DEFAULT_LIMITS)[0][0]


def assert_within_quant_bound(x, y, frames):
    """|x - y| <= step_c / 2 per channel, plus float32 rounding: the decoded lo + q * step is a float32
    near x, so it can be off by half an ulp of |x| (eps * |x| / 2), and q * step by half an ulp of it."""
    h = header(frames)
    lo, step = h.lo_step()
    b, c, m = quant.channel_view(tuple(x.shape))
    x3 = x.double().reshape(b, c, m)
    err = (x3 - y.double().reshape(b, c, m)).abs().amax(dim=(0, 2))
    mag = x3.abs().amax(dim=(0, 2)) if x.numel() else torch.zeros(c, dtype=torch.float64)
    bound = torch.from_numpy(step.astype(np.float64)) / 2 * (1 + 1e-5) + EPS32 * mag
    if x.dtype in (torch.float16, torch.bfloat16):  # decoding rounds back to the sender's dtype
        bound = bound + mag * (2.0 ** -8 if x.dtype == torch.bfloat16 else 2.0 ** -11)
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("level", [0, 3])
def test_round_trip_shape_dtype_and_bound(shape, dtype, codec, level):
    x = _latent(shape, dtype)
    frames = encode(x, codec, level)
    y = decode(frames)
    assert y.shape == x.shape and y.dtype == x.dtype
    if codec in ("fp32", "fp16", "bf16"):
        wire = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
        assert torch.equal(y, x.to(wire).to(dtype))  # a float codec is exactly the cast
    else:
        assert_within_quant_bound(x, y, frames)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quant_step_is_the_channel_range_over_levels(codec):
    x = _latent((2, 3, 9, 10))
    lo, step = header(encode(x, codec)).lo_step()
    levels = quant.LEVELS[codec]
    xc = x.transpose(0, 1).reshape(3, -1)
    np.testing.assert_array_equal(lo, xc.amin(1).numpy())
    np.testing.assert_allclose(step, ((xc.amax(1).double() - xc.amin(1).double()) / levels).numpy(), rtol=EPS32)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("content", ["smooth", "noise"])
def test_lorenzo_filter_is_lossless_on_symbols(codec, content):
    x = (smooth if content == "smooth" else noise)((2, 4, 13, 17))
    plain = decode(encode(x, codec, 3, filter="none"))
    forced = encode(x, codec, 3, filter="lorenzo")
    assert header(forced).filter == 2
    assert torch.equal(decode(forced), plain)


def test_auto_filter_predicts_smooth_latents_and_not_noise():
    shape = (1, 4, 64, 64)
    auto_smooth = encode(smooth(shape), "int8", 3)
    assert header(auto_smooth).filter == 2
    assert wire_bytes(auto_smooth) < 0.85 * wire_bytes(encode(smooth(shape), "int8", 3, filter="none"))
    assert header(encode(noise(shape), "int8", 3)).filter == 0


def test_float_codecs_shuffle_bytes_only_with_zstd():
    x = _latent((1, 4, 8, 8))
    assert header(encode(x, "fp16", 3)).filter == 1
    assert header(encode(x, "fp16", 0)).filter == 0
    assert torch.equal(decode(encode(x, "fp16", 3, filter="none")), decode(encode(x, "fp16", 3)))


@pytest.mark.parametrize("codec", CODECS)
def test_non_contiguous_and_zero_size(codec):
    x = _latent((2, 4, 10, 12)).permute(0, 1, 3, 2)[:, :, ::2]
    assert not x.is_contiguous()
    y = decode(encode(x, codec, 1))
    assert y.shape == x.shape
    if codec == "fp32":
        assert torch.equal(y, x)
    for shape in [(0,), (1, 0, 4, 4), (1, 4, 0, 4), (0, 4, 3, 3, 3)]:
        z = torch.empty(shape)
        out = decode(encode(z, codec, 3))
        assert out.shape == z.shape and out.dtype == z.dtype


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_constant_and_tiny_range_channels_decode_to_their_value(codec):
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 7.25
    x[:, 1] = -3.0
    x[:, 2, 0, 0] = 1e-39  # a subnormal range: step 0, error below float32's smallest normal
    y = decode(encode(x, codec))
    assert torch.equal(y[:, :2], x[:, :2])
    assert (y[:, 2] - x[:, 2]).abs().max() <= 1e-38


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, -1e5])
def test_channel_offset_much_larger_than_its_range_keeps_the_bound(codec, offset):
    """x = offset + 0.01 z: float32 holds x to ~offset * 6e-8, far below the step only if lo is
    subtracted before scaling (a folded x*inv - lo*inv loses whole steps here)."""
    x = offset + 0.01 * torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    frames = encode(x, codec, 0)
    assert_within_quant_bound(x, decode(frames), frames)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_by_quantizing_codecs(codec, bad):
    x = _latent((1, 4, 5, 5))
    x[0, 2, 1, 1] = bad
    with pytest.raises(ProtocolError, match="channel 2.*fp32"):
        encode(x, codec)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_non_finite_values_pass_through_float_codecs(codec):
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    y = decode(encode(x, codec, 3))
    assert torch.isnan(y[1]) and y[2] == float("inf") and y[3] == -float("inf")


def test_channel_too_wide_for_float32_is_refused():
    x = torch.tensor([[-3e38, 3e38]]).reshape(1, 1, 2)
    with pytest.raises(ProtocolError, match="wider than float32"):
        encode(x, "int8")


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_torch_path_equals_numpy_path(codec):
    """The accelerator path (torch ops) computes the same symbols and values as the CPU path (numpy), bit for
    bit: both do SPEC.md section 4's float32 operations in the same order, ties included."""
    x = _latent((2, 5, 9, 7))
    levels = quant.LEVELS[codec]
    x3 = x.reshape(2, 5, -1)
    lo, hi = quant.channel_ranges(x3.numpy(), "x")
    lo_t, hi_t = quant.channel_ranges_torch(x3, "x")
    np.testing.assert_array_equal(lo, lo_t)
    np.testing.assert_array_equal(hi, hi_t)
    step = quant.steps_for(lo, hi, levels)
    q_np = quant.quantize(x3.numpy(), lo.astype(np.float32), step, levels)
    q_t = quant.quantize_torch(x3, lo.astype(np.float32), step, levels).numpy()
    np.testing.assert_array_equal(q_np, q_t)
    np.testing.assert_array_equal(quant.dequantize(q_np, lo, step),
                                  quant.dequantize_torch(torch.from_numpy(q_np), lo, step).numpy())


def test_int4_packs_two_values_a_byte():
    for n in [0, 1, 2, 7, 8]:
        sym = np.arange(n, dtype=np.uint8) % 16
        packed = quant.pack_nibbles(sym)
        assert packed.size == (n + 1) // 2
        np.testing.assert_array_equal(quant.unpack_nibbles(packed, n), sym)
    assert quant.pack_nibbles(np.array([1, 2], np.uint8)).tolist() == [0x21]


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("residual", [False, True])
def test_accelerator_path_end_to_end(monkeypatch, codec, residual):
    """What a CUDA tensor goes through (torch ops on its device), run here on CPU tensors."""
    x, ref = _latent((2, 4, 6, 6)), _latent((2, 4, 6, 6), seed=1)
    x = ref + 0.05 * x  # mostly the reference, so the residual fits and is used
    kwargs = {"reference": ref} if residual else {}
    cpu_frames = encode(x, codec, 3, **kwargs)
    assert (header(cpu_frames).reference is not None) == residual
    expected = decode(cpu_frames, **kwargs)
    monkeypatch.setattr(wire, "_numpy_path", lambda device: False)
    frames = encode(x, codec, 3, **kwargs)
    assert unpack_header(frames[0], DEFAULT_LIMITS)[0][0].reference == header(cpu_frames).reference
    assert_within_quant_bound(x, decode(frames, **kwargs), frames)
    np.testing.assert_allclose(decode(cpu_frames, device="cpu", **kwargs).numpy(), expected.numpy(),
                               rtol=4 * EPS32, atol=4 * EPS32 * x.abs().max().item())


def test_writable_frames_decode_without_a_copy():
    x = _latent((1, 4, 8, 8))
    frames = encode(x, "fp32", 0)
    payload = bytearray(frames[1])
    y = decode([frames[0], payload])
    payload[0:4] = np.float32(123.0).tobytes()  # the tensor aliases the frame
    assert y.flatten()[0].item() == 123.0
    ro = bytes(frames[1])
    z = decode([frames[0], ro])  # a read-only frame is copied, so the tensor is writable
    assert torch.equal(z, x)
    z.zero_()
    assert bytes(frames[1]) == ro and x.abs().sum() > 0


def test_fp32_level0_payload_is_the_tensor_memory():
    x = _latent((1, 4, 8, 8))
    payload = encode(x, "fp32", 0)[1]
    assert isinstance(payload, memoryview)
    assert np.frombuffer(payload, np.uint8).ctypes.data == x.data_ptr()
