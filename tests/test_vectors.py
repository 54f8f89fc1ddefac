"""The checked-in test vectors (protocol/vectors.json), in both directions, and the invalid messages a
decoder must reject. SPEC.md section 11 says how to use them; tests/make_vectors.py writes them."""
import json
import re
from pathlib import Path

import msgpack
import pytest
import torch
import xxhash
import zstandard

from latentwire.protocol import Limits, ProtocolError, decode_message, encode_message

PROTOCOL = Path(__file__).resolve().parents[1] / "protocol"
FILE = json.loads((PROTOCOL / "vectors.json").read_text())
VECTORS, INVALID, ERRORS = FILE["vectors"], FILE["invalid"], FILE["errors"]
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


# --- invalid messages: each must be refused with its category's error ------------------------------

def _frames(v):
    return [bytes.fromhex(f) for f in v["frames"]]


@pytest.mark.parametrize("v", INVALID, ids=[v["name"] for v in INVALID])
def test_decoding_an_invalid_vector_raises_its_error(v):
    assert v["phrase"] == ERRORS[v["error"]]
    with pytest.raises(ProtocolError) as info:
        decode_message(_frames(v))
    message = str(info.value)
    assert v["phrase"] in message
    # The phrases tell the categories apart: no message carries another category's phrase.
    assert [c for c, phrase in ERRORS.items() if phrase in message] == [v["error"]], message


def test_every_category_has_a_vector_and_a_row_in_the_spec():
    spec = (PROTOCOL / "SPEC.md").read_text()
    table = spec[spec.index("### Invalid messages"):]
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| .* \| `(.+)` \|$", table, re.M))
    assert rows == ERRORS
    assert {v["error"] for v in INVALID} == set(ERRORS)
    names = [v["name"] for v in INVALID]
    assert len(set(names)) == len(names) and not set(names) & {v["name"] for v in VECTORS}


# The vectors about the frames themselves; in all others the frames agree with the header.
_FRAME_RULES = ("msgpack", "payload-length", "checksum", "frame-count")
_FRAMED = [v for v in INVALID if v["error"] not in _FRAME_RULES]


@pytest.mark.parametrize("v", _FRAMED, ids=[v["name"] for v in _FRAMED])
def test_an_invalid_vectors_payloads_match_their_p_and_k(v):
    """Valid in every other respect: each entry's p and k describe its payload frame, and there is one
    frame a tensor (read leniently: msgpack-python keeps a duplicate key's last value)."""
    frames = _frames(v)
    entries = msgpack.unpackb(frames[0], raw=False)["t"]
    assert len(frames) == 1 + len(entries)
    for e, payload in zip(entries, frames[1:]):
        assert e.get("p", len(payload)) == len(payload) and e["k"] == xxhash.xxh3_64_intdigest(payload)


@pytest.mark.parametrize("name, limits", [
    ("limit-dimension", Limits(max_elements=(1 << 27) + 1)),
    ("limit-tensors", Limits(max_tensors=65)),
    ("limit-header-bytes", Limits(max_header_bytes=(1 << 16) + 1)),
])
def test_a_limit_vector_decodes_with_the_limit_one_higher(name, limits):
    """The limit is all that is wrong with them (the others would allocate 512 MiB and more)."""
    v = next(v for v in INVALID if v["name"] == name)
    decode_message(_frames(v), limits=limits)
