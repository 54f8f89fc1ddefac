"""An encoder written from protocol/SPEC.md's text alone, checked against every vector in vectors.json.

Nothing here imports latentwire: the msgpack writer is section 2's "Byte-exact encoding", the
quantizer section 4's numbered steps (and section 7's for residual coding), the filters section 5,
in numpy's float32/float64 arithmetic (elementwise, correctly rounded, never fused). The msgpack and
zstandard libraries only *read* the vectors: the zstd-dependent fields p, k, zl, and inflated payloads.
If this file and the Python encoder ever disagree on a vector, SPEC.md is wrong or incomplete.
"""
import json
import math
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash
import zstandard

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "protocol" / "vectors.json").read_text())["vectors"]
f32 = np.float32
LEVELS = {"int8": 255, "int4": 15}
WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2}


# --- section 2: msgpack, every value in its shortest form, floats as float 64 -----------------------

def _head(n, fix, fix_items, c8, c16, c32):
    if fix is not None and n < fix_items:
        return bytes([fix | n])
    if c8 is not None and n < 1 << 8:
        return bytes([c8, n])
    return bytes([c16]) + struct.pack(">H", n) if n < 1 << 16 else bytes([c32]) + struct.pack(">I", n)


def mp(v):
    if v is None:
        return b"\xc0"
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128 or -32 <= v < 0:
            return struct.pack("b" if v < 0 else "B", v)
        codes = ((0xcc, ">B"), (0xcd, ">H"), (0xce, ">I"), (0xcf, ">Q")) if v >= 0 else \
            ((0xd0, ">b"), (0xd1, ">h"), (0xd2, ">i"), (0xd3, ">q"))
        for code, fmt in codes:
            bits = 8 * struct.calcsize(fmt)
            if (v < 1 << bits) if v >= 0 else (v >= -(1 << (bits - 1))):
                return bytes([code]) + struct.pack(fmt, v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return _head(len(b), 0xa0, 32, 0xd9, 0xda, 0xdb) + b
    if isinstance(v, bytes):
        return _head(len(v), None, 0, 0xc4, 0xc5, 0xc6) + v
    if isinstance(v, list):
        return _head(len(v), 0x90, 16, None, 0xdc, 0xdd) + b"".join(map(mp, v))
    if isinstance(v, dict):
        return _head(len(v), 0x80, 16, None, 0xde, 0xdf) + b"".join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(type(v))


def test_the_msgpack_writer_follows_section_2_at_each_width():
    for v in [0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, -1, -32, -33, -128,
              -129, -(1 << 15) - 1, -(1 << 31) - 1, -(1 << 63), 0.5, -2.0, "", "a" * 31, "a" * 32, "a" * 256,
              "a" * 65536, b"", b"x" * 256, b"x" * 65536, list(range(15)), list(range(16)), list(range(65536)),
              {str(i): i for i in range(16)}, None, True, False]:
        assert mp(v) == msgpack.packb(v, use_bin_type=True), v


# --- section 4: the quantizer, step by step --------------------------------------------------------

def channel_view(x, shape):
    b, c = (1, 1) if len(shape) == 1 else (shape[0], shape[1])
    return x.reshape(b, c, -1)


def lo_hi(x3):
    """Step 2: per-channel min and max; 0 and 0 for an empty channel."""
    if x3.shape[0] * x3.shape[2] == 0:
        return np.zeros(x3.shape[1], f32), np.zeros(x3.shape[1], f32)
    return x3.min(axis=(0, 2)), x3.max(axis=(0, 2))


def step_for(lo, hi, L):
    """Steps 3-4: span in binary64, the quotient in binary64, then float32; 0 below L * 2^-126."""
    span = hi.astype(np.float64) - lo.astype(np.float64)
    assert (span <= float(np.finfo(f32).max)).all()
    return np.where(span >= L * 2.0 ** -126, span / L, 0.0).astype(f32)


def symbols(x3, lo, step, L):
    """Steps 5-6: inv in float32, then subtract, multiply, add, each rounded to float32."""
    inv = np.array([f32(1) / s if s > 0 else f32(0) for s in step], f32)
    y = (x3 - lo[None, :, None]) * inv[None, :, None] + f32(0.5)
    assert y.dtype == f32
    return np.floor(np.minimum(y, f32(L))).astype(np.uint8)


def lorenzo(q, shape, modulo):
    """Section 5: r[h, w] = q[h, w] - q[h, w-1] - q[h-1, w] + q[h-1, w-1], missing terms 0, modulo 256 (16 for int4)."""
    q = q.reshape(shape).astype(np.int64)
    pad = np.zeros(q.shape[:-2] + (q.shape[-2] + 1, q.shape[-1] + 1), np.int64)
    pad[..., 1:, 1:] = q
    r = pad[..., 1:, 1:] - pad[..., 1:, :-1] - pad[..., :-1, 1:] + pad[..., :-1, :-1]
    return (r % 256 % modulo).astype(np.uint8).reshape(-1)


def pack_int4(sym):
    """Section 4's table: element 2i low nibble, 2i+1 high; an odd count's last high nibble 0."""
    sym = np.append(sym, np.uint8(0)) if sym.size % 2 else sym
    return (sym[0::2] | (sym[1::2] << 4)).astype(np.uint8)


def float_raw(x32, codec):
    if codec == "fp32":
        return x32.astype("<f4").tobytes()
    if codec == "fp16":
        return x32.astype("<f2").tobytes()
    assert np.isfinite(x32).all()  # bf16: the high 16 bits of binary32, round to nearest even
    u = x32.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def encode_tensor(name, spec, f, beta=None):
    """(entry dict without p/k, raw payload before zstd) from the vector's input, per SPEC.md."""
    shape, codec = spec["shape"], spec["codec"]
    x32 = np.array(spec["input"], np.float64).astype(f32)  # step 1 (section 4), also the float codecs' f32(x)
    entry = {"n": name, "c": codec, "d": spec["dtype"], "s": shape, "f": f, "z": spec["level"] > 0}
    if codec in WIDTH:
        raw = float_raw(x32, codec)
        if f == 1:  # shuffle: plane j holds byte j of every value
            raw = np.frombuffer(raw, np.uint8).reshape(-1, WIDTH[codec]).T.tobytes()
        return entry, raw, {}
    L = LEVELS[codec]
    x3 = channel_view(x32, shape)
    lo, hi = lo_hi(x3)
    step = step_for(lo, hi, L)
    extra = {}
    if spec["reference"] is not None:  # section 7
        p3 = channel_view(np.array(spec["reference"], np.float64).astype(f32), shape)
        d3 = x3 - beta[None, :, None] * p3  # f32(x32 - f32(beta * p32))
        lo_d, hi_d = lo_hi(d3)
        if np.isfinite(beta).all() and (hi_d.astype(np.float64) - lo_d.astype(np.float64)
                                        <= step.astype(np.float64) * L).all():
            x3, lo = d3, lo_d
            extra = {"r": xxhash.xxh3_64_intdigest(p3.astype("<f4").tobytes()), "b": beta.astype("<f4").tobytes()}
    q = symbols(x3, lo, step, L).reshape(-1)
    if f == 2:
        q = lorenzo(q, shape, 256 if L == 255 else 16)
    raw = (pack_int4(q & 0x0F) if codec == "int4" else q).tobytes()
    entry["q"] = lo.astype("<f4").tobytes() + step.astype("<f4").tobytes()
    return entry, raw, extra


def least_squares_beta(spec):
    """Section 7's beta, with the two sums rounded once (math.fsum): one order-independent reading."""
    shape = spec["shape"]
    x3 = channel_view(np.array(spec["input"], np.float64).astype(f32), shape).astype(np.float64)
    p3 = channel_view(np.array(spec["reference"], np.float64).astype(f32), shape).astype(np.float64)
    out = []
    for c in range(x3.shape[1]):
        pp = math.fsum((p3[:, c] * p3[:, c]).ravel())
        out.append(math.fsum((x3[:, c] * p3[:, c]).ravel()) / pp if pp > 0 else 0.0)
    return np.array(out).astype(f32)


# --- the vectors -----------------------------------------------------------------------------------

def _inflate(entry, payload):
    if not entry["z"]:
        return payload
    sizes = entry.get("zl", [len(payload)])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return b"".join(zstandard.ZstdDecompressor().decompress(payload[s:s + n]) for s, n in zip(starts, sizes))


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_an_encoder_written_from_the_spec_reproduces_the_vector(v):
    frames = [bytes.fromhex(f) for f in v["frames"]]
    sent = msgpack.unpackb(frames[0], raw=False)["t"]  # read only for f, b and the zstd-dependent p, k, zl
    entries, raws = [], []
    for (name, spec), want in zip(v["tensors"].items(), sent):
        assert spec["filter"] == "auto" or want["f"] == {"none": 0, "shuffle": 1, "lorenzo": 2}[spec["filter"]]
        beta = np.frombuffer(want["b"], "<f4") if "b" in want else None
        if beta is not None:
            np.testing.assert_array_equal(least_squares_beta(spec), beta)
        entry, raw, extra = encode_tensor(name, spec, want["f"], beta)
        if entry["z"]:
            entry.update(p=want["p"], k=want["k"])
        else:
            entry.update(p=len(raw), k=xxhash.xxh3_64_intdigest(raw))
        entry = {**{k: entry[k] for k in ("n", "c", "d", "s", "f", "z", "p", "k")},
                 **({"q": entry["q"]} if "q" in entry else {}), **extra}
        if "zl" in want:
            entry["zl"] = want["zl"]
        entries.append(entry)
        raws.append(raw)
    header = mp({"m": b"LW", "v": 1, "t": entries, "s": v["meta"]})
    assert header == frames[0]
    for entry, raw, payload in zip(entries, raws, frames[1:]):
        assert (_inflate(entry, payload) if entry["z"] else payload) == raw, entry["n"]
    if not any(e["z"] for e in entries):
        assert [header] + raws == frames  # the whole message, byte for byte


def test_the_exact_division_formula_would_not_reproduce_int8_raw():
    """SPEC.md section 4's example: element 13 of int8-raw is 128, not floor(10 / step + 1/2) = 127."""
    v = next(v for v in VECTORS if v["name"] == "int8-raw")
    spec = v["tensors"]["x"]
    payload = bytes.fromhex(v["frames"][1])
    x3 = channel_view(np.array(spec["input"], np.float64).astype(f32), spec["shape"])
    lo, hi = lo_hi(x3)
    step = step_for(lo, hi, 255)
    exact = np.floor((x3.astype(np.float64) - lo[None, :, None]) / step[None, :, None] + 0.5).astype(np.uint8)
    assert spec["input"][13] == 5.0 and float(lo[1]) == -5.0 and float(hi[1]) == 15.0
    assert payload[13] == 128 and exact.reshape(-1)[13] == 127
    assert symbols(x3, lo, step, 255).tobytes() == payload
