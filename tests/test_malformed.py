"""Bad input never crashes, hangs or allocates without bound: every failure is a ProtocolError."""
import random

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from latentwire.protocol import Limits, ProtocolError, checksum, decode, decode_message, encode, encode_message
from latentwire.protocol.header import MAX_META_DEPTH, unpack_header
from latentwire.protocol.limits import MAX_NAME_BYTES, MAX_RANK


def forge(entry=None, payload=b"", **top):
    """A message with one hand-written tensor entry; the checksum is right unless the entry says otherwise."""
    e = {"n": "x", "c": "int8", "d": "float32", "s": [len(payload)], "f": 0, "z": False, "p": len(payload),
         "k": checksum(payload), "q": np.array([0.0, 1.0], "<f4").tobytes()}
    e.update(entry or {})
    e = {k: v for k, v in e.items() if v is not ...}
    header = {"m": b"LW", "v": 1, "t": [e], "s": {}}
    header.update(top)
    return [msgpack.packb(header, use_bin_type=True), payload]


def test_forged_baseline_decodes():
    assert decode(forge(payload=bytes([0, 1, 2]))).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("frames, match", [
    ([], "no frames"),
    ("not a list", "list of bytes"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "magic"),
    ([msgpack.packb({"m": b"XX", "v": 1, "t": [], "s": {}})], "magic"),
    ([msgpack.packb({"m": b"LW", "v": 2, "t": [], "s": {}})], "version 2 is not supported"),
    ([msgpack.packb({"m": b"LW", "v": 1, "t": [], "s": {}, "extra": 1})], "unknown keys"),
    ([msgpack.packb({"m": b"LW", "v": 1, "s": {}})], "missing key 't'"),
    ([object()], "not a bytes-like"),
])
def test_bad_headers(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)


@pytest.mark.parametrize("entry, payload, match", [
    ({"c": "int7"}, b"\0", "unknown codec 'int7'"),
    ({"d": "int32"}, b"\0", "unknown dtype 'int32'"),
    ({"s": [1, 1, 1, 1, 1, 1]}, b"\0", "rank 6"),
    ({"s": []}, b"", "rank 0"),
    ({"s": [-1]}, b"\0", "negative dimension -1"),
    ({"s": [1.5]}, b"\0", "must be a msgpack int, got float 1.5"),
    ({"s": [2]}, b"\0", "disagrees with shape"),
    ({"p": 5}, b"\0", "payload of 5 bytes disagrees"),
    ({"p": 5, "z": True}, b"\0", "payload frame has 1 bytes, header says 5"),
    ({"k": 12345}, b"\0", "checksum mismatch"),
    ({"k": -1}, b"\0", "64-bit"),
    ({"f": 2}, b"\0", "filter 2 is not valid"),
    ({"f": 1}, b"\0", "filter 1 is not valid"),
    ({"q": b"\0" * 4}, b"\0", "'q' holds 4 bytes"),
    ({"q": np.array([0.0, np.nan], "<f4").tobytes()}, b"\0", "finite"),
    ({"q": np.array([0.0, -1.0], "<f4").tobytes()}, b"\0", "step >= 0"),
    ({"q": ...}, b"\0", "missing key 'q'"),
    ({"r": 7, "b": b"\0\0"}, b"\0", "'b' must hold 1"),
    ({"zz": 1}, b"\0", "unknown keys"),
    ({"z": 1}, b"\0", "'z' must be a msgpack bool, got int 1"),
    ({"n": 3}, b"\0", "'n' must be a msgpack str, got int 3"),
    ({"c": "fp32", "s": [1], "q": ..., "r": 1, "b": b"\0" * 4}, b"\0\0\0\0", "residual coding needs an int codec"),
    ({"c": "fp16", "s": [1], "q": ..., "f": 1, "z": True}, b"\0", "missing key 'zl'"),
    ({"c": "fp16", "s": [1], "q": ..., "f": 1, "z": True, "zl": [1]}, b"\0", "'zl' must list 2"),
    ({"c": "fp16", "s": [1], "q": ..., "f": 1, "z": True, "zl": [1, 1]}, b"\0", "adding up"),
    ({"c": "fp16", "s": [1], "q": ..., "f": 1, "z": True, "zl": [1, -1, 1]}, b"\0", "'zl' must list"),
    ({"zl": [1]}, b"\0", "'zl' goes only"),
])
def test_bad_tensor_entries(entry, payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode(forge(entry, payload))


def test_shuffled_planes_must_each_inflate_to_one_plane():
    planes = [zstandard.ZstdCompressor().compress(bytes(3)), zstandard.ZstdCompressor().compress(bytes(4))]
    payload = b"".join(planes)
    entry = {"c": "fp16", "s": [3], "q": ..., "f": 1, "z": True, "zl": [len(p) for p in planes]}
    with pytest.raises(ProtocolError, match="declares 4 bytes, the header implies 3"):
        decode(forge(entry, payload))
    ok = [zstandard.ZstdCompressor().compress(bytes(3))] * 2
    assert decode(forge({**entry, "zl": [len(p) for p in ok]}, b"".join(ok))).tolist() == [0.0] * 3


def test_frame_count_must_match_the_header():
    frames = encode_message({"a": torch.zeros(3), "b": torch.ones(2)})
    with pytest.raises(ProtocolError, match="3 frames"):
        decode_message(frames[:2])
    with pytest.raises(ProtocolError, match="3 frames"):
        decode_message(frames + [b""])
    with pytest.raises(ProtocolError, match="one-tensor"):
        decode(frames)


def test_truncated_and_corrupted_payloads():
    frames = encode(torch.randn(1, 4, 8, 8), "int8", 3)
    payload = bytes(frames[1])
    with pytest.raises(ProtocolError, match="truncated"):
        decode([frames[0], payload[:-1]])
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(ProtocolError, match="checksum"):
        decode([frames[0], bytes(flipped)])


def test_zstd_bomb_declaring_its_size_is_refused_before_inflating():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 24))  # 16 MiB of zeros in ~500 bytes
    with pytest.raises(ProtocolError, match="declares 16777216 bytes, the header implies 10"):
        decode(forge({"s": [10], "z": True}, bomb))


def test_zstd_bomb_hiding_its_size_is_refused_before_inflating():
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(1 << 24))
    with pytest.raises(ProtocolError, match="does not declare its content size; the header implies 10"):
        decode(forge({"s": [10], "z": True}, bomb))


def test_zstd_payload_with_trailing_data_or_wrong_size():
    ok = zstandard.ZstdCompressor().compress(bytes(10))
    with pytest.raises(ProtocolError, match="zstd"):
        decode(forge({"s": [10], "z": True}, ok + b"\0trailing"))
    with pytest.raises(ProtocolError, match="zstd"):
        decode(forge({"s": [11], "z": True}, ok))
    with pytest.raises(ProtocolError, match="zstd"):
        decode(forge({"s": [10], "z": True}, b"not zstd at all"))


# --- limits: each at its edge, and one past it ---------------------------------------------------

def test_max_elements_edge():
    limits = Limits(max_elements=120, max_message_elements=1000)
    assert decode(encode(torch.zeros(4, 30)), limits=limits).shape == (4, 30)
    with pytest.raises(ProtocolError, match="121 elements, over the limit of 120"):
        decode(encode(torch.zeros(11, 11)), limits=limits)


def test_max_elements_edge_in_a_single_dimension_is_checked_before_multiplying():
    with pytest.raises(ProtocolError, match="dimension 101 of shape \\[101, 0\\] is over the limit of 100"):
        decode(forge({"s": [101, 0]}, b""), limits=Limits(max_elements=100))


def test_max_message_elements_edge():
    limits = Limits(max_elements=100, max_message_elements=150)
    assert len(decode_message(encode_message({"a": torch.zeros(100), "b": torch.zeros(50)}), limits=limits).tensors) == 2
    with pytest.raises(ProtocolError, match="151 elements"):
        decode_message(encode_message({"a": torch.zeros(100), "b": torch.zeros(51)}), limits=limits)


def test_max_tensors_edge():
    limits = Limits(max_tensors=3)
    assert len(decode_message(encode_message({str(i): torch.zeros(1) for i in range(3)}), limits=limits).tensors) == 3
    with pytest.raises(ProtocolError, match="4 tensors, over the limit of 3"):
        decode_message(encode_message({str(i): torch.zeros(1) for i in range(4)}), limits=limits)
    with pytest.raises(ProtocolError, match="65 tensors"):
        encode_message({str(i): torch.zeros(1) for i in range(65)})


def test_max_header_bytes_edge():
    frames = encode(torch.zeros(1))
    limits = Limits(max_header_bytes=len(frames[0]))
    assert decode(frames, limits=limits).shape == (1,)
    with pytest.raises(ProtocolError, match=f"{len(frames[0])} bytes, over the limit of {len(frames[0]) - 1}"):
        decode(frames, limits=Limits(max_header_bytes=len(frames[0]) - 1))


def test_name_length_edge():
    assert "a" * MAX_NAME_BYTES in decode_message(encode_message({"a" * MAX_NAME_BYTES: torch.zeros(1)})).tensors
    with pytest.raises(ProtocolError, match="at most 255 bytes"):
        encode_message({"a" * (MAX_NAME_BYTES + 1): torch.zeros(1)})
    with pytest.raises(ProtocolError, match="over 255 bytes"):
        decode(forge({"n": "a" * (MAX_NAME_BYTES + 1)}, b"\0"))


def test_rank_edge():
    assert decode(encode(torch.zeros((1,) * MAX_RANK))).dim() == MAX_RANK
    with pytest.raises(ProtocolError, match="rank 6"):
        encode(torch.zeros((1,) * (MAX_RANK + 1)))
    with pytest.raises(ProtocolError, match="rank 0"):
        encode(torch.tensor(1.0))


def test_zstd_level_edge():
    assert decode(encode(torch.ones(4), "int8", 22)).tolist() == [1.0] * 4
    for bad in (23, -1, 1.5, True):
        with pytest.raises(ProtocolError, match="zstd level"):
            encode(torch.ones(4), "int8", bad)


def test_meta_depth_edge():
    def nest(depth):
        v = 1
        for _ in range(depth):
            v = [v]
        return v
    assert decode_message(encode_message({}, {"a": nest(MAX_META_DEPTH)})).meta["a"] == nest(MAX_META_DEPTH)
    with pytest.raises(ProtocolError, match="deeper than"):
        encode_message({}, {"a": nest(MAX_META_DEPTH + 1)})
    deep = msgpack.packb({"m": b"LW", "v": 1, "t": [], "s": {"a": nest(MAX_META_DEPTH + 1)}})
    with pytest.raises(ProtocolError, match="deeper than"):
        decode_message([deep])


def test_meta_int_edge():
    assert decode_message(encode_message({}, {"a": (1 << 64) - 1, "b": -(1 << 63)})).meta == {
        "a": (1 << 64) - 1, "b": -(1 << 63)}
    with pytest.raises(ProtocolError, match="64 bits"):
        encode_message({}, {"a": 1 << 64})


@pytest.mark.parametrize("value, match", [(torch.zeros(2), "send tensors as tensors"), (object(), "cannot travel"),
                                          ({1: 2}, "keys must be str"), ({1.5, 2.5}, "cannot travel")])
def test_meta_values_must_be_msgpack_natives(value, match):
    with pytest.raises(ProtocolError, match=match):
        encode_message({}, {"v": value})


def test_meta_ext_types_are_refused_on_decode():
    frame = msgpack.packb({"m": b"LW", "v": 1, "t": [], "s": {"e": msgpack.ExtType(5, b"x")}})
    with pytest.raises(ProtocolError, match="cannot travel"):
        decode_message([frame])


@pytest.mark.parametrize("bad, match", [
    ("x", "torch.Tensor"), (torch.zeros(3, dtype=torch.int32), "dtype torch.int32"),
])
def test_encode_refuses_what_the_wire_cannot_carry(bad, match):
    with pytest.raises(ProtocolError, match=match):
        encode(bad)


def test_encode_refuses_unknown_codecs_and_filters():
    with pytest.raises(ProtocolError, match="unknown codec 'int3'"):
        encode(torch.zeros(3), "int3")
    with pytest.raises(ProtocolError, match="filter must be one of"):
        encode(torch.zeros(3), filter="delta")
    with pytest.raises(ProtocolError, match="rank >= 3"):
        encode(torch.zeros(3), "int8", filter="lorenzo")
    with pytest.raises(ProtocolError, match="for float codecs"):
        encode(torch.zeros(1, 1, 3, 3), "int8", filter="shuffle")
    with pytest.raises(ProtocolError, match="for int codecs"):
        encode(torch.zeros(1, 1, 3, 3), "fp16", filter="lorenzo")
    with pytest.raises(ProtocolError, match="only helps zstd"):
        encode(torch.zeros(1, 1, 3, 3), "int8", 0, filter="lorenzo")
    with pytest.raises(ProtocolError, match="not among the tensors"):
        encode_message({"a": torch.zeros(2)}, codecs={"b": "fp16"})


# --- fuzz: mutate valid messages; decode raises ProtocolError or returns a tensor ------------------

def _mutations(frames, rng):
    header, payload = bytes(frames[0]), bytes(frames[1])
    for _ in range(400):
        target = rng.choice(["header", "payload", "both"])
        h, p = bytearray(header), bytearray(payload)
        for buf in ([h] if target == "header" else [p] if target == "payload" else [h, p]):
            op = rng.choice(["flip", "truncate", "insert", "zero"])
            if not buf:
                continue
            i = rng.randrange(len(buf))
            if op == "flip":
                buf[i] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                del buf[i:]
            elif op == "insert":
                buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
            else:
                buf[i] = 0
        yield [bytes(h), bytes(p)]


@pytest.mark.parametrize("codec, level", [("int8", 3), ("int4", 0), ("fp16", 3), ("bf16", 0), ("int8", 0)])
def test_fuzz_mutated_messages(codec, level):
    rng = random.Random(f"{codec}{level}")
    frames = encode(torch.randn(2, 3, 7, 5), codec, level)
    outcomes = {"error": 0, "ok": 0}
    for mutated in _mutations(frames, rng):
        try:
            y = decode(mutated)
        except ProtocolError:
            outcomes["error"] += 1
        else:  # a mutation the checksum cannot see (a header field) must still give a well-formed tensor
            assert isinstance(y, torch.Tensor) and y.numel() <= 2 * 3 * 7 * 5
            outcomes["ok"] += 1
    assert outcomes["error"] > 300


# --- property tests: any shape, dtype and codec round-trips within its bound ----------------------

@settings(max_examples=150, deadline=None)
@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       codec=st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4"]),
       level=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2 ** 31), scale=st.floats(1e-6, 1e6))
def test_property_round_trip(shape, dtype, codec, level, seed, scale):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    x = torch.nan_to_num(x)  # fp16 overflows to inf past 65504; non-finite input has its own tests
    frames = encode(x, codec, level)
    y = decode(frames)
    assert y.shape == x.shape and y.dtype == x.dtype
    if codec in ("fp32", "fp16", "bf16"):
        wire = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
        assert torch.equal(y, x.to(wire).to(dtype))
    elif x.numel():
        entry = unpack_header(frames[0], Limits())[0][0]
        step = float(entry.lo_step()[1].max())
        mag = x.double().abs().max().item()
        cast = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(dtype, 0.0)
        assert (y.double() - x.double()).abs().max().item() <= step / 2 + mag * (8 * 2.0 ** -23 + cast)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_property_garbage_frames(frames):
    try:
        decode_message(frames)
    except ProtocolError:
        pass
