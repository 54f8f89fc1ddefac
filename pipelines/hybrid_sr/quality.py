"""How good an upscale is: fidelity to the world's exact render, and the detail it recovered.

    psnr(a, b, mask=None)        dB, images in [-1, 1] (peak-to-peak 2), over the pixels of ``mask``
    ssim(a, b, mask=None)        Wang et al. 2004, Gaussian window 11 / sigma 1.5, on [0, 1], channel mean
    judge_texture(images, scale) -> [texture or None]: the texture a shape shows, read off the image alone
    texture_accuracy(images, scenes, scale)

The texture judge is exact and needs no training, because world textures lie on the 32-px grid
(pipelines/world.py): inside a shape, every 32-px pixel holds one period. The judge takes the shape's
interior (pixels whose brightest channel is over 0.1, eroded by one 32-px pixel so no edge counts), folds
it into one period (the mean brightness at each of the scale x scale positions within a 32-px pixel), and
names the texture whose exact period, rendered by the world, is nearest. It reads generated images too:
it needs no scene, only the image.
"""
import functools

import torch
import torch.nn.functional as F

from .. import world

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2


def psnr(a, b, mask=None):
    """PSNR in dB of (B, C, H, W) images in [-1, 1] over all pixels, or over those of ``mask`` (B, H, W)."""
    err = (a - b).square().mean(1)  # (B, H, W)
    mse = err.mean() if mask is None else err[mask.bool()].mean()
    return float(10 * torch.log10(4 / mse.clamp_min(1e-12)))


def _gaussian(device):
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-x.square() / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a, b):
    """(B, H, W): SSIM at every pixel (channel mean) of (B, C, H, W) images in [-1, 1], on [0, 1] with
    replicate padding so that the map keeps the image's size."""
    a, b = (a + 1) / 2, (b + 1) / 2
    c = a.shape[1]
    k = _gaussian(a.device).expand(c, 1, -1, -1)
    pad = SSIM_WINDOW // 2

    def blur(x):
        return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a.square(), blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_a.square() + mu_b.square() + SSIM_C1)
                                                               * (var_a + var_b + SSIM_C2))
    return s.mean(1)


def ssim(a, b, mask=None):
    """Mean SSIM of (B, C, H, W) images in [-1, 1], over all pixels or those of ``mask`` (B, H, W)."""
    m = ssim_map(a, b)
    return float(m.mean() if mask is None else m[mask.bool()].mean())


def _period(image, scale):
    """(scale, scale) mean brightness at each position within a 32-px pixel over the shape's interior of one
    (3, 32 scale, 32 scale) image, or None if it has no interior."""
    bright = (image.amax(0) + 1) / 2  # [0, 1]
    inside = (bright > 0.1).float()  # below the darkest ink (TEXTURE_INK 0.25): a texture stays inside
    # erode by one 32-px pixel (scale high-res pixels): no edge pixel, whose coverage is partial, counts
    inside = -F.max_pool2d(-inside[None, None], 2 * scale + 1, stride=1, padding=scale)[0, 0] > 0.5
    size = bright.shape[-1] // scale
    cells = bright.reshape(size, scale, size, scale).permute(0, 2, 1, 3)  # (32, 32, s, s)
    keep = inside.reshape(size, scale, size, scale).permute(0, 2, 1, 3).all(-1).all(-1)  # whole 32-px pixels
    if not bool(keep.any()):
        return None
    return cells[keep].mean(0)


@functools.lru_cache(maxsize=None)
def periods(scale):
    """{texture: its exact (scale, scale) period}: a jitter-free red square rendered by the world."""
    out = {}
    for name in world.TEXTURES:
        image = world.render([world.Scene("red", "square", "top left", name)], 0, jitter=0, scale=scale)[0]
        out[name] = _period(image, scale)
    return out


def judge_texture(images, scale):
    """[texture name, or None where no shape interior is found] of (B, 3, 32 scale, 32 scale) images."""
    if scale == 1:
        raise ValueError("a 32-px image shows no texture (world.render draws none at scale 1)")
    refs = periods(scale)
    out = []
    for image in images:
        p = _period(image.float().cpu(), scale)
        out.append(None if p is None else min(refs, key=lambda k: float((refs[k] - p).square().sum())))
    return out


def texture_accuracy(images, scenes, scale):
    """The share of images whose judged texture is their scene's."""
    judged = judge_texture(images, scale)
    return sum(j == s.texture for j, s in zip(judged, scenes)) / len(scenes)
