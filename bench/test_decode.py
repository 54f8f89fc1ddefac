"""Benchmark: latentwire ``decode`` of frames received as ``bytes``, per codec and zstd level.

Frames are ``bytes``, as a ZeroMQ socket hands them over with copy=True, so every codec pays at
least one copy. Baseline in the same group: a float32 tensor from the raw bytes (one memcpy).
The decoded tensor must be within the codec's error bound of the encoded latent.
"""
import pytest
import torch

import cases
from latentwire.protocol import decode, encode

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
ZSTD_LEVELS = (0, 1, 3)
CONTENTS = ("noise", "smooth")


def _frombytes(raw, shape):
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("codec,level", [("frombytes", None)] + [(c, z) for c in CODECS for z in ZSTD_LEVELS],
                         ids=lambda v: str(v))
def test_decode(shape, content, codec, level, time_it, record):
    x = cases.latent(shape, content)
    group = f"decode {cases.shape_label(shape)} {content}"
    if codec == "frombytes":
        raw = x.numpy().tobytes()
        y = time_it(group, x, _frombytes, raw, shape)
        assert torch.equal(x, y), "frombytes baseline did not give the latent back"
        record(x, wire_bytes=len(raw), rmse=0.0, baseline=True)
        return
    frames = [bytes(f) for f in encode(x, codec, level)]
    y = time_it(group, x, decode, frames)
    cases.check_decoded(x, y, codec)
    record(x, wire_bytes=sum(map(len, frames)), rmse=cases.rmse(x, y))
