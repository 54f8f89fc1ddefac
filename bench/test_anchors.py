"""Benchmark: the round trip decode(encode(x)) through each anchor latentwire is measured against.

Anchors (anchors.py): raw tobytes (the memcpy ceiling, the group's baseline), safetensors,
torch.save, blosc2 (shuffle + zstd) on fp32 and fp16, and zfp in fixed-accuracy mode with the
largest tolerance whose RMSE is at most latentwire's for the named codec. The round trip must give
the latent back exactly (fp32), exactly as x.half() (fp16), or within the tolerance and RMSE (zfp).
"""
import pytest
import torch

import anchors
import cases
from latentwire.protocol import decode, encode

CONTENTS = ("noise", "smooth")
ZFP_MATCHED = ("fp16", "int8", "int4")  # zfp tuned to the RMSE of these latentwire codecs (zstd 3)


def _roundtrip(anchor, x):
    buf = anchor.encode(x)
    return buf, anchor.decode(buf, x.shape)


def _anchor(name, x):
    """(anchor, RMSE it must meet) for a fixed anchor name or 'zfp@<codec>'."""
    if not name.startswith("zfp@"):
        return anchors.fixed()[name], None
    target = cases.rmse(x, decode(encode(x, name[4:], 3)))
    return anchors.matched_zfp(x, target), target


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("name", list(anchors.fixed()) + [f"zfp@{c}" for c in ZFP_MATCHED])
def test_anchor_roundtrip(shape, content, name, time_it, record):
    x = cases.latent(shape, content)
    anchor, target = _anchor(name, x)
    if anchor is None:
        pytest.fail(f"no zfp tolerance reaches latentwire {name[4:]}'s RMSE on {content}")
    buf, y = time_it(f"round trip {cases.shape_label(shape)} {content}", x, _roundtrip, anchor, x)
    if anchor.lossless:
        assert torch.equal(x, y), f"{name} did not give the latent back exactly"
    if anchor.cast == "fp16":
        assert torch.equal(x.half().float(), y), f"{name} did not give x.half() back exactly"
    err = cases.rmse(x, y)
    if target is not None:
        assert err <= target, f"{anchor.name}: RMSE {err:.3e} over the matched {target:.3e}"
    record(x, wire_bytes=len(buf), rmse=err, baseline=name == anchors.CEILING, anchor=anchor.name)
