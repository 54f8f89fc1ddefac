"""encode/decode: tensors <-> ZeroMQ frames (one msgpack header frame, then one payload per tensor).

The byte layout is in SPEC.md. Payload frames are sent zero-copy from tensor memory where the codec
allows (a contiguous CPU tensor in its own float codec, zstd off); the caller must not modify such a
tensor until the frames are sent (pyzmq's ``copy=False`` with ``track=True`` tells when).
"""
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zstandard

from . import filters, quant
from .errors import ProtocolError
from .header import (DTYPES, FLOAT_CODECS, INT_CODECS, TensorHeader, check_meta, pack_header,
                     raw_bytes, unpack_header)
from .limits import DEFAULT_LIMITS, MAX_NAME_BYTES, MAX_RANK, Limits

MAX_ZSTD_LEVEL = 22
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
_WIRE_NUMPY = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<i2")}
_CODEC_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FILTERS = ("auto", "none", "shuffle", "lorenzo")

# zstd contexts are not safe to share between threads; serving stacks encode from many.
_local = threading.local()


def _compressor(level):
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cache[level]


def _decompressor():
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


@dataclass
class Message:
    """What ``decode_message`` returns: named tensors and msgpack-native meta values."""

    tensors: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def checksum(buf):
    """XXH3-64, seed 0: the payload checksum of SPEC.md."""
    return xxhash.xxh3_64_intdigest(buf)


def fingerprint(reference):
    """XXH3-64 of a reference tensor's float32 little-endian C-order bytes (names it for residual coding)."""
    return checksum(_as_f32_numpy(reference, "reference"))


# ------------------------------------------------------------------------------------------------
# encode

def encode(tensor, codec="int8", level=3, *, reference=None, filter="auto"):
    """Encode one tensor -> list of frames ``[header, payload]``.

    tensor: float32/float16/bfloat16/float64, rank 1..5, CPU or CUDA, any strides, may be empty.
      Channel (for per-channel quantization) is dim 1.
    codec: 'fp32', 'fp16', 'bf16' (casts), 'int8', 'int4' (per-channel affine, error <= step/2).
    level: zstd level 1..22, or 0 for no entropy coding.
    reference: a tensor of the same shape that the receiver also holds (the seed's initial noise, the
      last tensor it decoded); int codecs then code only ``tensor - beta * reference`` at the step the
      tensor alone would get (same error bound), and fall back to plain coding when that does not fit.
    filter: 'auto' (default), 'none', or force 'shuffle' (float codecs) / 'lorenzo' (int codecs, rank >= 3).
    """
    return encode_message({"": tensor}, codec=codec, level=level,
                          references=None if reference is None else {"": reference}, filter=filter)


def encode_message(tensors, meta=None, *, codec="int8", level=3, codecs=None, references=None, filter="auto"):
    """Encode named tensors and meta values into one multipart message -> list of frames.

    tensors: mapping name -> tensor (see ``encode``), at most ``Limits.max_tensors``.
    meta: mapping str -> msgpack-native value (None, bool, int, float, str, bytes, lists, str-keyed maps).
    codec, level: defaults for every tensor; ``codecs`` maps a name to a codec or a (codec, level) pair.
    references: mapping name -> reference tensor for residual coding (see ``encode``).
    """
    if not hasattr(tensors, "items"):
        raise ProtocolError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    meta = {} if meta is None else dict(meta)
    check_meta(meta)
    codecs = codecs or {}
    references = references or {}
    for name in list(codecs) + list(references):
        if name not in tensors:
            raise ProtocolError(f"codecs/references name {name!r}, which is not among the tensors {list(tensors)}")
    if filter not in _FILTERS:
        raise ProtocolError(f"filter must be one of {_FILTERS}, got {filter!r}")
    if len(tensors) > DEFAULT_LIMITS.max_tensors:
        raise ProtocolError(f"{len(tensors)} tensors in one message, over the limit of {DEFAULT_LIMITS.max_tensors}")
    entries, payloads = [], []
    for name, tensor in tensors.items():
        spec = codecs.get(name, codec)
        if isinstance(spec, str):
            spec = (spec, level)
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ProtocolError(f"codecs[{name!r}] must be a codec name or a (codec, level) pair, got {spec!r}")
        entry, payload = _encode_tensor(name, tensor, spec[0], spec[1], references.get(name), filter)
        entries.append(entry)
        payloads.append(payload)
    return [pack_header(entries, meta)] + payloads


def _encode_tensor(name, x, codec, level, reference, filter_mode):
    where = f"tensor {name!r}"
    if not isinstance(name, str) or len(name.encode()) > MAX_NAME_BYTES:
        raise ProtocolError(f"tensor names must be str of at most {MAX_NAME_BYTES} bytes, got {name!r}")
    if not isinstance(x, torch.Tensor):
        raise ProtocolError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"{where} has dtype {x.dtype}; the wire carries {', '.join(DTYPES)}: cast it first")
    if not 1 <= x.dim() <= MAX_RANK:
        raise ProtocolError(f"{where} has rank {x.dim()}; the wire carries ranks 1..{MAX_RANK}")
    if x.numel() > DEFAULT_LIMITS.max_elements:
        raise ProtocolError(f"{where} has {x.numel()} elements, over the receiver's default limit "
                            f"of {DEFAULT_LIMITS.max_elements}")
    if codec not in FLOAT_CODECS and codec not in INT_CODECS:
        raise ProtocolError(f"{where}: unknown codec {codec!r}; choose one of {tuple(FLOAT_CODECS) + tuple(INT_CODECS)}")
    if type(level) is not int or not 0 <= level <= MAX_ZSTD_LEVEL:
        raise ProtocolError(f"{where}: zstd level must be an int in 0..{MAX_ZSTD_LEVEL} (0 = off), got {level!r}")
    if level == 0 and filter_mode in ("shuffle", "lorenzo"):
        raise ProtocolError(f"{where}: the {filter_mode} filter only helps zstd; give a zstd level > 0")
    x = x.detach()
    if codec in FLOAT_CODECS:
        filt, payload, extra = _encode_float(where, x, codec, level, reference, filter_mode)
    else:
        filt, payload, extra = _encode_int(name, x, codec, level, reference, filter_mode)
    entry = TensorHeader(name=name, codec=codec, dtype=_DTYPE_NAMES[x.dtype], shape=tuple(x.shape), filter=filt,
                         zstd=bool(level), payload_bytes=len(payload), checksum=checksum(payload), **extra)
    return entry, payload


def _encode_float(where, x, codec, level, reference, filter_mode):
    """-> (filter, payload, header fields) for fp32/fp16/bf16."""
    if reference is not None:
        raise ProtocolError(f"{where}: residual coding needs an int codec ('int8', 'int4'), not {codec!r}")
    if filter_mode == "lorenzo":
        raise ProtocolError(f"{where}: the lorenzo filter is for int codecs; float codecs take 'shuffle'")
    wire = x.to(_CODEC_TORCH[codec]).contiguous().cpu()
    if codec == "bf16":
        wire = wire.view(torch.int16)
    raw = wire.numpy().reshape(-1).view(np.uint8)
    if not level:
        return filters.NONE, memoryview(raw), {}  # zero-copy when x already was a contiguous CPU tensor
    if raw.size and filter_mode in ("auto", "shuffle"):
        planes = [_compressor(level).compress(p) for p in filters.shuffle(raw, FLOAT_CODECS[codec])]
        return filters.SHUFFLE, b"".join(planes), {"plane_bytes": tuple(len(p) for p in planes)}
    return filters.NONE, _compressor(level).compress(raw), {}


def _encode_int(name, x, codec, level, reference, filter_mode):
    """-> (filter, payload, header fields) for int8/int4."""
    shape = tuple(x.shape)
    if filter_mode == "shuffle":
        raise ProtocolError(f"tensor {name!r}: the shuffle filter is for float codecs; int codecs take 'lorenzo'")
    if filter_mode == "lorenzo" and not filters.can_lorenzo(shape):
        raise ProtocolError(f"tensor {name!r}: the lorenzo filter needs rank >= 3 (..., H, W), got shape {shape}")
    sym, raw, extra = _quantize(name, x, codec, reference)
    filt = filters.NONE
    if level and filters.can_lorenzo(shape) and filter_mode in ("lorenzo", "auto"):
        if sym is None:  # int4 bytes packed on the device; the filter works on symbols
            sym = quant.unpack_nibbles(raw, x.numel())
        sym = sym.reshape(shape)
        if filter_mode == "lorenzo" or filters.lorenzo_pays(sym, INT_CODECS[codec]):
            sym, filt, raw = filters.lorenzo_encode(sym), filters.LORENZO, None
    if raw is None:
        sym = sym.reshape(-1)
        raw = quant.pack_nibbles(sym & 0x0F) if codec == "int4" else sym
    return filt, (_compressor(level).compress(raw) if level else memoryview(raw)), extra


def _quantize(name, x, codec, reference):
    """-> (uint8 symbols, raw payload or None, header fields) for an int codec; numpy on CPU, the
    kernels on an accelerator, where int4 is packed before it moves (symbols None, raw its bytes)."""
    levels = INT_CODECS[codec]
    shape = tuple(x.shape)
    b, c, m = quant.channel_view(shape)
    on_cpu = _numpy_path(x.device)
    x3 = (_as_f32_numpy(x, name) if on_cpu else x.float().contiguous()).reshape(b, c, m)
    ranges = quant.channel_ranges if on_cpu else quant.channel_ranges_torch
    lo, hi = ranges(x3, name)
    step = quant.steps_for(lo, hi, levels)
    extra = {}
    if reference is not None:
        coded = _residual(name, x3, reference, step, levels, on_cpu)
        if coded is not None:
            x3, lo, extra = coded
    extra["quant"] = np.concatenate([lo.astype("<f4"), step.astype("<f4")]).tobytes()
    if on_cpu:
        return quant.quantize(x3, lo.astype(np.float32), step, levels), None, extra
    packed = codec == "int4"
    out = quant.quantize_torch(x3, lo.astype(np.float32), step, levels, packed=packed).cpu().numpy()
    return (None, out, extra) if packed else (out, None, extra)


def _residual(name, x3, reference, step, levels, on_cpu):
    """d = x - beta * p with least-squares beta per channel, if d fits the plain step's L levels."""
    if not isinstance(reference, torch.Tensor):
        raise ProtocolError(f"reference for tensor {name!r} must be a torch.Tensor, got {type(reference).__name__}")
    b, c, m = x3.shape
    if reference.numel() != b * c * m or reference.dim() < 1:
        raise ProtocolError(f"reference for tensor {name!r} has shape {tuple(reference.shape)}; "
                            "it must have the tensor's shape")
    fp = fingerprint(reference)
    if on_cpu:
        p3 = _as_f32_numpy(reference, "reference").reshape(b, c, m)
        pp = np.einsum("bcm,bcm->c", p3, p3, dtype=np.float64)
        xp = np.einsum("bcm,bcm->c", x3, p3, dtype=np.float64)
    else:
        p3 = reference.to(x3.device, torch.float32).reshape(b, c, m)
        pp = (p3.double() ** 2).sum((0, 2)).cpu().numpy()
        xp = (x3.double() * p3.double()).sum((0, 2)).cpu().numpy()
    beta = np.divide(xp, pp, out=np.zeros(c), where=pp > 0).astype(np.float32)
    if not np.isfinite(beta).all():
        return None
    if on_cpu:
        d3 = x3 - beta[None, :, None] * p3
        lo, hi = quant.channel_ranges(d3, name)
    else:
        d3 = x3 - torch.from_numpy(beta).to(x3.device)[None, :, None] * p3
        lo, hi = quant.channel_ranges_torch(d3, name)
    # The residual is quantized at the plain step, so the error bound is the same; it only helps
    # when its range needs no more levels than the tensor's own.
    if not np.all(hi - lo <= step.astype(np.float64) * levels):
        return None
    return d3, lo, {"reference": fp, "beta": beta.astype("<f4").tobytes()}


def _numpy_path(device):
    """CPU tensors quantize with numpy; tensors elsewhere with torch on their device (tests patch this
    to run the accelerator path on CPU)."""
    return device.type == "cpu"


def _as_f32_numpy(t, name):
    if not isinstance(t, torch.Tensor):
        raise ProtocolError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


# ------------------------------------------------------------------------------------------------
# decode

def decode(frames, *, reference=None, limits: Limits = DEFAULT_LIMITS, device=None):
    """Decode frames made by ``encode`` -> the tensor, with its original shape and dtype."""
    msg = _decode(frames, lambda name: reference, limits, device)
    if len(msg.tensors) != 1:
        raise ProtocolError(f"decode expects a one-tensor message, got {len(msg.tensors)} tensors: "
                            "use decode_message")
    return next(iter(msg.tensors.values()))


def decode_message(frames, *, references=None, limits: Limits = DEFAULT_LIMITS, device=None):
    """Decode frames made by ``encode_message`` -> ``Message(tensors, meta)``.

    frames: a list of bytes-like objects or zmq.Frame. A writable buffer (bytearray, zmq.Frame
      received with copy=False) in a float codec without zstd becomes the tensor without a copy.
    references: name -> the reference tensor each residual-coded tensor was coded against.
    device: where the tensors go (default CPU); int codecs dequantize there, after the 1-byte symbols move.
    Raises ProtocolError on any malformed input, never anything else.
    """
    return _decode(frames, (references or {}).get, limits, device)


def _decode(frames, reference_for, limits, device):
    if not isinstance(frames, (list, tuple)):
        raise ProtocolError(f"frames must be a list of bytes-like frames, got {type(frames).__name__}")
    if not frames:
        raise ProtocolError("no frames: a message is a header frame followed by one payload frame per tensor")
    entries, meta = unpack_header(_buffer(frames[0], 0), limits)
    if len(frames) != 1 + len(entries):
        raise ProtocolError(f"message has {len(frames)} frames, but its header lists {len(entries)} tensors: "
                            f"expected {len(entries) + 1} frames (truncated or mixed-up message)")
    out = {}
    for i, entry in enumerate(entries):
        out[entry.name] = _decode_tensor(entry, _buffer(frames[i + 1], i + 1), reference_for(entry.name), device)
    return Message(out, meta)


def _buffer(frame, index):
    if hasattr(frame, "buffer") and not isinstance(frame, (bytes, bytearray, memoryview, np.ndarray)):
        frame = frame.buffer  # zmq.Frame
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError(f"frame {index} is a {type(frame).__name__}, not a bytes-like object") from None
    if not view.c_contiguous:
        raise ProtocolError(f"frame {index} is not a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _decode_tensor(h: TensorHeader, payload, reference, device):
    where = f"tensor {h.name!r}"
    if len(payload) != h.payload_bytes:
        raise ProtocolError(f"{where}: payload frame has {len(payload)} bytes, header says {h.payload_bytes} "
                            "(truncated or corrupted in transit)")
    if checksum(payload) != h.checksum:
        raise ProtocolError(f"{where}: payload checksum mismatch (corrupted in transit)")
    n = h.numel
    if h.plane_bytes:  # shuffle + zstd: one zstd frame a byte plane, back to back
        ends = np.cumsum(h.plane_bytes).tolist()
        raw = [np.frombuffer(_inflate(payload[end - size:end], n, where), np.uint8)
               for size, end in zip(h.plane_bytes, ends)]
    else:
        raw = _inflate(payload, raw_bytes(h.codec, n), where) if h.zstd else payload
    if h.codec in FLOAT_CODECS:
        t = _decode_float(h, raw)
    else:
        t = _decode_int(h, raw, reference, device, where)
    dtype = _TORCH_DTYPES[h.dtype]
    t = t.to(device=device, dtype=dtype) if device is not None else t.to(dtype)
    return t


def _inflate(payload, size, where):
    """One zstd frame -> exactly ``size`` bytes (SPEC.md section 6), never allocating more (bombs).

    The frame must declare its content size, and declare ``size``: that is checked before anything
    is inflated, and libzstd then refuses to write past it. Nothing may follow the frame.
    """
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise ProtocolError(f"{where}: payload is not a valid zstd frame ({e})") from None
    if declared == -1:
        raise ProtocolError(f"{where}: zstd frame does not declare its content size; the header implies {size} "
                            "bytes, and a sender must write that size in the frame header (SPEC.md section 6)")
    if declared != size:
        raise ProtocolError(f"{where}: zstd frame declares {declared} bytes, the header implies {size} "
                            "(a decompression bomb, or a header that does not describe its payload)")
    if size:
        try:
            raw = _decompressor().decompress(payload, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError:
            pass  # below, the streaming decoder tells bytes after a good frame from a broken frame
        else:
            if len(raw) == size:
                return raw
    # python-zstandard's one-shot decompress returns b"" for a frame that declares 0 bytes without
    # reading the frame, so an empty tensor's trailing bytes would pass: the streaming decoder reads
    # the frame to its end and hands back what follows. It holds at most the declared size.
    obj = _decompressor().decompressobj()
    try:
        raw = obj.decompress(payload)
    except zstandard.ZstdError as e:
        raise ProtocolError(f"{where}: payload is not a valid zstd frame of {size} bytes ({e})") from None
    if not obj.eof:
        raise ProtocolError(f"{where}: payload is not a valid zstd frame: it ends before its last block "
                            "(truncated in transit?)")
    if obj.unused_data:
        raise ProtocolError(f"{where}: {len(obj.unused_data)} bytes after the zstd frame; the payload must be "
                            "exactly one frame, an empty tensor's too (SPEC.md section 6)")
    if len(raw) != size:
        raise ProtocolError(f"{where}: zstd payload inflates to {len(raw)} bytes, the header implies {size}")
    return raw


def _decode_float(h, raw):
    """raw: the payload bytes, or (shuffle + zstd) the list of inflated byte planes."""
    wire = _WIRE_NUMPY[h.codec]
    if h.filter == filters.SHUFFLE:
        planes = raw if isinstance(raw, list) else filters.split_planes(np.frombuffer(raw, np.uint8), wire.itemsize)
        arr = filters.unshuffle(planes, wire.itemsize)  # a new, writable array
    else:
        arr = np.frombuffer(raw, np.uint8)
        if not (arr.flags.writeable and arr.ctypes.data % wire.itemsize == 0):
            arr = arr.copy()  # torch tensors must be writable and aligned; otherwise the tensor aliases the frame
    t = torch.from_numpy(arr.view(wire)).reshape(h.shape)
    return t.view(torch.bfloat16) if h.codec == "bf16" else t


def _decode_int(h, raw, reference, device, where):
    levels = INT_CODECS[h.codec]
    n = h.numel
    on_cpu = device is None or _numpy_path(torch.device(device))
    # Without the Lorenzo filter, int4 moves to the device packed and is unpacked there.
    packed = h.codec == "int4" and h.filter != filters.LORENZO and not on_cpu
    if h.codec == "int4" and n % 2 and raw[-1] >> 4:
        raise ProtocolError(f"{where}: int4 padding nibble is {raw[-1] >> 4}, must be 0: with an odd element count "
                            f"({n}) the high nibble of the last byte is padding, and a sender writes 0 there "
                            "(SPEC.md section 4)")
    sym = np.frombuffer(raw, np.uint8)
    if h.codec == "int4" and not packed:
        sym = quant.unpack_nibbles(sym, n)
    if h.filter == filters.LORENZO:
        sym = filters.lorenzo_decode(sym.reshape(h.shape))
        if levels == 15:
            sym &= 0x0F
    b, c, m = quant.channel_view(h.shape)
    lo, step = h.lo_step()
    if h.reference is not None:
        if reference is None:
            raise ProtocolError(f"{where} was residual-coded against reference {h.reference:016x}: "
                                "pass that same reference tensor to decode")
        if fingerprint(reference) != h.reference:
            raise ProtocolError(f"{where}: the reference given does not match the one it was coded against "
                                f"({fingerprint(reference):016x} != {h.reference:016x})")
    beta = np.frombuffer(h.beta, "<f4") if h.reference is not None else None
    if on_cpu:
        x3 = quant.dequantize(sym.reshape(b, c, m), lo, step)
        if beta is not None:
            x3 += beta[None, :, None] * _as_f32_numpy(reference, "reference").reshape(b, c, m)
        return torch.from_numpy(x3).reshape(h.shape)
    q = torch.from_numpy(np.ascontiguousarray(sym).reshape(-1).copy()).to(device)
    x3 = quant.dequantize_torch(q, lo, step, (b, c, m), packed=packed)
    if beta is not None:
        x3 += torch.from_numpy(beta.copy()).to(device)[None, :, None] * reference.to(device, torch.float32).reshape(b, c, m)
    return x3.reshape(h.shape)


def wire_bytes(frames):
    """Total bytes of a message's frames (what crosses the network, before ZeroMQ's own framing)."""
    return sum(len(_buffer(f, i)) for i, f in enumerate(frames))
