"""The decoder's strict rules of SPEC.md, each at its edge (accepted) and one past it (refused):
types (section 2), duplicate map keys (section 2), nothing after a zstd frame, an empty tensor's
included (section 6), and int4's padding nibble (section 4)."""
import msgpack
import numpy as np
import pytest
import torch
import zstandard

from latentwire.protocol import ProtocolError, checksum, decode, decode_message, encode, wire


class Pairs(list):
    """A msgpack map written pair by pair, so that a key may repeat."""


def pack(obj):
    packer = msgpack.Packer(use_bin_type=True)
    if isinstance(obj, dict):
        obj = Pairs(obj.items())
    if isinstance(obj, Pairs):
        return packer.pack_map_header(len(obj)) + b"".join(pack(k) + pack(v) for k, v in obj)
    if isinstance(obj, list):
        return packer.pack_array_header(len(obj)) + b"".join(pack(v) for v in obj)
    return packer.pack(obj)


def zstd(raw):
    return zstandard.ZstdCompressor(level=3).compress(raw)


def entry(payload, **fields):
    """An int8 tensor entry of len(payload) elements (lo 0, step 1) whose p and k describe ``payload``."""
    e = {"n": "x", "c": "int8", "d": "float32", "s": [len(payload)], "f": 0, "z": False, "p": len(payload),
         "k": checksum(payload), "q": np.array([0.0, 1.0], "<f4").tobytes()}
    e.update(fields)
    return e


def message(e, payload, meta=None, **top):
    h = {"m": b"LW", "v": 1, "t": [e], "s": meta or {}}
    h.update(top)
    return [pack(h), payload]


def refused(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)


# --- (a) types: a bool is a msgpack bool, an int a msgpack int -------------------------------------

RAW = bytes([0, 1, 2])
ZST = zstd(RAW)


@pytest.mark.parametrize("z, payload", [(True, ZST), (False, RAW)])
def test_z_as_a_bool_is_accepted(z, payload):
    assert decode(message(entry(payload, s=[3], z=z), payload)).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("z, payload", [(1, ZST), (1.0, ZST), (0, RAW), (0.0, RAW), ("true", ZST), (None, RAW)])
def test_z_as_anything_else_is_refused(z, payload):
    refused(message(entry(payload, s=[3], z=z), payload), r"key 'z' must be a msgpack bool, got ")


def test_v_as_an_int_of_any_width_is_accepted():
    frames = message(entry(RAW), RAW)
    assert decode(frames).numel() == 3
    wide = frames[0].replace(b"\xa1v\x01", b"\xa1v\xcf" + (1).to_bytes(8, "big"), 1)  # 1 as uint 64
    assert wide != frames[0] and decode([wide, RAW]).numel() == 3


@pytest.mark.parametrize("v", [1.0, True, "1", None])
def test_v_as_anything_but_an_int_is_refused(v):
    refused(message(entry(RAW), RAW, v=v), r"key 'v' must be a msgpack int, got ")


@pytest.mark.parametrize("key, good, bad", [
    ("f", 0, [False, 0.0]),
    ("p", 3, [3.0, True]),
    ("k", checksum(RAW), [float(checksum(RAW)), True]),
])
def test_int_fields_refuse_floats_and_bools(key, good, bad):
    assert decode(message(entry(RAW, **{key: good}), RAW)).numel() == 3
    for value in bad:
        refused(message(entry(RAW, **{key: value}), RAW), rf"key '{key}' must be a msgpack int, got ")


def test_dimensions_must_be_ints():
    assert decode(message(entry(RAW, s=[3, 1]), RAW)).shape == (3, 1)  # C = 1: q holds one lo, one step
    for dim in (3.0, True):
        refused(message(entry(RAW, s=[dim, 1]), RAW), "each dimension of shape .* must be a msgpack int")


def test_plane_lengths_must_be_ints():
    planes = [zstd(bytes(3)), zstd(bytes(3))]
    payload = b"".join(planes)
    e = entry(payload, c="fp16", s=[3], f=1, z=True, zl=[len(p) for p in planes])
    del e["q"]
    assert decode(message(e, payload)).tolist() == [0.0] * 3
    for bad in (float(len(planes[0])), True):
        refused(message({**e, "zl": [bad, len(planes[1])]}, payload), "each 'zl' plane length must be a msgpack int")


def test_the_reference_fingerprint_must_be_a_uint64():
    for bad, match in ((True, "must be a msgpack int"), (1.0, "must be a msgpack int"), (-1, "64-bit unsigned")):
        refused(message(entry(RAW, r=bad, b=np.float32(0).tobytes()), RAW), match)
    # the edge, 2^64 - 1, passes the header: the decoder then asks for that reference
    refused(message(entry(RAW, r=(1 << 64) - 1, b=np.float32(0).tobytes()), RAW), "against reference ffffffffffffffff")


def test_str_and_bin_do_not_stand_for_each_other():
    refused(message(entry(RAW, n=b"x"), RAW), "key 'n' must be a msgpack str, got bin")
    refused(message(entry(RAW, q="\0" * 8), RAW), "key 'q' must be a msgpack bin, got str")
    refused(message(entry(RAW), RAW, m="LW"), "magic 'LW' missing")


def test_meta_keeps_bools_ints_and_floats_apart():
    meta = decode_message(message(entry(RAW), RAW, {"a": True, "b": 1, "c": 1.0})).meta
    assert [type(meta[k]) for k in "abc"] == [bool, int, float]


# --- (b) duplicate map keys ------------------------------------------------------------------------

def _header(e=None, meta=None, top=None):
    e = e if e is not None else Pairs(entry(RAW).items())
    return [pack(Pairs(top or [("m", b"LW"), ("v", 1), ("t", [e]), ("s", meta if meta is not None else {})])), RAW]


def test_unique_keys_everywhere_are_accepted():
    frames = _header(meta=Pairs([("a", 1), ("b", {"a": 1, "b": [{"a": 2}]})]))
    assert decode_message(frames).meta == {"a": 1, "b": {"a": 1, "b": [{"a": 2}]}}


@pytest.mark.parametrize("where, frames", [
    ("top map", _header(top=[("m", b"LW"), ("v", 1), ("v", 1), ("t", [entry(RAW)]), ("s", {})])),
    ("top map, last", _header(top=[("m", b"LW"), ("v", 1), ("t", [entry(RAW)]), ("s", {}), ("s", {})])),
    ("tensor entry, same value", _header(e=Pairs(list(entry(RAW).items()) + [("z", False)]))),
    ("tensor entry, other value", _header(e=Pairs(list(entry(RAW).items()) + [("d", "float16")]))),
    ("meta", _header(meta=Pairs([("a", 1), ("a", 2)]))),
    ("map inside meta", _header(meta={"x": [Pairs([("k", None), ("k", None)])]})),
])
def test_a_key_twice_is_refused(where, frames):
    refused(frames, "duplicate key")


# --- (c) nothing after a zstd frame, an empty tensor's included -------------------------------------

@pytest.mark.parametrize("shape", [[0], [1, 0, 3, 3]])
def test_an_empty_tensors_exact_frame_is_accepted(shape):
    frames = encode(torch.zeros(shape), "int8", 3)
    assert decode(frames).shape == tuple(shape)


@pytest.mark.parametrize("tail", [b"\0", b"garbage", zstd(b""), zstd(b"\0")])
def test_bytes_after_an_empty_tensors_frame_are_refused(tail):
    payload = zstd(b"") + tail
    refused(message(entry(payload, s=[0], z=True), payload), f"{len(tail)} bytes after the zstd frame")


def test_an_empty_tensors_frame_that_holds_data_is_refused():
    # A frame header declaring 0 bytes, then one last raw block of 5: python-zstandard's one-shot
    # decompress would return b"" without looking at the block.
    payload = bytes.fromhex("28b52ffd2000") + bytes([5 << 3 | 1, 0, 0]) + b"hello"
    refused(message(entry(payload, s=[0], z=True), payload), "not a valid zstd frame")


def test_an_empty_shuffled_plane_with_bytes_after_it_is_refused():
    planes = [zstd(b""), zstd(b"")]
    e = entry(b"", c="fp16", s=[0], f=1, z=True)
    del e["q"]
    payload = b"".join(planes)
    assert decode(message({**e, "p": len(payload), "k": checksum(payload), "zl": [len(p) for p in planes]},
                          payload)).shape == (0,)
    planes[1] += b"\0"
    payload = b"".join(planes)
    refused(message({**e, "p": len(payload), "k": checksum(payload), "zl": [len(p) for p in planes]}, payload),
            "1 bytes after the zstd frame")


@pytest.mark.parametrize("tail, match", [(b"", None), (b"\0", "1 bytes after the zstd frame"),
                                         (zstd(b"x"), "bytes after the zstd frame")])
def test_bytes_after_a_tensors_frame(tail, match):
    payload = ZST + tail
    frames = message(entry(payload, s=[3], z=True), payload)
    if match is None:
        assert decode(frames).tolist() == [0.0, 1.0, 2.0]
    else:
        refused(frames, match)


def test_a_frame_without_its_content_size_is_refused():
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(RAW)
    refused(message(entry(payload, s=[3], z=True), payload), "does not declare its content size")


# --- (d) int4's padding nibble ---------------------------------------------------------------------

def int4(payload, n, **fields):
    return message(entry(payload, c="int4", s=[n], **fields), payload)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_int4_padding_nibble_zero_is_accepted_and_any_other_refused(n):
    body = bytes([0x21] * (n // 2))
    assert decode(int4(body + b"\x05", n)).tolist() == [1.0, 2.0] * (n // 2) + [5.0]
    for pad in (1, 0xF):
        refused(int4(body + bytes([pad << 4 | 5]), n), f"padding nibble is {pad}, must be 0")


def test_int4_even_count_has_no_padding():
    assert decode(int4(bytes([0xF5]), 2)).tolist() == [5.0, 15.0]


def test_int4_padding_nibble_inside_zstd_and_through_lorenzo():
    ok, bad = zstd(b"\x21\x05"), zstd(b"\x21\x15")
    assert decode(int4(ok, 3, z=True)).tolist() == [1.0, 2.0, 5.0]
    refused(int4(bad, 3, z=True), "padding nibble is 1")
    # lorenzo (rank >= 3): the residuals are packed, and their padding nibble too must be 0
    x = torch.arange(15.0).reshape(1, 1, 3, 5)
    frames = encode(x, "int4", 3, filter="lorenzo")
    h = msgpack.unpackb(frames[0])
    raw = bytearray(zstandard.ZstdDecompressor().decompress(bytes(frames[1])))
    assert h["t"][0]["f"] == 2 and raw[-1] >> 4 == 0
    raw[-1] |= 0x30
    payload = zstd(bytes(raw))
    h["t"][0].update(p=len(payload), k=checksum(payload))
    refused([pack(h), payload], "padding nibble is 3")


def test_int4_padding_nibble_is_checked_on_the_accelerator_path_too(monkeypatch):
    monkeypatch.setattr(wire, "_numpy_path", lambda device: False)  # int4 moves packed to the device
    assert decode(int4(b"\x21\x05", 3), device="cpu").tolist() == [1.0, 2.0, 5.0]
    with pytest.raises(ProtocolError, match="padding nibble is 1"):
        decode(int4(b"\x21\x15", 3), device="cpu")
