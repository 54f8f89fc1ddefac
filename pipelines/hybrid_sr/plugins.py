"""Real-ESRGAN-class .pth files behind the lightweight SR interface (light.py's docstring):

    model.scale                      int: output side = input side x scale
    model.name                       str: what the JSON reports call it
    model.upscale(images)            (B, 3, h, w) float32 in [-1, 1] -> (B, 3, h*scale, w*scale) in [-1, 1]

Two loaders:

* ``SpandrelSR.from_file(path)``: any SR model spandrel (github.com/chaiNNer-org/spandrel) can detect. spandrel is
  optional and imported only here, and it cannot import beside a CPU torch from PyPI alone: ``import spandrel``
  imports its whole architecture registry, whose LaMa and RestoreFormer modules import torchvision, and PyPI's
  Linux torchvision wheels are CUDA builds (their ``_C.so`` needs ``libtorch_cuda.so``), which fail at import
  beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"). See ``_import_spandrel``.
* ``RealESRGANFile.from_file(path)``: no extra dependency. Reads the published layouts of the two
  architectures Real-ESRGAN ships, inferring scale, width and depth from the state dict:

  - RRDBNet (ESRGAN, RealESRGAN_x4plus, RealESRGAN_x2plus, 4x-UltraSharp, ...), under any of its three key
    namings: xinntao's BasicSR one (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``,
    ``conv_up2``, ``conv_hr``, ``conv_last``), the ESRGAN repository's (``RRDB_trunk``, ``RDBK``,
    ``trunk_conv``, ``upconvK``, ``HRconv``) and the original sequential one (``model.0``, ``model.1.sub.N``,
    ...). An input of 12 or 48 channels is RGB pixel-unshuffled by 2 or 4 (BasicSR's x2 and x1 models); an
    image whose sides are not a multiple of that is padded as Real-ESRGAN's inference code pads it (reflect,
    bottom/right) and the output cropped. spandrel pads those models to a multiple of 4 instead, so where a side
    is not a multiple of 4 the two loaders differ slightly near that border; elsewhere they agree exactly.
  - SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): ``body.N.weight``, PReLU activations.

  Both wrappers the training code writes (``params_ema``, preferred, and ``params``) and a DataParallel
  ``module.`` prefix are unwrapped. ESRGAN+ ("plus", 1x1 convolutions in the dense blocks), other activations
  and other architectures are refused with a message naming SpandrelSR.

The networks run in [0, 1] (what Real-ESRGAN and spandrel's models are trained on); ``upscale`` converts
[-1, 1] -> [0, 1] -> [-1, 1] and clamps.
"""
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .light import _check_scale

_WRAPPERS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "net")


class _DenseBlock(nn.Module):
    """ESRGAN's residual dense block: five 3x3 convs, each seeing the input and every earlier output."""

    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        for j in range(1, 6):
            setattr(self, f"conv{j}", nn.Conv2d(num_feat + (j - 1) * num_grow_ch,
                                                num_feat if j == 5 else num_grow_ch, 3, 1, 1))

    def forward(self, x):
        features = [x]
        for j in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{j}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class _RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(num_feat, num_grow_ch) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator with BasicSR's key names, on RGB in [0, 1].

    ``num_upsample`` nearest x2 + conv + LeakyReLU stages (2 in every BasicSR model); when ``scale`` is below
    2 ** num_upsample the input is first pixel-unshuffled by the ratio (2 or 4), as BasicSR's x2 and x1 are.
    """

    def __init__(self, scale=4, num_feat=64, num_block=23, num_grow_ch=32, num_upsample=2):
        super().__init__()
        self.scale, self.num_upsample = _check_scale(scale), num_upsample
        self.unshuffle = 2 ** num_upsample // scale
        if num_upsample < 1 or self.unshuffle * scale != 2 ** num_upsample or self.unshuffle not in (1, 2, 4):
            raise ValueError(f"RRDBNet cannot make scale {scale} from {num_upsample} x2 upsampling stages")
        self.num_feat, self.num_block, self.num_grow_ch = num_feat, num_block, num_grow_ch
        self.conv_first = nn.Conv2d(3 * self.unshuffle ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for k in range(1, num_upsample + 1):
            setattr(self, f"conv_up{k}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(_pad_to_multiple(x, self.unshuffle), self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, self.num_upsample + 1):
            feat = F.leaky_relu(getattr(self, f"conv_up{k}")(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., :h * self.scale, :w * self.scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net: conv + PReLU, num_conv x (conv + PReLU), conv to 3 scale^2 channels,
    PixelShuffle, plus the nearest-neighbour upscale of the input. RGB in [0, 1]."""

    def __init__(self, scale=4, num_feat=64, num_conv=16):
        super().__init__()
        self.scale, self.num_feat, self.num_conv = _check_scale(scale), num_feat, num_conv
        layers = [nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


class RealESRGANFile:
    """An RRDBNet or SRVGGNetCompact .pth (or .safetensors) file behind the lightweight interface, no spandrel."""

    def __init__(self, net, name=None, device="cpu"):
        self.net = net.to(device).eval().requires_grad_(False)
        self.scale, self.device = net.scale, torch.device(device)
        self.arch = type(net).__name__
        self.name = name or f"{self.arch.lower()}-x{net.scale}"

    @classmethod
    def from_file(cls, path, device="cpu", name=None):
        stem = os.path.splitext(os.path.basename(path))[0]
        net = build_from_state_dict(read_state_dict(path), source=path)
        return cls(net, name or f"{type(net).__name__.lower()}-x{net.scale}:{stem}", device)

    @classmethod
    def from_state_dict(cls, state_dict, device="cpu", name=None):
        return cls(build_from_state_dict(state_dict), name, device)

    @torch.no_grad()
    def upscale(self, images):
        _check_images(images)
        return _from_unit(self.net(_to_unit(images.to(self.device, torch.float32))))


def read_state_dict(path):
    """The tensors of a .pth/.pt/.ckpt (torch.load, weights_only) or .safetensors file, wrappers removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such SR weights file")
    try:
        if path.lower().endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ImportError(f"{path}: reading .safetensors needs the safetensors package "
                                  "(pip install safetensors); .pth files need nothing extra") from e
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:  # a truncated zip, a pickle that is not a state dict, a non-weights-only pickle
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    return unwrap_state_dict(obj, source=path)


def unwrap_state_dict(obj, source="state dict"):
    """BasicSR's ``params_ema`` (preferred) / ``params`` wrappers and a ``module.`` prefix, removed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not obj or bad:
        raise ValueError(f"{source}: not a state dict of tensors"
                         + (f" (entries {bad[:3]} are not tensors)" if bad else " (it is empty)"))
    return obj


def build_from_state_dict(state_dict, source="state dict"):
    """An RRDBNet or SRVGGNetCompact whose shape is read off ``state_dict``, with its weights loaded."""
    sd = unwrap_state_dict(state_dict, source)
    if "conv_first.weight" in sd or "model.0.weight" in sd:
        sd = _to_basicsr_names(sd, source)
        if "body.0.rdb1.conv1.weight" not in sd:  # SwinIR, HAT, DAT, ... have a conv_first too
            raise ValueError(f"{source}: not a Real-ESRGAN-class state dict: it has a conv_first but no RRDB blocks "
                             "(body.N.rdbK.convJ); for other architectures use SpandrelSR")
        net = _rrdbnet_for(sd, source)
    elif "body.0.weight" in sd:
        net = _compact_for(sd, source)
    else:
        raise ValueError(f"{source}: not a Real-ESRGAN-class state dict: it has neither RRDBNet's conv_first / "
                         f"model.0 nor SRVGGNetCompact's body.0 (first keys: {list(sd)[:4]}); "
                         "for other architectures use SpandrelSR")
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"{source}: does not match the {type(net).__name__} its shapes imply ({e})") from e
    if missing or unexpected:
        raise ValueError(f"{source}: does not match the {type(net).__name__} its shapes imply "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return net


def _to_basicsr_names(sd, source):
    """The ESRGAN repository's and the original sequential RRDBNet key names -> BasicSR's."""
    if any(".conv1x1." in k for k in sd):
        raise ValueError(f"{source}: an ESRGAN+ ('plus', 1x1 convs in the dense blocks) RRDBNet, which "
                         "RealESRGANFile does not read; use SpandrelSR")
    if "model.0.weight" in sd:
        convs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.weight", k)))[1:]
        n_up = len(convs) - 2  # after model.0 and model.1 (the trunk): the upconvs, then HR and last
        if n_up < 1 or convs != [3 * k for k in range(1, n_up + 1)] + [3 * n_up + 2, 3 * n_up + 4]:
            raise ValueError(f"{source}: a sequential ESRGAN layout with conv indices {convs} that "
                             "RealESRGANFile does not read; use SpandrelSR")
        nb = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))), default=-1)
        if nb == 0:
            raise ValueError(f"{source}: a sequential ESRGAN layout without RRDB blocks (model.1.sub.N.RDBK); "
                             "use SpandrelSR")
        named = {}
        for k, v in sd.items():
            if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k):
                named[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
                continue
            m = re.fullmatch(r"model\.(\d+)(?:\.sub\.(\d+))?\.(weight|bias)", k)
            if m is None:
                named[k] = v  # left for load_state_dict to report
            elif m[2] is not None:
                named[f"conv_body.{m[3]}" if int(m[2]) == nb else k] = v
            else:
                i = int(m[1])
                new = {0: "conv_first", 3 * n_up + 2: "conv_hr", 3 * n_up + 4: "conv_last"}.get(i)
                named[f"{new or f'conv_up{i // 3}'}.{m[3]}"] = v
        return named
    if any(k.startswith("RRDB_trunk.") for k in sd):
        renames = [(r"^RRDB_trunk\.", "body."), (r"\.RDB(\d)\.", r".rdb\1."), (r"^trunk_conv\.", "conv_body."),
                   (r"^upconv(\d+)\.", r"conv_up\1."), (r"^HRconv\.", "conv_hr.")]
        named = {}
        for k, v in sd.items():
            for pattern, new in renames:
                k = re.sub(pattern, new, k)
            named[k] = v
        return named
    return sd


def _rrdbnet_for(sd, source):
    first, last = sd.get("conv_first.weight"), sd.get("conv_last.weight")
    if first is None or last is None or first.ndim != 4 or last.ndim != 4:
        raise ValueError(f"{source}: an RRDBNet state dict without 4-D conv_first/conv_last weights")
    in_ch, out_ch = first.shape[1], last.shape[0]
    unshuffle = {3: 1, 12: 2, 48: 4}.get(in_ch)
    if out_ch != 3 or unshuffle is None:
        raise ValueError(f"{source}: an RRDBNet with {in_ch} input and {out_ch} output channels; the lightweight "
                         "SR interface takes 3-channel RGB (3 channels, or 12 / 48 pixel-unshuffled)")
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.rdb1\.conv1\.weight$", k))})
    ups = sorted({int(m.group(1)) for k in sd if (m := re.match(r"conv_up(\d+)\.weight$", k))})
    if not blocks or blocks != list(range(len(blocks))) or not ups or ups != list(range(1, len(ups) + 1)):
        raise ValueError(f"{source}: an RRDBNet state dict whose blocks {blocks} or upsampling convs {ups} "
                         "are not numbered 0.. / 1.. without gaps")
    if 2 ** len(ups) % unshuffle:
        raise ValueError(f"{source}: {len(ups)} upsampling stages cannot undo a {unshuffle}x pixel-unshuffle")
    return RRDBNet(2 ** len(ups) // unshuffle, first.shape[0], len(blocks), sd["body.0.rdb1.conv1.weight"].shape[0],
                   len(ups))


def _compact_for(sd, source):
    idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.weight", k))})
    top = idx[-1]
    if top % 2 or idx != list(range(top + 1)):
        missing = sorted(set(range(top + 1)) - set(idx))
        raise ValueError(f"{source}: an SRVGGNetCompact without PReLU weights at body.{missing[:3]}: a ReLU or "
                         "LeakyReLU one, which the file cannot tell apart; RealESRGANFile reads PReLU ones only"
                         if missing and all(i % 2 for i in missing) else
                         f"{source}: body.N.weight indices {idx[:6]}... are not an SRVGGNetCompact's")
    first, last = sd["body.0.weight"], sd[f"body.{top}.weight"]
    if first.ndim != 4 or last.ndim != 4 or first.shape[1] != 3 or last.shape[0] % 3:
        raise ValueError(f"{source}: an SRVGGNetCompact from {first.shape[1] if first.ndim == 4 else '?'} channels to "
                         f"{last.shape[0] if last.ndim == 4 else '?'}: the lightweight SR interface takes 3-channel RGB")
    scale = math.isqrt(last.shape[0] // 3)
    if scale * scale * 3 != last.shape[0]:
        raise ValueError(f"{source}: the last conv's {last.shape[0]} channels are not 3 x scale^2")
    return SRVGGNetCompact(scale, first.shape[0], top // 2 - 1)


class SpandrelSR:
    """Any model spandrel loads as a 3-channel RGB super-resolution model, behind the lightweight interface."""

    def __init__(self, descriptor, name=None):
        self.descriptor = descriptor
        self.scale, self.device = int(descriptor.scale), descriptor.device
        self.arch = descriptor.architecture.name
        self.name = name or f"spandrel-{self.arch}-x{self.scale}"

    @classmethod
    def from_file(cls, path, device="cpu", name=None):
        spandrel = _import_spandrel()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r}: no such SR weights file")
        try:
            descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
        except spandrel.UnsupportedModelError as e:
            raise ValueError(f"{path}: spandrel recognises no architecture in it ({e})") from e
        except Exception as e:  # a corrupt file: spandrel lets torch's error through
            raise ValueError(f"{path}: spandrel cannot read it ({type(e).__name__}: {e})") from e
        arch = descriptor.architecture.name
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
            raise ValueError(f"{path}: spandrel loads it as a {arch} {descriptor.purpose} model, not a "
                             "super-resolution one; the lightweight SR interface takes SR models only")
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ValueError(f"{path}: a {arch} SR model from {descriptor.input_channels} to "
                             f"{descriptor.output_channels} channels; the lightweight SR interface takes 3-channel RGB")
        stem = os.path.splitext(os.path.basename(path))[0]
        return cls(descriptor.to(device).eval(), name or f"spandrel-{arch}-x{descriptor.scale}:{stem}")

    @torch.no_grad()
    def upscale(self, images):
        _check_images(images)
        return _from_unit(self.descriptor(_to_unit(images.to(self.device, torch.float32))))


def _import_spandrel():
    try:
        import spandrel
    except Exception as e:
        installed = not isinstance(e, ModuleNotFoundError) or e.name not in ("spandrel", None)
        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        vision = f"torchvision==0.{minor + 15}.*" if major == 2 else "the torchvision made for your torch"
        cpu = "+cpu" in torch.__version__ or not torch.version.cuda
        raise ImportError(
            ("spandrel is installed but `import spandrel` fails" if installed else "spandrel is not installed")
            + f" ({type(e).__name__}: {e}). `import spandrel` imports its whole architecture registry, and its LaMa "
            "and RestoreFormer modules import torchvision, so spandrel needs a torchvision that imports beside "
            f"this torch {torch.__version__}. "
            + ("PyPI's Linux torchvision wheels are CUDA builds whose _C.so needs libtorch_cuda.so, so beside a CPU "
               "torch they fail at import ('operator torchvision::nms does not exist'). Install the CPU build: "
               f"pip install '{vision}' --index-url https://download.pytorch.org/whl/cpu && pip install spandrel. "
               if cpu else f"Install it: pip install '{vision}' spandrel. ")
            + "RealESRGANFile reads RRDBNet and SRVGGNetCompact (Real-ESRGAN) .pth files without spandrel.") from e
    return spandrel


def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"upscale takes (B, 3, h, w) images in [-1, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")


def _to_unit(images):
    return (images + 1) * 0.5


def _from_unit(images):
    return (images * 2 - 1).clamp(-1, 1)


def _pad_to_multiple(x, multiple):
    """Pad bottom/right to a multiple: reflect as far as it can (size - 1), replicate the rest."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not (pad_h or pad_w):
        return x
    reflect_h, reflect_w = min(pad_h, x.shape[-2] - 1), min(pad_w, x.shape[-1] - 1)
    x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    return F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
