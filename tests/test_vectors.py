"""The checked-in test vectors (protocol/vectors.json), in both directions. SPEC.md says how to use them."""
import json
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard

from latentwire.protocol import decode_message, encode_message

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "protocol" / "vectors.json").read_text())["vectors"]
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _tensor(values, spec):
    return torch.tensor(values, dtype=torch.float64).reshape(spec["shape"]).to(DT[spec["dtype"]])


def _refs(v):
    return {k: _tensor(s["reference"], s) for k, s in v["tensors"].items() if s["reference"] is not None}


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decoding_the_vector_gives_the_expected_values(v):
    msg = decode_message([bytes.fromhex(f) for f in v["frames"]], references=_refs(v))
    assert msg.meta == v["meta"]
    assert list(msg.tensors) == list(v["tensors"])
    for name, spec in v["tensors"].items():
        got = msg.tensors[name]
        assert list(got.shape) == spec["shape"] and got.dtype == DT[spec["dtype"]]
        assert torch.equal(got, _tensor(spec["decoded"], spec)), name


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_encoding_the_input_gives_the_vector_bytes(v):
    specs = v["tensors"]
    filters = {s["filter"] for s in specs.values()}
    frames = encode_message({k: _tensor(s["input"], s) for k, s in specs.items()}, v["meta"],
                            codecs={k: (s["codec"], s["level"]) for k, s in specs.items()}, references=_refs(v),
                            filter=filters.pop() if len(specs) == 1 else "none")
    expected = [bytes.fromhex(f) for f in v["frames"]]
    if not any(s["level"] for s in specs.values()):
        assert [bytes(f) for f in frames] == expected  # golden bytes
        return
    # zstd's bytes (so the lengths p and zl, and the checksum k) may differ between libzstd releases;
    # everything else may not.
    got_h, want_h = msgpack.unpackb(bytes(frames[0])), msgpack.unpackb(expected[0])
    for g, w in zip(got_h["t"], want_h["t"]):
        assert {k: x for k, x in g.items() if k not in ("p", "k", "zl")} == {
            k: x for k, x in w.items() if k not in ("p", "k", "zl")}
    assert {k: x for k, x in got_h.items() if k != "t"} == {k: x for k, x in want_h.items() if k != "t"}
    for got_e, want_e, got, want in zip(got_h["t"], want_h["t"], frames[1:], expected[1:]):
        assert _inflated(got_e, bytes(got)) == _inflated(want_e, want)


def _inflated(entry, payload):
    """The zstd frames of a payload (one, or one per byte plane), inflated and joined."""
    if not entry["z"]:
        return payload
    sizes = entry.get("zl", [len(payload)])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return b"".join(zstandard.ZstdDecompressor().decompress(payload[s:s + n]) for s, n in zip(starts, sizes))
