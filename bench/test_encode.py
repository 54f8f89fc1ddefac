"""Benchmark: latentwire ``encode`` of a float32 latent, per codec and zstd level.

Baseline in the same group: ``x.numpy().tobytes()``, the one memcpy any sender pays (fp32 at zstd 0
is faster still: its payload frame is the tensor's own memory, sent zero-copy). The frames timed
are decoded afterwards and must be within the codec's error bound.
"""
import pytest

import cases
from latentwire.protocol import decode, encode, wire_bytes

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
ZSTD_LEVELS = (0, 1, 3)
CONTENTS = ("noise", "smooth")  # speed depends on content only through zstd and the filter choice


def _tobytes(x):
    return x.numpy().tobytes()


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("codec,level", [("tobytes", None)] + [(c, z) for c in CODECS for z in ZSTD_LEVELS],
                         ids=lambda v: str(v))
def test_encode(shape, content, codec, level, time_it, record):
    x = cases.latent(shape, content)
    group = f"encode {cases.shape_label(shape)} {content}"
    if codec == "tobytes":
        raw = time_it(group, x, _tobytes, x)
        assert raw == x.numpy().tobytes(), "tobytes baseline did not return the latent's bytes"
        record(x, wire_bytes=len(raw), rmse=0.0, baseline=True)
        return
    frames = time_it(group, x, encode, x, codec, level)
    y = decode([bytes(f) for f in frames])
    cases.check_decoded(x, y, codec)
    record(x, wire_bytes=wire_bytes(frames), rmse=cases.rmse(x, y))
