"""`latentwire codecs`: what every codec puts on the wire for latent-shaped tensors."""
import torch

from latentwire.protocol import decode, encode, wire_bytes
from latentwire.protocol.header import CODECS
from latentwire.protocol.samples import contents


def codec_rows(x, levels=(0, 3)):
    """For one tensor: (codec, level, bytes on wire, bits per value, RMSE, max abs error) per codec."""
    rows = []
    for codec in CODECS:
        for level in levels:
            frames = encode(x, codec, level)
            y = decode(frames)
            err = (y.double() - x.double()).abs()
            nbytes = wire_bytes(frames)
            rows.append((codec, level, nbytes, 8 * nbytes / max(1, x.numel()),
                         err.pow(2).mean().sqrt().item(), err.max().item()))
    return rows


def codec_table(shape, seed=0, levels=(0, 3)):
    lines = [f"latent shape {shape}, float32: {4 * torch.Size(shape).numel()} bytes raw", ""]
    for name, x in contents(shape, seed).items():
        lines.append(f"{name}")
        lines.append(f"  {'codec':6} {'zstd':>4} {'bytes':>9} {'bits/value':>10} {'x smaller':>9} {'RMSE':>10} {'max err':>10}")
        for codec, level, nbytes, bits, rmse, maxerr in codec_rows(x, levels):
            lines.append(f"  {codec:6} {level:>4} {nbytes:>9} {bits:>10.3f} {32 / bits:>9.2f} {rmse:>10.2e} {maxerr:>10.2e}")
        lines.append("")
    return "\n".join(lines)
