"""Lightweight super-resolution on the edge: bicubic (the floor) and a small ESPCN-class CNN trained here.

Every lightweight SR model has one interface, which the hybrid pipeline and the plug-ins share:

    model.scale                      int: output side = input side x scale
    model.name                       str: what the JSON reports call it
    model.upscale(images)            (B, 3, h, w) float32 in [-1, 1] -> (B, 3, h*scale, w*scale) in [-1, 1]

ESPCN (Shi et al. 2016): convolutions at the low resolution, then a sub-pixel convolution (PixelShuffle) to
the high one. Ours adds its output to the bicubic upscale (a residual), so an untrained net is bicubic and
training only learns the correction: sharper edges. It never sees the prompt, so a texture the low
resolution does not carry (pipelines/world.py) is beyond it: it can only draw the average.
"""
import json
import os

import torch
import torch.nn.functional as F

CONFIG = "config.json"
WEIGHTS = "model.pt"


def bicubic(images, scale):
    """(B, 3, h, w) -> (B, 3, h*scale, w*scale): torch's bicubic (align_corners=False), clamped to [-1, 1]."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


class Bicubic:
    """Bicubic interpolation behind the lightweight interface: no weights, the floor every SR must beat."""

    def __init__(self, scale):
        self.scale, self.name = _check_scale(scale), f"bicubic-x{scale}"

    def upscale(self, images):
        return bicubic(images, self.scale)


class ESPCN(torch.nn.Module):
    """conv5x5 -> tanh -> conv3x3 -> tanh -> conv3x3 to 3 scale^2 channels -> PixelShuffle, plus bicubic."""

    def __init__(self, scale, width=32):
        super().__init__()
        self.scale, self.width = _check_scale(scale), width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 5, padding=2), torch.nn.Tanh(),
            torch.nn.Conv2d(width, width // 2, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv2d(width // 2, 3 * scale * scale, 3, padding=1), torch.nn.PixelShuffle(scale))
        torch.nn.init.zeros_(self.body[4].weight)  # start as bicubic exactly
        torch.nn.init.zeros_(self.body[4].bias)

    def forward(self, images):
        return F.interpolate(images, scale_factor=self.scale, mode="bicubic", align_corners=False) + self.body(images)


class LightSR:
    """A trained ESPCN behind the lightweight interface, from a folder of config.json + model.pt."""

    def __init__(self, net, name=None, device="cpu"):
        self.net = net.to(device).eval().requires_grad_(False)
        self.scale, self.device = net.scale, torch.device(device)
        self.name = name or f"espcn-x{net.scale}"

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        config_path = os.path.join(path, CONFIG)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path!r} is not a lightweight SR folder: it lacks {CONFIG}; give one "
                                    "LightSR.save_pretrained (train_sr.py's export) wrote")
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict) or config.get("architecture") != "espcn":
            raise ValueError(f"{config_path} names architecture {config.get('architecture')!r}; this loader reads "
                             "'espcn' (for Real-ESRGAN-class .pth files use plugins.py)")
        scale, width = config.get("scale"), config.get("width")
        if type(scale) is not int or not 1 <= scale <= 16 or type(width) is not int or not 2 <= width <= 1024:
            raise ValueError(f"{config_path}: scale must be an int in 1..16 and width an int in 2..1024, got scale "
                             f"{scale!r}, width {width!r}")
        net = ESPCN(scale, width)
        net.load_state_dict(torch.load(os.path.join(path, WEIGHTS), map_location="cpu", weights_only=True))
        return cls(net, config.get("name"), device)

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG), "w") as f:
            json.dump({"architecture": "espcn", "scale": self.scale, "width": self.net.width, "name": self.name}, f)
        torch.save(self.net.state_dict(), os.path.join(path, WEIGHTS))
        return path

    @torch.no_grad()
    def upscale(self, images):
        return self.net(images.to(self.device, torch.float32)).clamp(-1, 1)


def _check_scale(scale):
    if type(scale) is not int or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return scale
