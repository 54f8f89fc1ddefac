"""Real-ESRGAN-class .pth plug-ins (pipelines/hybrid_sr/plugins.py) behind the lightweight SR interface.

The weights are built here by hand under the published key names (xinntao's BasicSR RRDBNet and Real-ESRGAN's
SRVGGNetCompact), never through the classes under test, and each output is checked against a forward written
out below from BasicSR's definition, plus two that need no reference at all (zero weights). spandrel is not a
requirement: where it imports, SpandrelSR is checked against RealESRGANFile; where it does not, its ImportError
must say why.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from latentwire.pipelines.hybrid_sr.plugins import RealESRGANFile, SpandrelSR, build_from_state_dict


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.05  # small: outputs stay mostly inside [0, 1], unclamped


def rrdb_state_dict(num_feat=8, num_block=1, num_grow_ch=32, unshuffle=1, seed=0):
    """BasicSR RRDBNet keys: conv_first, body.N.rdbK.convJ, conv_body, conv_up1, conv_up2, conv_hr, conv_last.
    32 growth channels is every published model's (and the only one spandrel reads)."""
    gen, sd = torch.Generator().manual_seed(seed), {}

    def conv(name, cin, cout):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _rand(cout, cin, 3, 3, gen=gen), _rand(cout, gen=gen)

    conv("conv_first", 3 * unshuffle ** 2, num_feat)
    for n in range(num_block):
        for k in (1, 2, 3):
            for j in range(1, 6):
                conv(f"body.{n}.rdb{k}.conv{j}", num_feat + (j - 1) * num_grow_ch, num_feat if j == 5 else num_grow_ch)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat)
    conv("conv_last", num_feat, 3)
    sd["conv_last.bias"] += 0.5  # outputs around mid-grey, so few are clamped
    return sd


def reference_rrdb(sd, x, unshuffle=1):
    """BasicSR's RRDBNet.forward, unrolled, on [0, 1] input."""
    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    feat = conv("conv_first", x)
    trunk = feat
    for n in range(len({k.split(".")[1] for k in sd if k.startswith("body.")})):
        rrdb_in = trunk
        for k in (1, 2, 3):
            p = f"body.{n}.rdb{k}."
            x0 = trunk
            x1 = lrelu(conv(p + "conv1", x0))
            x2 = lrelu(conv(p + "conv2", torch.cat((x0, x1), 1)))
            x3 = lrelu(conv(p + "conv3", torch.cat((x0, x1, x2), 1)))
            x4 = lrelu(conv(p + "conv4", torch.cat((x0, x1, x2, x3), 1)))
            trunk = conv(p + "conv5", torch.cat((x0, x1, x2, x3, x4), 1)) * 0.2 + x0
        trunk = trunk * 0.2 + rrdb_in
    feat = feat + conv("conv_body", trunk)
    feat = lrelu(conv("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def compact_state_dict(num_feat=8, num_conv=2, scale=2, seed=0):
    """SRVGGNetCompact keys: body.0 conv, body.1 PReLU, ..., body.{2 num_conv + 2} conv to 3 scale^2."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for i in range(num_conv + 1):
        cin = 3 if i == 0 else num_feat
        sd[f"body.{2 * i}.weight"], sd[f"body.{2 * i}.bias"] = _rand(num_feat, cin, 3, 3, gen=gen), _rand(num_feat, gen=gen)
        sd[f"body.{2 * i + 1}.weight"] = 0.25 + _rand(num_feat, gen=gen)  # PReLU slopes
    last = 2 * num_conv + 2
    sd[f"body.{last}.weight"], sd[f"body.{last}.bias"] = (_rand(3 * scale * scale, num_feat, 3, 3, gen=gen),
                                                          _rand(3 * scale * scale, gen=gen))
    return sd


def reference_compact(sd, x, scale):
    """Real-ESRGAN's SRVGGNetCompact.forward on [0, 1] input."""
    out, last = x, max(int(k.split(".")[1]) for k in sd)
    for i in range(0, last, 2):
        out = F.prelu(F.conv2d(out, sd[f"body.{i}.weight"], sd[f"body.{i}.bias"], padding=1), sd[f"body.{i + 1}.weight"])
    out = F.conv2d(out, sd[f"body.{last}.weight"], sd[f"body.{last}.bias"], padding=1)
    return F.pixel_shuffle(out, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")


def _images(b=2, h=5, w=6, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _check_interface(model, images, scale):
    out = model.upscale(images)
    assert model.scale == scale and isinstance(model.name, str) and model.name
    assert out.shape == (images.shape[0], 3, images.shape[2] * scale, images.shape[3] * scale)
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1 and not out.requires_grad
    return out


@pytest.mark.parametrize("wrapper", [None, "params_ema", "params"])
def test_rrdbnet_x4_file_matches_basicsr_forward(tmp_path, wrapper):
    sd = rrdb_state_dict()
    path = tmp_path / "RealESRGAN_tiny_x4.pth"
    torch.save(sd if wrapper is None else {wrapper: sd}, path)
    model = RealESRGANFile.from_file(str(path))
    images = _images()
    out = _check_interface(model, images, 4)
    assert model.arch == "RRDBNet" and model.name == "rrdbnet-x4:RealESRGAN_tiny_x4"
    net = model.net
    assert (net.num_feat, net.num_block, net.num_grow_ch, net.unshuffle) == (8, 1, 32, 1)
    ref = reference_rrdb(sd, (images + 1) / 2)
    assert ref.min() > 0 and ref.max() < 1  # nothing is clamped away from the comparison
    torch.testing.assert_close(net((images + 1) / 2), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, (ref * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_params_ema_is_preferred_over_params(tmp_path):
    ema, plain = rrdb_state_dict(seed=0), rrdb_state_dict(seed=5)
    torch.save({"params": plain, "params_ema": ema}, tmp_path / "both.pth")
    images = _images()
    out = RealESRGANFile.from_file(str(tmp_path / "both.pth")).upscale(images)
    torch.testing.assert_close(out, (reference_rrdb(ema, (images + 1) / 2) * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unshuffle,scale", [(2, 2), (4, 1)])
def test_rrdbnet_pixel_unshuffle_variants(tmp_path, unshuffle, scale):
    """BasicSR's x2 and x1: 12 / 48 input channels, the RGB image pixel-unshuffled by 2 / 4 first."""
    sd = rrdb_state_dict(unshuffle=unshuffle, num_block=2, num_grow_ch=4)  # width and growth both read off
    torch.save({"params_ema": sd}, tmp_path / "m.pth")
    model = RealESRGANFile.from_file(str(tmp_path / "m.pth"))
    images = _images(h=8, w=4)
    out = _check_interface(model, images, scale)
    assert (model.net.num_block, model.net.num_grow_ch) == (2, 4)
    torch.testing.assert_close(out, (reference_rrdb(sd, (images + 1) / 2, unshuffle) * 2 - 1).clamp(-1, 1),
                               rtol=1e-5, atol=1e-6)
    _check_interface(model, _images(h=5, w=7), scale)  # not a multiple of the unshuffle: padded, then cropped


def _esrgan_repo_names(sd):
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", k)
        k = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}.get(
            k.split(".")[0], k.split(".")[0]) + k[len(k.split(".")[0]):]
        out[k] = v
    return out


def _sequential_names(sd, num_block):
    """The original ESRGAN layout: model.0 first conv, model.1.sub.N blocks + trunk conv, upconvs at 3 and 6,
    HR conv at 8, last at 10 (the activation and upsampling layers hold no weights)."""
    top = {"conv_first": 0, "conv_up1": 3, "conv_up2": 6, "conv_hr": 8, "conv_last": 10}
    out = {}
    for k, v in sd.items():
        name, kind = k.rsplit(".", 1)
        if m := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", name):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{kind}"] = v
        elif name == "conv_body":
            out[f"model.1.sub.{num_block}.{kind}"] = v
        else:
            out[f"model.{top[name]}.{kind}"] = v
    return out


@pytest.mark.parametrize("layout", ["esrgan-repo", "sequential"])
def test_rrdbnet_other_key_namings_give_the_same_model(tmp_path, layout):
    sd = rrdb_state_dict(num_block=2)
    renamed = _esrgan_repo_names(sd) if layout == "esrgan-repo" else _sequential_names(sd, 2)
    assert not any(k.startswith(("body.", "conv_body", "conv_up", "conv_hr")) for k in renamed)
    torch.save(renamed, tmp_path / "old.pth")
    model = RealESRGANFile.from_file(str(tmp_path / "old.pth"))
    images = _images()
    out = _check_interface(model, images, 4)
    torch.testing.assert_close(out, (reference_rrdb(sd, (images + 1) / 2) * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_conv,scale", [(2, 2), (0, 4)])
def test_compact_file_matches_realesrgan_forward(tmp_path, num_conv, scale):
    sd = compact_state_dict(num_conv=num_conv, scale=scale)
    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "realesr-tiny.pth")
    model = RealESRGANFile.from_file(str(tmp_path / "realesr-tiny.pth"))
    images = _images()
    out = _check_interface(model, images, scale)
    assert model.arch == "SRVGGNetCompact" and (model.net.num_feat, model.net.num_conv) == (8, num_conv)
    ref = reference_compact(sd, (images + 1) / 2, scale)
    torch.testing.assert_close(model.net((images + 1) / 2), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, (ref * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_safetensors_file_and_path_objects(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = compact_state_dict(num_conv=1, scale=2)
    safetensors_torch.save_file(sd, str(tmp_path / "compact.safetensors"))
    model = RealESRGANFile.from_file(tmp_path / "compact.safetensors")
    images = _images()
    torch.testing.assert_close(_check_interface(model, images, 2),
                               (reference_compact(sd, (images + 1) / 2, 2) * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_zero_weights_give_outputs_known_by_hand():
    """No reference needed: a Compact with zero convs is its nearest-neighbour skip; an RRDBNet with zero
    weights and conv_last bias b gives 2b - 1 everywhere."""
    images = _images(b=1, h=3, w=4)
    compact = {k: torch.zeros_like(v) for k, v in compact_state_dict(num_conv=1, scale=2).items()}
    out = RealESRGANFile.from_state_dict(compact).upscale(images)
    assert torch.equal(out, images.repeat_interleave(2, 2).repeat_interleave(2, 3))
    rrdb = {k: torch.zeros_like(v) for k, v in rrdb_state_dict().items()}
    rrdb["conv_last.bias"] = torch.tensor([0.25, 0.5, 0.75])
    out = RealESRGANFile.from_state_dict(rrdb).upscale(images)
    assert out.shape == (1, 3, 12, 16)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 12, 16))


def test_not_an_sr_file_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, tmp_path / "classifier.pth")
    with pytest.raises(ValueError, match="not a Real-ESRGAN-class state dict.*SpandrelSR"):
        RealESRGANFile.from_file(str(tmp_path / "classifier.pth"))
    swinir_like = {"conv_first.weight": torch.zeros(8, 3, 3, 3), "layers.0.residual_group.blocks.0.norm1.weight":
                   torch.zeros(8), "conv_last.weight": torch.zeros(3, 8, 3, 3)}
    with pytest.raises(ValueError, match="no RRDB blocks.*SpandrelSR"):
        build_from_state_dict(swinir_like)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        RealESRGANFile.from_file(str(tmp_path / "tensor.pth"))
    grey = rrdb_state_dict()
    grey["conv_first.weight"] = grey["conv_first.weight"][:, :1]
    with pytest.raises(ValueError, match="1 input and 3 output channels.*3-channel RGB"):
        build_from_state_dict(grey)
    no_prelu = {k: v for k, v in compact_state_dict().items() if not re.fullmatch(r"body\.\d*[13579]\.weight", k)}
    with pytest.raises(ValueError, match="without PReLU weights"):
        build_from_state_dict(no_prelu)
    short = rrdb_state_dict()
    del short["conv_hr.bias"]
    with pytest.raises(ValueError, match="does not match the RRDBNet.*conv_hr.bias"):
        build_from_state_dict(short)
    wrong = rrdb_state_dict()
    wrong["conv_body.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(ValueError, match="does not match the RRDBNet"):
        build_from_state_dict(wrong)


def test_corrupt_or_missing_file_is_refused(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        RealESRGANFile.from_file(str(tmp_path / "garbage.pth"))
    torch.save(rrdb_state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        RealESRGANFile.from_file(str(tmp_path / "truncated.pth"))
    with pytest.raises(FileNotFoundError, match="no such SR weights file"):
        RealESRGANFile.from_file(str(tmp_path / "absent.pth"))


def test_upscale_refuses_images_that_are_not_b3hw():
    model = RealESRGANFile.from_state_dict(compact_state_dict())
    for bad in (torch.zeros(3, 4, 4), torch.zeros(1, 4, 4, 4)):
        with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
            model.upscale(bad)


def _spandrel_or_error():
    try:
        import spandrel
        return spandrel, None
    except Exception as e:  # not installed, or installed beside a torchvision that cannot import
        return None, e


def test_spandrel_plugin_matches_or_says_why_it_cannot_import(tmp_path):
    torch.save({"params_ema": rrdb_state_dict()}, tmp_path / "x4.pth")
    spandrel, error = _spandrel_or_error()
    if spandrel is None:
        with pytest.raises(ImportError, match="(?s)torchvision.*RealESRGANFile") as info:
            SpandrelSR.from_file(str(tmp_path / "x4.pth"))
        assert ("is installed but" in str(info.value)) == (getattr(error, "name", None) != "spandrel")
        return
    model = SpandrelSR.from_file(str(tmp_path / "x4.pth"))
    images = _images()
    out = _check_interface(model, images, 4)
    assert model.arch == "ESRGAN"
    torch.testing.assert_close(out, RealESRGANFile.from_file(str(tmp_path / "x4.pth")).upscale(images),
                               rtol=1e-5, atol=1e-6)
    torch.save({"params_ema": compact_state_dict(num_conv=2, scale=2)}, tmp_path / "compact.pth")
    images = _images()
    torch.testing.assert_close(_check_interface(SpandrelSR.from_file(str(tmp_path / "compact.pth")), images, 2),
                               RealESRGANFile.from_file(str(tmp_path / "compact.pth")).upscale(images),
                               rtol=1e-5, atol=1e-6)
    torch.save({"params_ema": rrdb_state_dict(unshuffle=4)}, tmp_path / "x1.pth")  # spandrel: "Restoration"
    with pytest.raises(ValueError, match="not a super-resolution one"):
        SpandrelSR.from_file(str(tmp_path / "x1.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="spandrel cannot read it"):
        SpandrelSR.from_file(str(tmp_path / "garbage.pth"))
