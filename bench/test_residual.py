"""Benchmark: int8 ``encode`` of x_t with the receiver's reference x_T (residual coding) vs without.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the receiver already holds eps = x_T (it has the
seed). Both rows of a group encode the same tensor at the same quantization step, so both keep
|error| <= step/2 (extra_info has each RMSE); the plain row is the baseline, and extra_info has
bytes both ways. The timed frames must decode (with the reference) within int8's bound.
"""
import pytest

import cases
from latentwire.protocol import decode, encode, samples, wire_bytes

CODEC, LEVEL = "int8", 3


@pytest.mark.parametrize("step", list(samples.STEPS))
@pytest.mark.parametrize("coding", ["plain", "residual"])
def test_residual_encode(shape, step, coding, time_it, record):
    x = cases.latent(shape, step)
    reference = cases.latent(shape, "noise") if coding == "residual" else None
    frames = time_it(f"residual {cases.shape_label(shape)} {cases.content_label(step)}", x, encode, x, CODEC, LEVEL,
                     reference=reference)
    y = decode([bytes(f) for f in frames], reference=reference)
    cases.check_decoded(x, y, CODEC, reference)
    plain = wire_bytes(encode(x, CODEC, LEVEL))
    record(x, wire_bytes=wire_bytes(frames), rmse=cases.rmse(x, y), baseline=coding == "plain",
           plain_bytes=plain, bytes_saved_x=round(plain / wire_bytes(frames), 3))
