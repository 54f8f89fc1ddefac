"""Writes protocol/vectors.json, the wire format's checked-in test vectors (SPEC.md, "Test vectors").

Run from the repository root after a deliberate change of the wire format (which also bumps
WIRE_VERSION):  .venv/bin/python tests/make_vectors.py
tests/test_vectors.py checks both directions against the checked-in file.
"""
import json
from pathlib import Path

import torch

from latentwire.protocol import decode_message, encode_message

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


if __name__ == "__main__":
    OUT.write_text(json.dumps({"wire_version": 1, "vectors": build()}, indent=1) + "\n")
    print(f"wrote {OUT}")
