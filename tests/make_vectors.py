"""Writes protocol/vectors.json, the wire format's checked-in test vectors (SPEC.md, "Test vectors"):
messages a decoder must decode to given values ("vectors"), and messages it must reject with a given
error ("invalid", each breaking one rule of SPEC.md and valid in every other respect, so that the
order in which a decoder checks cannot change which error it reports).

Run from the repository root after a deliberate change of the wire format (which also bumps
WIRE_VERSION):  .venv/bin/python tests/make_vectors.py
tests/test_vectors.py checks both directions against the checked-in file.
"""
import json
from pathlib import Path

import msgpack
import torch
import zstandard

from latentwire.protocol import checksum, decode_message, encode_message

OUT = Path(__file__).resolve().parents[1] / "protocol" / "vectors.json"
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def t(values, shape, dtype="float32"):
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(DT[dtype])


def ramp(shape):
    n = torch.Size(shape).numel()
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64).reshape(shape).float()


# name, about, {tensor name: (tensor, codec, level, filter, reference or None)}, meta
CASES = [
    ("fp32-raw", "fp32, no zstd: the payload is the float32 little-endian bytes",
     {"x": (t([1.5, -0.0, 3.25e-3, -7.0, 1e30, 2.0 ** -130], (2, 3)), "fp32", 0, "none", None)}, {}),
    ("fp16-raw", "fp16 cast of a float32 tensor, restored to float32",
     {"x": (t([0.1, -0.2, 0.3, 65504.0, 1e-5, -1.0, 2.0, 0.5], (1, 2, 2, 2)), "fp16", 0, "none", None)}, {}),
    ("bf16-raw", "bf16 of a bfloat16 tensor",
     {"x": (t([1.0, -2.5, 0.0078125, 3.0e38], (4,), "bfloat16"), "bf16", 0, "none", None)}, {}),
    ("fp32-from-float64", "a float64 tensor sent as fp32 and restored to float64",
     {"x": (t([0.1, 1.0 / 3.0, -2.0], (3,), "float64"), "fp32", 0, "none", None)}, {}),
    ("int8-raw", "int8, two channels with their own lo/step",
     {"x": (torch.cat([ramp((1, 1, 3, 3)), 10 * ramp((1, 1, 3, 3)) + 5], 1), "int8", 0, "none", None)}, {}),
    ("int4-raw-odd", "int4 with an odd element count: the last byte's high nibble is 0",
     {"x": (ramp((1, 1, 3, 3)), "int4", 0, "none", None)}, {}),
    ("int8-zstd-lorenzo", "int8 symbols through the Lorenzo filter, then zstd level 3",
     {"x": (ramp((1, 1, 4, 5)), "int8", 3, "lorenzo", None)}, {}),
    ("fp16-zstd-shuffle", "fp16 bytes shuffled into planes, then zstd level 1",
     {"x": (t([0.1, -0.2, 0.3, 0.4, 1e-5, -1.0, 2.0, 0.5], (1, 2, 2, 2)), "fp16", 1, "shuffle", None)}, {}),
    ("int8-residual", "int8 residual coding against a reference both sides hold",
     {"x": (ramp((1, 1, 2, 4)) + 0.05 * t([1, -1, 1, -1, 1, -1, 1, -1], (1, 1, 2, 4)), "int8", 0, "none",
            ramp((1, 1, 2, 4)))}, {}),
    ("handoff", "a handoff message: int8+zstd latent, fp16 solver state, meta scalars",
     {"latent": (ramp((1, 2, 2, 3)), "int8", 3, "none", None),
      "solver/model_output.0": (t([0.5, -0.25, 0.125, 1.0], (1, 1, 2, 2)), "fp16", 0, "none", None)},
     {"kind": "handoff", "step_index": 12, "timestep": 521.0, "seed": 1234, "rng_state": None, "extra": {}}),
]


def flat(x):
    return [float(v) for v in x.double().flatten().tolist()]


def build():
    vectors = []
    for name, about, tensors, meta in CASES:
        frames = []
        entries = {}
        for tname, (x, codec, level, filt, ref) in tensors.items():
            entries[tname] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""), "input": flat(x),
                              "codec": codec, "level": level, "filter": filt,
                              "reference": None if ref is None else flat(ref)}
        frames = encode_message({k: v[0] for k, v in tensors.items()}, meta,
                                codecs={k: (v[1], v[2]) for k, v in tensors.items()},
                                references={k: v[4] for k, v in tensors.items() if v[4] is not None},
                                filter=next(iter(tensors.values()))[3] if len(tensors) == 1 else "none")
        refs = {k: v[4] for k, v in tensors.items() if v[4] is not None}
        decoded = decode_message(frames, references=refs)
        for tname in tensors:
            entries[tname]["decoded"] = flat(decoded.tensors[tname])
        vectors.append({"name": name, "about": about, "frames": [bytes(f).hex() for f in frames],
                        "tensors": entries, "meta": meta})
    return vectors


# --- invalid messages ------------------------------------------------------------------------------

# category -> a phrase the Python decoder's ProtocolError message contains (SPEC.md section 11's table).
ERRORS = {
    "msgpack": "not valid msgpack",
    "magic": "magic 'LW' missing",
    "version": "is not supported",
    "type": "must be a msgpack",
    "duplicate-key": "duplicate key",
    "unknown-key": "unknown keys",
    "missing-key": "missing key",
    "codec": "unknown codec",
    "filter": "is not valid for codec",
    "limit": "over the limit",
    "duplicate-name": "names repeat",
    "frame-count": "frames, but its header lists",
    "payload-length": "payload frame has",
    "checksum": "checksum mismatch",
    "zstd-size": "the header implies",
    "zstd-frame": "not a valid zstd frame",
    "trailing-data": "after the zstd frame",
    "padding": "padding nibble",
}
MAX_ELEMENTS = 1 << 27  # Limits() defaults: the invalid vectors are refused by a decoder with default limits
MAX_MESSAGE_ELEMENTS = 1 << 28
MAX_TENSORS = 64
MAX_HEADER_BYTES = 1 << 16


class Pairs(list):
    """A msgpack map written pair by pair, in order, so that a key may repeat."""


def pack(obj):
    """msgpack bytes of ``obj`` as the encoder writes them (SPEC.md section 2); ``Pairs`` maps as listed."""
    packer = msgpack.Packer(use_bin_type=True)
    if isinstance(obj, dict):
        obj = Pairs(obj.items())
    if isinstance(obj, Pairs):
        return packer.pack_map_header(len(obj)) + b"".join(pack(k) + pack(v) for k, v in obj)
    if isinstance(obj, list):
        return packer.pack_array_header(len(obj)) + b"".join(pack(v) for v in obj)
    return packer.pack(obj)


def zstd(raw):
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)


def message(tensors, **kw):
    """(header as a dict, [payload bytes]) of a valid message."""
    frames = encode_message(tensors, **kw)
    return msgpack.unpackb(frames[0], raw=False), [bytes(f) for f in frames[1:]]


def entry(name, codec, shape, payload, z=False, **extra):
    """A hand-written tensor entry whose p and k match ``payload``; int codecs get lo 0, step 0."""
    e = {"n": name, "c": codec, "d": "float32", "s": list(shape), "f": 0, "z": z, "p": len(payload),
         "k": checksum(payload)}
    if codec in ("int8", "int4"):
        c = shape[1] if len(shape) >= 2 else 1
        e["q"] = bytes(8 * c)
    e.update(extra)
    return e


def header(entries, meta=None):
    return {"m": b"LW", "v": 1, "t": entries, "s": meta or {}}


def repaid(h, i, payload):
    """Header ``h`` with entry i's p and k describing ``payload``."""
    h["t"][i]["p"], h["t"][i]["k"] = len(payload), checksum(payload)
    return h


def build_invalid():
    out = []

    def add(name, error, about, frames):
        out.append({"name": name, "about": about, "error": error, "phrase": ERRORS[error],
                    "frames": [bytes(f).hex() for f in frames]})

    def mutated(base, change):
        h, payloads = json_copy(base)
        change(h)
        return [pack(h)] + payloads

    int8 = message({"x": ramp((1, 2, 3, 3))}, codec="int8", level=0)
    zint8 = message({"x": ramp((1, 1, 2, 4))}, codec="int8", level=3, filter="none")
    fp32 = message({"x": ramp((2, 3))}, codec="fp32", level=0)
    fp16z = message({"x": ramp((1, 2, 2, 2))}, codec="fp16", level=1)
    int4 = message({"x": ramp((1, 1, 3, 3))}, codec="int4", level=0)
    rank2 = message({"x": ramp((2, 9))}, codec="int8", level=0)
    h0, (p0,) = int8

    # frame 0
    add("header-not-msgpack", "msgpack", "frame 0 starts with 0xc1, a byte msgpack never uses",
        [b"\xc1" + pack(h0)[1:], p0])
    add("header-trailing-bytes", "msgpack", "one byte after the header's map", [pack(h0) + b"\x00", p0])
    add("magic-wrong", "magic", "m is the bin 'XX'", mutated(int8, lambda h: h.update(m=b"XX")))
    add("magic-as-str", "magic", "m is the str 'LW', not the bin", mutated(int8, lambda h: h.update(m="LW")))
    add("version-unknown", "version", "v is 2", mutated(int8, lambda h: h.update(v=2)))
    add("version-as-float", "type", "v is the float 1.0, not the int 1", mutated(int8, lambda h: h.update(v=1.0)))
    add("version-as-bool", "type", "v is true, not the int 1", mutated(int8, lambda h: h.update(v=True)))
    add("zstd-flag-as-int", "type", "z is the int 1, not true (the payload is a zstd frame)",
        mutated(zint8, lambda h: h["t"][0].update(z=1)))
    add("zstd-flag-as-float", "type", "z is the float 1.0, not true", mutated(zint8, lambda h: h["t"][0].update(z=1.0)))
    add("zstd-off-as-int", "type", "z is the int 0, not false", mutated(int8, lambda h: h["t"][0].update(z=0)))
    add("filter-as-bool", "type", "f is false, not the int 0", mutated(int8, lambda h: h["t"][0].update(f=False)))
    add("dimension-as-float", "type", "shape [1, 2, 3.0, 3]: a float dimension",
        mutated(int8, lambda h: h["t"][0].update(s=[1, 2, 3.0, 3])))
    add("length-as-float", "type", "p is the float 18.0", mutated(int8, lambda h: h["t"][0].update(p=18.0)))
    add("plane-length-as-float", "type", "zl's first plane length is a float",
        mutated(fp16z, lambda h: h["t"][0]["zl"].__setitem__(0, float(h["t"][0]["zl"][0]))))
    add("duplicate-top-key", "duplicate-key", "the header map holds v twice, both 1",
        [pack(Pairs([("m", b"LW"), ("v", 1), ("v", 1), ("t", h0["t"]), ("s", {})])), p0])
    add("duplicate-entry-key", "duplicate-key", "the tensor entry holds z twice, both false",
        [pack(header([Pairs(list(h0["t"][0].items()) + [("z", False)])])), p0])
    add("duplicate-meta-key", "duplicate-key", "meta holds a twice, 1 then 2 (msgpack-python would keep 2)",
        [pack(header(h0["t"], Pairs([("a", 1), ("a", 2)]))), p0])
    add("duplicate-nested-meta-key", "duplicate-key", "a map inside meta holds k twice",
        [pack(header(h0["t"], {"extra": Pairs([("k", 1), ("k", 1)])})), p0])
    add("unknown-top-key", "unknown-key", "the header has a fifth key w", mutated(int8, lambda h: h.update(w=0)))
    add("unknown-entry-key", "unknown-key", "the tensor entry has a key x",
        mutated(int8, lambda h: h["t"][0].update(x=0)))
    add("missing-entry-key", "missing-key", "the tensor entry has no p", mutated(int8, lambda h: h["t"][0].pop("p")))
    add("codec-unknown", "codec", "codec int2", mutated(int8, lambda h: h["t"][0].update(c="int2")))
    add("filter-lorenzo-on-float", "filter", "fp32 with f 2 (lorenzo)", mutated(fp32, lambda h: h["t"][0].update(f=2)))
    add("filter-shuffle-on-int", "filter", "int8 with f 1 (shuffle)", mutated(int8, lambda h: h["t"][0].update(f=1)))
    add("filter-lorenzo-rank-2", "filter", "int8 of rank 2 with f 2: lorenzo needs rank >= 3",
        mutated(rank2, lambda h: h["t"][0].update(f=2)))
    add("filter-unknown", "filter", "f 3", mutated(int8, lambda h: h["t"][0].update(f=3)))

    # limits, each one past its default
    add("limit-dimension", "limit", f"shape [0, {MAX_ELEMENTS + 1}]: no elements, but a dimension over max_elements",
        [pack(header([entry("x", "fp32", [0, MAX_ELEMENTS + 1], b"")])), b""])
    wraps = [1 << 16] * 4
    add("limit-elements-wraps", "limit", "shape [65536] * 4 holds 2^64 elements: 0 in 64-bit arithmetic, and p 0 is "
        "what 4 * N wraps to, so a decoder whose product overflows accepts it as empty. The one vector that breaks "
        "two rules: no p can hold the true raw size (2^66 bytes), so p disagrees with it too; section 8 checks the "
        "limit first",
        [pack(header([entry("x", "fp32", wraps, b"")])), b""])
    big = zstd(bytes(MAX_ELEMENTS + 1))
    assert (MAX_ELEMENTS + 1) % 3 == 0
    add("limit-elements", "limit", f"int8 of shape [3, 1, {(MAX_ELEMENTS + 1) // 3}]: {MAX_ELEMENTS + 1} zeros (zstd), "
        "each dimension within max_elements, their product one over it",
        [pack(header([entry("x", "int8", [3, 1, (MAX_ELEMENTS + 1) // 3], big, z=True)])), big])
    full, one = zstd(bytes(MAX_ELEMENTS)), zstd(bytes(1))
    add("limit-message-elements", "limit", f"tensors of {MAX_ELEMENTS}, {MAX_ELEMENTS} and 1 zeros (zstd): one element "
        "over max_message_elements",
        [pack(header([entry("a", "int8", [MAX_ELEMENTS], full, z=True),
                      entry("b", "int8", [MAX_ELEMENTS], full, z=True),
                      entry("c", "int8", [1], one, z=True)])), full, full, one])
    add("limit-tensors", "limit", f"{MAX_TENSORS + 1} empty fp32 tensors",
        [pack(header([entry(str(i), "fp32", [0], b"") for i in range(MAX_TENSORS + 1)]))] + [b""] * (MAX_TENSORS + 1))
    pad = MAX_HEADER_BYTES - len(pack(header(h0["t"], {"pad": b""})))  # bin 16 then takes 1 byte more than bin 8
    big_header = pack(header(h0["t"], {"pad": bytes(pad)}))
    assert len(big_header) == MAX_HEADER_BYTES + 1, len(big_header)
    add("limit-header-bytes", "limit", f"a header frame of {MAX_HEADER_BYTES + 1} bytes (a bin in meta)",
        [big_header, p0])
    add("duplicate-name", "duplicate-name", "two tensors named x",
        mutated(message({"x": ramp((3,)), "y": ramp((2,))}, codec="fp32", level=0),
                lambda h: h["t"][1].update(n="x")))

    # frames and payloads
    add("frames-missing", "frame-count", "the header lists one tensor; only the header frame came", [pack(h0)])
    add("frames-extra", "frame-count", "an empty frame after the payload", [pack(h0), p0, b""])
    add("payload-truncated", "payload-length", "the payload lost its last byte (k is its checksum as it came)",
        [_with_k(h0, p0[:-1]), p0[:-1]])
    add("payload-longer", "payload-length", "a byte too many in the payload (k is its checksum as it came)",
        [_with_k(h0, p0 + b"\x00"), p0 + b"\x00"])
    flipped = bytearray(p0)
    flipped[5] ^= 0x10
    add("payload-checksum", "checksum", "one bit of the payload flipped in transit", [pack(h0), bytes(flipped)])

    # zstd
    zh, (zp,) = zint8  # 8 elements: raw size 8

    def zmsg(payload, base=zh):
        return [pack(repaid(json_copy((base, []))[0], 0, payload)), payload]
    add("zstd-bomb", "zstd-size", "a frame that declares 16 MiB for 8 elements (16 MiB of zeros in ~0.5 KiB)",
        zmsg(zstandard.ZstdCompressor(level=19).compress(bytes(1 << 24))))
    add("zstd-declares-less", "zstd-size", "a frame of 7 bytes for 8 elements", zmsg(zstd(bytes(7))))
    add("zstd-size-undeclared", "zstd-size", "a frame of 8 bytes without its content size in the frame header",
        zmsg(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(8))))
    add("zstd-garbage", "zstd-frame", "z is true but the payload is not zstd", zmsg(b"not zstd at all"))
    add("zstd-truncated", "zstd-frame", "the frame lost its last byte (p and k describe what came)", zmsg(zp[:-1]))
    add("zstd-trailing-byte", "trailing-data", "one zero byte after the frame", zmsg(zp + b"\x00"))
    add("zstd-two-frames", "trailing-data", "a second frame after the first", zmsg(zp + zstd(b"more")))
    empty_h, _ = message({"x": torch.zeros(0)}, codec="int8", level=3)
    add("zstd-empty-trailing-byte", "trailing-data", "an empty tensor's frame, then one byte",
        zmsg(zstd(b"") + b"\x00", empty_h))
    add("zstd-empty-two-frames", "trailing-data", "an empty tensor's frame, then a second empty frame",
        zmsg(zstd(b"") * 2, empty_h))

    # int4 padding
    h4, (p4,) = int4  # 9 elements: the high nibble of byte 4 is padding
    pad4 = p4[:-1] + bytes([p4[-1] | 0x10])
    add("int4-padding-nibble", "padding", "9 int4 symbols: the last byte's high nibble is 1, not 0",
        [_with_k(h4, pad4), pad4])
    z4h, _ = message({"x": ramp((1, 1, 3, 3))}, codec="int4", level=3, filter="none")
    add("int4-padding-nibble-zstd", "padding", "as int4-padding-nibble, the raw bytes inside a zstd frame",
        zmsg(zstd(bytes(4) + b"\xf0"), z4h))
    return out


def _with_k(h, payload):
    """Header bytes of ``h`` with every payload length left alone and entry 0's checksum that of ``payload``."""
    h = json_copy((h, []))[0]
    h["t"][0]["k"] = checksum(payload)
    return pack(h)


def json_copy(msg):
    """A deep copy of (header dict, payloads) that keeps bytes and key order."""
    h, payloads = msg
    return msgpack.unpackb(pack(h), raw=False), list(payloads)


if __name__ == "__main__":
    OUT.write_text(json.dumps({"wire_version": 1, "vectors": build(), "errors": ERRORS, "invalid": build_invalid()},
                              indent=1) + "\n")
    print(f"wrote {OUT}")
