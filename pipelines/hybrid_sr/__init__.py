"""Region-aware hybrid super-resolution (arXiv 2601.14741), as latentwire runs it: the edge generates at low
resolution, foreground patches go to a diffusion SR model in the cloud and background patches to a
lightweight SR model on the edge, at the same time, and the two are stitched.
"""
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SCALES = (2, 4)


def upscaler_path(scale):
    """The committed world diffusion upscaler of ``scale`` (a StableDiffusionUpscalePipeline folder)."""
    return ASSETS / f"world-sr-x{_scale(scale)}"


def light_path(scale):
    """The committed world lightweight SR (an ESPCN folder, light.LightSR) of ``scale``."""
    return ASSETS / f"world-light-x{_scale(scale)}"


def _scale(scale):
    if scale not in SCALES:
        raise ValueError(f"the world's SR models upscale x{' or x'.join(map(str, SCALES))}, not {scale!r}")
    return scale
