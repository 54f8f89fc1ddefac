"""The header frame: plain typed values, packed to and validated from msgpack (layout in SPEC.md)."""
import math
import struct
from dataclasses import dataclass
from math import prod

import msgpack
import numpy as np

from . import filters
from .errors import ProtocolError
from .limits import MAGIC, MAX_NAME_BYTES, MAX_RANK, WIRE_VERSION, Limits
from .quant import LEVELS

FLOAT_CODECS = {"fp32": 4, "fp16": 2, "bf16": 2}  # codec -> bytes per value
INT_CODECS = LEVELS  # codec -> quantization levels (protocol/quant.py)
CODECS = tuple(FLOAT_CODECS) + tuple(INT_CODECS)
DTYPES = ("float32", "float16", "bfloat16", "float64")
META_TYPES = (type(None), bool, int, float, str, bytes)
MAX_META_DEPTH = 8


def channels(shape):
    return shape[1] if len(shape) >= 2 else 1


def raw_bytes(codec, n):
    """Bytes of a payload before zstd: n values at the codec's width (int4 packs two a byte)."""
    if codec in FLOAT_CODECS:
        return n * FLOAT_CODECS[codec]
    return n if codec == "int8" else (n + 1) // 2


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in the header. Field -> wire key in brackets; see SPEC.md."""

    name: str  # [n]
    codec: str  # [c] one of CODECS
    dtype: str  # [d] the sender's dtype, restored on decode
    shape: tuple  # [s]
    filter: int  # [f] filters.NONE / SHUFFLE / LORENZO
    zstd: bool  # [z] payload is one zstd frame
    payload_bytes: int  # [p] length of the payload frame
    checksum: int  # [k] XXH3-64 (seed 0) of the payload frame
    quant: bytes = b""  # [q] int codecs: float32 LE lo[0..C) then step[0..C)
    reference: int = None  # [r] residual coding: XXH3-64 of the reference's float32 LE bytes
    beta: bytes = b""  # [b] residual coding: float32 LE beta[0..C)
    plane_bytes: tuple = ()  # [zl] shuffle + zstd: byte length of each plane's zstd frame

    @property
    def numel(self):
        return prod(self.shape)

    def lo_step(self):
        """(lo, step), float32 arrays of C values each."""
        v = np.frombuffer(self.quant, "<f4")
        c = v.size // 2
        return v[:c], v[c:]

    def to_wire(self):
        # The order of these keys is the wire's (SPEC.md section 2): n c d s f z p k, then q, r b, zl.
        d = {"n": self.name, "c": self.codec, "d": self.dtype, "s": list(self.shape), "f": self.filter,
             "z": self.zstd, "p": self.payload_bytes, "k": self.checksum}
        if self.codec in INT_CODECS:
            d["q"] = self.quant
        if self.reference is not None:
            d["r"] = self.reference
            d["b"] = self.beta
        if self.plane_bytes:
            d["zl"] = list(self.plane_bytes)
        return d

    @classmethod
    def from_wire(cls, d, limits):
        if not isinstance(d, dict):
            raise ProtocolError(f"tensor entry must be a map, got {type(d).__name__}")
        name = _field(d, "n", str)
        where = f"tensor {name!r}"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ProtocolError(f"{where}: name is over {MAX_NAME_BYTES} bytes")
        codec = _field(d, "c", str, where)
        if codec not in CODECS:
            raise ProtocolError(f"{where}: unknown codec {codec!r}; this decoder knows {', '.join(CODECS)}")
        dtype = _field(d, "d", str, where)
        if dtype not in DTYPES:
            raise ProtocolError(f"{where}: unknown dtype {dtype!r}; this decoder knows {', '.join(DTYPES)}")
        shape = _field(d, "s", list, where)
        if not 1 <= len(shape) <= MAX_RANK:
            raise ProtocolError(f"{where}: rank {len(shape)} is outside 1..{MAX_RANK}")
        for n in shape:  # each dimension before the product, which a peer with 64-bit ints could overflow
            if type(n) is not int:
                raise ProtocolError(f"{where}: each dimension of shape {shape} must be a msgpack int, got {_kind(n)}")
            if n < 0:
                raise ProtocolError(f"{where}: shape {shape} has the negative dimension {n}; dimensions are >= 0")
            if n > limits.max_elements:
                raise ProtocolError(
                    f"{where}: dimension {n} of shape {shape} is over the limit of {limits.max_elements} elements; "
                    "a receiver that expects tensors this large must raise Limits.max_elements")
        shape = tuple(shape)
        if prod(shape) > limits.max_elements:
            raise ProtocolError(
                f"{where}: shape {shape} has {prod(shape)} elements, over the limit of {limits.max_elements}; "
                "a receiver that expects tensors this large must raise Limits.max_elements"
            )
        filt = _field(d, "f", int, where)
        allowed = (filters.NONE, filters.SHUFFLE) if codec in FLOAT_CODECS else (filters.NONE, filters.LORENZO)
        if filt not in allowed or (filt == filters.LORENZO and not filters.can_lorenzo(shape)):
            raise ProtocolError(f"{where}: filter {filt} is not valid for codec {codec!r} and shape {shape}")
        zstd = _field(d, "z", bool, where)
        payload_bytes = _field(d, "p", int, where)
        checksum = _field(d, "k", int, where)
        if not 0 <= checksum < 1 << 64:
            raise ProtocolError(f"{where}: checksum {checksum} is not a 64-bit unsigned int")
        c = channels(shape)
        quant = b""
        if codec in INT_CODECS:
            quant = _field(d, "q", bytes, where)
            if len(quant) != 8 * c:
                raise ProtocolError(f"{where}: 'q' holds {len(quant)} bytes, expected {8 * c} for {c} channels")
            values = struct.unpack(f"<{2 * c}f", quant)  # a few channels: cheaper than numpy here
            if not all(map(math.isfinite, values)) or min(values[c:], default=0.0) < 0:
                raise ProtocolError(f"{where}: quantization lo/step must be finite with step >= 0")
        elif "q" in d:
            raise ProtocolError(f"{where}: codec {codec!r} takes no quantization parameters 'q'")
        reference, beta = None, b""
        if "r" in d:
            if codec not in INT_CODECS:
                raise ProtocolError(f"{where}: residual coding needs an int codec, not {codec!r}")
            reference = _field(d, "r", int, where)
            if not 0 <= reference < 1 << 64:
                raise ProtocolError(f"{where}: reference fingerprint {reference} is not a 64-bit unsigned int")
            beta = _field(d, "b", bytes, where)
            if len(beta) != 4 * c or not all(map(math.isfinite, struct.unpack(f"<{len(beta) // 4}f", beta))):
                raise ProtocolError(f"{where}: 'b' must hold {c} finite float32 values")
        plane_bytes = ()
        if codec in FLOAT_CODECS and filt == filters.SHUFFLE and zstd:
            plane_bytes = tuple(_field(d, "zl", list, where))
            bad = [n for n in plane_bytes if type(n) is not int]
            if bad:
                raise ProtocolError(f"{where}: each 'zl' plane length must be a msgpack int, got {_kind(bad[0])}")
            if len(plane_bytes) != FLOAT_CODECS[codec] or min(plane_bytes, default=0) < 0 or \
                    sum(plane_bytes) != payload_bytes:
                raise ProtocolError(f"{where}: 'zl' must list {FLOAT_CODECS[codec]} plane lengths adding up to "
                                    f"the payload's {payload_bytes} bytes, got {plane_bytes}")
        elif "zl" in d:
            raise ProtocolError(f"{where}: 'zl' goes only with a shuffled float codec under zstd")
        extra = set(d) - {"n", "c", "d", "s", "f", "z", "p", "k", "q", "r", "b", "zl"}
        if extra:
            raise ProtocolError(f"{where}: unknown keys {sorted(extra)} (a newer wire version?)")
        if not zstd and payload_bytes != raw_bytes(codec, prod(shape)):
            raise ProtocolError(
                f"{where}: payload of {payload_bytes} bytes disagrees with shape {shape} and codec {codec!r} "
                f"({raw_bytes(codec, prod(shape))} bytes)"
            )
        return cls(name, codec, dtype, shape, filt, zstd, payload_bytes, checksum, quant, reference, beta,
                   plane_bytes)


# Python type -> msgpack type name, for _field's strict checks and its messages.
_MSGPACK_NAMES = {type(None): "nil", bool: "bool", int: "int", float: "float", str: "str", bytes: "bin",
                  list: "array", dict: "map"}


def _kind(value):
    """The msgpack type of a decoded value, with the value when it is short: ``float 1.0``."""
    name = _MSGPACK_NAMES.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{name} {text}" if len(text) <= 40 else name


def _field(d, key, kind, where="header"):
    """d[key], which must be exactly the msgpack type ``kind`` names (SPEC.md section 2, "Types").

    Strict: a bool is not an int (Python's bool subclasses int) and neither is a float, however
    integral; ``true`` is not ``1``. A peer that coerced would read a message its sender never wrote.
    """
    if key not in d:
        raise ProtocolError(f"{where}: missing key {key!r}")
    value = d[key]
    if type(value) is not kind:
        raise ProtocolError(f"{where}: key {key!r} must be a msgpack {_MSGPACK_NAMES[kind]}, got {_kind(value)}")
    return value


def _unique_map(pairs):
    """msgpack object_pairs_hook: a map as a dict, refusing a key that appears twice.

    msgpack-python would silently keep the last value; a peer's library may keep the first. Either
    way two decoders would read different messages from the same bytes, so the format forbids it.
    """
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ProtocolError(f"header: a msgpack map holds the duplicate key {dup!r}; every key of every map in "
                            "the header (tensor entries and meta included) must appear once")
    return d


def check_meta(value, where="meta", depth=0):
    """Meta values are msgpack natives: None, bool, int, float, str, bytes, lists and str-keyed maps.

    ``depth`` counts containers below the meta map itself; at most MAX_META_DEPTH.
    """
    if depth > MAX_META_DEPTH and type(value) in (dict, list, tuple):
        raise ProtocolError(f"{where}: containers nested deeper than {MAX_META_DEPTH}")
    if type(value) is dict:
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            check_meta(v, f"{where}[{k!r}]", depth + 1)
    elif type(value) in (list, tuple):  # exact types: msgpack's ExtType is a tuple subclass
        for i, v in enumerate(value):
            check_meta(v, f"{where}[{i}]", depth + 1)
    elif not isinstance(value, META_TYPES):
        hint = " (send tensors as tensors, not meta)" if hasattr(value, "shape") else ""
        raise ProtocolError(f"{where}: {type(value).__name__} cannot travel as meta{hint}")
    elif isinstance(value, int) and not -(1 << 63) <= value < 1 << 64:
        raise ProtocolError(f"{where}: int {value} does not fit in 64 bits")


def pack_header(entries, meta):
    """The header frame, byte for byte as SPEC.md section 2 writes it: keys m, v, t, s in that order,
    each entry's keys in ``TensorHeader.to_wire``'s order, meta in the caller's; every value in
    msgpack-python's shortest form (use_bin_type: str as str, bytes as bin; floats as float 64)."""
    return msgpack.packb({"m": MAGIC, "v": WIRE_VERSION, "t": [e.to_wire() for e in entries], "s": meta},
                         use_bin_type=True)


def unpack_header(frame, limits: Limits):
    """Parse and validate the header frame; returns (list[TensorHeader], meta)."""
    if len(frame) > limits.max_header_bytes:
        raise ProtocolError(f"header frame is {len(frame)} bytes, over the limit of {limits.max_header_bytes}")
    try:
        # unpackb bounds every container by the frame length, itself bounded above.
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True, object_pairs_hook=_unique_map)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean the same here
        raise ProtocolError(f"header frame is not valid msgpack ({type(e).__name__}: {e})") from None
    if type(d) is not dict or type(d.get("m")) is not bytes or d["m"] != MAGIC:
        raise ProtocolError("header frame does not start a latentwire message (magic 'LW' missing: key 'm' must "
                            "be the msgpack bin 4c57)")
    version = _field(d, "v", int)
    if version != WIRE_VERSION:
        raise ProtocolError(
            f"wire version {version!r} is not supported; this decoder speaks version {WIRE_VERSION}: "
            "upgrade the older side"
        )
    extra = set(d) - {"m", "v", "t", "s"}
    if extra:
        raise ProtocolError(f"header has unknown keys {sorted(extra)}")
    items = _field(d, "t", list)
    if len(items) > limits.max_tensors:
        raise ProtocolError(f"message lists {len(items)} tensors, over the limit of {limits.max_tensors}")
    meta = _field(d, "s", dict)
    check_meta(meta)
    entries = [TensorHeader.from_wire(item, limits) for item in items]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ProtocolError(f"tensor names repeat in {names}")
    total = sum(e.numel for e in entries)
    if total > limits.max_message_elements:
        raise ProtocolError(f"message holds {total} elements, over the limit of {limits.max_message_elements}")
    return entries, meta
