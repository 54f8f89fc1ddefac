"""Benchmark: per-channel int8 quantization of a latent, numpy (CPU path) vs torch (accelerator path).

protocol/quant.py keeps two implementations of the same arithmetic and uses numpy for CPU tensors
because it measured faster on one core; this is that measurement. Baseline: the numpy path. The
two arrange the float32 arithmetic differently, so a value within rounding of a tie may land on
either neighbour: the symbols timed must agree within one, and on all but 0.1% exactly.
"""
import numpy as np
import pytest

import cases
from latentwire.protocol import quant

LEVELS = cases.LEVELS["int8"]


def _numpy_path(x3):
    lo, hi = quant.channel_ranges(x3, "x")
    return quant.quantize(x3, lo, quant.steps_for(lo, hi, LEVELS), LEVELS)


def _torch_path(x3):
    lo, hi = quant.channel_ranges_torch(x3, "x")
    return quant.quantize_torch(x3, lo, quant.steps_for(lo, hi, LEVELS), LEVELS)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_quantize_int8(shape, impl, time_it, record):
    x = cases.latent(shape, "middle")
    x3 = x.reshape(quant.channel_view(shape))
    arg = x3.numpy() if impl == "numpy" else x3
    sym = time_it(f"quantize int8 {cases.shape_label(shape)}", x, _numpy_path if impl == "numpy" else _torch_path, arg)
    sym = sym if isinstance(sym, np.ndarray) else sym.numpy()
    diff = np.abs(sym.astype(np.int16) - _numpy_path(x3.numpy()).astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, f"{impl} quantization strays from the numpy path"
    record(x, baseline=impl == "numpy")
