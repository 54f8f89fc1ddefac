"""Hybrid SR: the patch geometry and the stitch (exact with identity SR), the foreground rule against the
world's exact masks, the split run here and across two real processes, and `latentwire upscale`."""
import json
import re

import pytest
import torch

import daemons
from latentwire import cli
from latentwire.pipelines import world
from latentwire.pipelines.embedded import EDGE_PATH
from latentwire.pipelines.hybrid_sr import quality, regions
from latentwire.pipelines.hybrid_sr import train_sr
from latentwire.pipelines.hybrid_sr.light import Bicubic, ESPCN, LightSR
from latentwire.pipelines.hybrid_sr.pipeline import HybridSR
from latentwire.pipelines.models import load_model
from latentwire.scheduler import wire
from latentwire.scheduler.engine import CloudEngine
from latentwire.scheduler.session import SessionSpec

STEPS = 2  # the upscaler's steps in these tests: the machinery, not the quality, is under test


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An untrained world x4 upscaler (float32: runs here and in a daemon compare exactly)."""
    root = tmp_path_factory.mktemp("sr")
    vae = train_sr.build_vae(4)
    vae.register_to_config(scaling_factor=train_sr.UPSCALER_SCALING)
    return train_sr.save_folder(str(root / "world-sr-x4"), vae, train_sr.build_unet(), str(root / "tok"),
                                dtype=torch.float32)


@pytest.fixture(scope="module")
def upscaler(folder):
    return load_model(folder)


def scene_image(seed=3):
    scene = world.sample_scenes(1, seed, textures=True)[0]
    return scene, world.render([scene], seed)[0]


# -- geometry -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch,overlap", [(8, 0), (8, 2), (8, 3), (12, 5), (32, 0), (5, 1)])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_an_image_split_and_stitched_with_identity_sr_comes_back_exact(patch, overlap, scale):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(patch + scale)) * 2 - 1
    big = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # identity SR: every pixel repeated
    grid = regions.patch_grid(32, 32, patch, overlap)
    assert {(y + dy, x + dx) for y, x in grid for dy in range(patch) for dx in range(patch)} == \
        {(y, x) for y in range(32) for x in range(32)}
    tiles = regions.crops(big, [(y * scale, x * scale) for y, x in grid], patch * scale)
    out = regions.stitch(tiles, grid, patch, scale, (32, 32), overlap)
    assert torch.equal(out, big)
    assert regions.seam_error(out, big, grid, patch, scale) == {"border": 0.0, "interior": 0.0}


def test_the_stitch_blends_disagreeing_tiles_across_the_overlap():
    grid = regions.patch_grid(16, 16, 8, 4)  # corners 0, 4, 8 on each axis
    tiles = torch.stack([torch.full((1, 8, 8), float(k)) for k in range(len(grid))])
    out = regions.stitch(tiles, grid, 8, 1, (16, 16), 4)[0]
    assert out[0, 0] == 0 and out[15, 15] == len(grid) - 1  # corners only one tile covers keep it
    row = out[0]  # tiles 0, 1, 2 along the top: a monotone blend, no step larger than the ramp's
    assert bool((row[1:] >= row[:-1]).all()) and float((row[1:] - row[:-1]).max()) < 1.0
    with pytest.raises(ValueError, match="overlap must be < patch"):
        regions.patch_grid(16, 16, 8, 8)
    with pytest.raises(ValueError, match="patch must be in"):
        regions.patch_grid(16, 16, 20)


def test_the_foreground_rule_finds_every_shape_pixel_of_the_exact_masks():
    scenes = world.sample_scenes(64, 21, textures=True)
    low = world.render(scenes, 21)
    exact = world.coverage(scenes, 21, scale=4) > 0
    predicted = torch.stack([regions.foreground(im) for im in low])
    up = predicted.repeat_interleave(4, 1).repeat_interleave(4, 2)
    scores = regions.mask_scores(up, exact)
    assert scores["recall"] == 1.0  # dilated by a pixel: no shape pixel is left to the lightweight model
    assert scores["precision"] > 0.5 and scores["iou"] > 0.5, scores
    undilated = regions.mask_scores(torch.stack([regions.foreground(im, dilate=0) for im in low])
                                    .repeat_interleave(4, 1).repeat_interleave(4, 2), exact)
    assert undilated["precision"] > scores["precision"] and undilated["recall"] < 1.0
    grid = regions.patch_grid(32, 32, 8, 2)
    for m, e in zip(predicted, exact):  # every patch holding a shape pixel goes to the cloud
        fg, _ = regions.split(m, grid, 8)
        truth = {i for i, (y, x) in enumerate(grid) if bool(e[4 * y:4 * y + 32, 4 * x:4 * x + 32].any())}
        assert truth <= set(fg)


def test_texture_needs_the_caption_bicubic_cannot_draw_it():
    scenes = world.sample_scenes(90, 4, textures=True)
    high = world.render(scenes, 4, scale=4)
    assert quality.texture_accuracy(high, scenes, 4) == 1.0
    assert quality.texture_accuracy(Bicubic(4).upscale(world.render(scenes, 4)), scenes, 4) < 0.5
    assert quality.judge_texture(torch.full((1, 3, 128, 128), -1.0), 4) == [None]
    m = world.coverage(scenes, 4, scale=4) > 0
    assert quality.psnr(high, high, m) > 100 and quality.ssim(high, high) == pytest.approx(1.0)


def test_espcn_starts_as_bicubic_and_round_trips_its_folder(tmp_path):
    image = world.render(world.sample_scenes(2, 1), 1)
    sr = LightSR(ESPCN(2))
    assert torch.allclose(sr.upscale(image), Bicubic(2).upscale(image), atol=1e-6)
    back = LightSR.from_pretrained(sr.save_pretrained(str(tmp_path / "light")))
    assert back.scale == 2 and torch.equal(back.upscale(image), sr.upscale(image))
    with pytest.raises(FileNotFoundError, match="lightweight SR folder"):
        LightSR.from_pretrained(str(tmp_path))


def test_vae_rescale_keeps_the_autoencoder():
    vae = train_sr.build_vae(2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        mean = vae.encode(x).latent_dist.mean
        train_sr.rescale_vae(vae, 7.0)
        assert torch.allclose(vae.encode(x).latent_dist.mean, 7 * mean, atol=1e-5)
        assert torch.allclose(vae.decode(vae.encode(x).latent_dist.mean).sample, before, atol=1e-5)


# -- the split run ------------------------------------------------------------------------------------------

def test_hybrid_here_is_its_parts(upscaler):
    scene, image = scene_image()
    prompt = world.caption(scene, detail=True)
    sr = HybridSR(upscaler, Bicubic(4), steps=STEPS, overlap=0)
    result = sr.upscale(image, prompt, seed=5)
    assert result.image.shape == (3, 128, 128)
    assert result.cloud_patches and result.edge_patches
    assert sorted(result.cloud_patches + result.edge_patches) == list(range(16))
    whole = Bicubic(4).upscale(image[None])[0]
    for i in result.edge_patches:  # no overlap: each tile is its model's output as it is
        y, x = result.grid[i]
        assert torch.equal(result.image[:, 4 * y:4 * y + 32, 4 * x:4 * x + 32], whole[:, 4 * y:4 * y + 32, 4 * x:4 * x + 32])
    for i in result.cloud_patches[:2]:  # ... and the upscaler's own single-process run, batched in the engine
        y, x = result.grid[i]
        latent = upscaler.upscale(image[None, :, y:y + 8, x:x + 8], prompt, seed=5 + i, steps=STEPS,
                                  guidance_scale=1.0, generator_device="cpu")
        tile = upscaler.decode(latent, output_type="pt")[0] * 2 - 1
        assert torch.allclose(result.image[:, 4 * y:4 * y + 32, 4 * x:4 * x + 32], tile, atol=1e-4)
    assert torch.equal(sr.upscale(image, prompt, seed=5).image, result.image)  # the same seed, the same image
    assert len(sr.upscale(image, prompt, mode="diffusion").cloud_patches) == 16
    assert sr.upscale(image, prompt, mode="light").cloud_patches == []


def test_the_engine_checks_a_runs_image_against_its_model(upscaler):
    spec = SessionSpec.for_model(upscaler, "a red plain circle at the top left", plan="cloud-only", steps=STEPS)
    for image, match in ((None, "a low-resolution image"), (torch.full((1, 3, 8, 8), 2.0), r"\[-1, 1\]")):
        events = []
        engine = CloudEngine(upscaler)
        engine.submit(wire.Run(session=spec, segments=(0, 1), image=image), emit=events.append)
        while engine.turn():
            pass
        assert isinstance(events[-1], wire.Error) and events[-1].code == "refused"
        assert re.search(match, events[-1].message), events[-1].message
    sd = load_model(str(EDGE_PATH))
    events = []
    engine = CloudEngine(sd)
    engine.submit(wire.Run(session=SessionSpec.for_model(sd, "a red circle at the top left", plan="cloud-only", steps=2),
                           segments=(0, 1), image=torch.zeros(1, 3, 8, 8)), emit=events.append)
    while engine.turn():
        pass
    assert events[-1].code == "refused" and "not an upscaler" in events[-1].message


def test_a_runs_image_crosses_the_wire_and_is_checked():
    spec = SessionSpec.for_model(load_model(str(EDGE_PATH)), "a red circle at the top left", plan="cloud-only", steps=2)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    run = wire.Run(session=spec, segments=(0, 1), codecs=wire.Codecs(latent=("fp32", 0)), image=image)
    back = wire.parse_request(run.to_frames())
    assert torch.equal(back.image, image) and back.latent is None
    bad = wire.Run(session=spec, segments=(0, 1), codecs=wire.Codecs(latent=("fp32", 0)), image=torch.zeros(3, 8, 8))
    with pytest.raises(wire.FieldError, match="tensors.image"):
        wire.parse_request(bad.to_frames())


@pytest.fixture(scope="module")
def cloud(folder, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/sr.sock"
    proc = daemons.start("cloud", "--model", folder, "--bind", bind, "--max-batch", "16")
    yield bind
    assert daemons.stop(proc) == 0


def test_hybrid_across_two_processes_equals_the_run_here(upscaler, cloud):
    scene, image = scene_image(8)
    prompt = world.caption(scene, detail=True)
    options = {"codecs": wire.Codecs(latent=("fp32", 0)), "timeout_s": 60}
    remote = HybridSR(upscaler, Bicubic(4), cloud=cloud, steps=STEPS, client_options=options)
    here = HybridSR(upscaler, Bicubic(4), steps=STEPS)
    a, b = remote.upscale(image, prompt, seed=1), here.upscale(image, prompt, seed=1)
    assert a.cloud_patches == b.cloud_patches and a.cloud_patches
    assert a.bytes_up > 0 and a.bytes_down > 0 and b.bytes_up == 0
    assert a.cloud_calls == b.cloud_calls == STEPS * len(a.cloud_patches)
    # the daemon batches the patches that arrive together, here all are batched: equal within batching rounding
    assert torch.allclose(a.image, b.image, atol=1e-4)


def test_latentwire_upscale_writes_the_image_and_reports(folder, cloud, tmp_path, capsys):
    scene, image = scene_image(2)
    src, out = tmp_path / "low.png", tmp_path / "high.png"
    cli._write_image(image, str(src))
    args = ["upscale", "--in", str(src), "--out", str(out), "--scale", "4", "--model", folder, "--light", "bicubic",
            "--steps", str(STEPS), "--prompt", world.caption(scene, detail=True), "--json"]
    for extra in ([], ["--connect", cloud]):
        capsys.readouterr()
        assert cli.main(args + extra) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["size"] == [128, 128] and report["patches_cloud"] + report["patches_edge"] == 25
        assert set(report["seconds"]) == {"regions", "edge_sr", "cloud_sr", "decode", "stitch", "total"}
        assert (report["bytes_up"] > 0) == bool(extra)
        assert cli._read_image(str(out)).shape == (3, 128, 128)
    with pytest.raises(SystemExit, match="upscaler upscales x4, not x2"):
        cli.main(args[:6] + ["2"] + args[7:])
    with pytest.raises(SystemExit, match="patch must be in"):
        cli.main(args + ["--patch", "64"])
    with pytest.raises(SystemExit, match="overlap must be < patch"):
        cli.main(args + ["--overlap", "8"])
    with pytest.raises(SystemExit, match="--sr-codec 'nope'"):
        cli.main(args + ["--sr-codec", "nope"])
    with pytest.raises(SystemExit, match="--light"):
        cli.main(args + ["--light", str(tmp_path)])  # a folder with no config.json
    with pytest.raises(SystemExit, match="cannot read --in"):
        cli.main(["upscale", "--in", str(tmp_path / "none.png"), "--out", str(out), "--scale", "4"])


def test_latentwire_edge_upscale_generates_then_upscales(folder, cloud, tmp_path, capsys):
    out = tmp_path / "gen.png"
    args = ["edge", "--plan", "edge-only", "--steps", "3", "--prompt", "a red circle at the top left",
            "--sr-prompt", "a red striped circle at the top left", "--upscale", "4", "--sr-model", folder,
            "--sr-light", "bicubic", "--sr-steps", str(STEPS), "--sr-connect", cloud, "--out", str(out), "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    up = report["upscale"]
    assert up["size"] == [128, 128] and up["scale"] == 4 and up["cloud"] == cloud
    assert up["patches_cloud"] >= 1 and up["bytes_up"] > 0 and report["edge_model_calls"] == 3
    assert cli._read_image(str(out)).shape == (3, 128, 128)
    with pytest.raises(SystemExit, match="--overlap in"):  # checked before the generation starts
        cli.main(args + ["--overlap", "8"])
    with pytest.raises(SystemExit, match="guidance must be in"):
        cli.main(args + ["--sr-guidance", "-1"])


def test_a_real_esrgan_class_file_serves_as_the_lightweight_model(folder, tmp_path, capsys):
    from latentwire.pipelines.hybrid_sr.plugins import SRVGGNetCompact

    torch.manual_seed(0)
    net = SRVGGNetCompact(scale=4, num_feat=8, num_conv=2)
    torch.save({"params": net.state_dict()}, tmp_path / "compact-x4.pth")
    scene, image = scene_image(4)
    src, out = tmp_path / "low.png", tmp_path / "high.png"
    cli._write_image(image, str(src))
    assert cli.main(["upscale", "--in", str(src), "--out", str(out), "--scale", "4", "--model", folder, "--light",
                     str(tmp_path / "compact-x4.pth"), "--mode", "light", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patches_edge"] == 25
    with torch.no_grad():
        expected = net(((cli._read_image(str(src)) + 1) / 2)[None]).clamp(0, 1)[0] * 2 - 1
    assert (cli._read_image(str(out)) - expected).abs().max() <= 2 / 255 + 1e-6  # 8-bit files, both ways


def test_predicted_sr_cost_is_its_parts_and_grows_with_the_foreground():
    from latentwire.pipelines.hybrid_sr.cost import Layout, predict_sr
    from latentwire.scheduler.cost.profiles import assume, load_device, load_link

    upscaler = assume(load_device("sd-x4-upscaler@a100"), "unet_step_s", 0.04)
    light, decoder, link = load_device("quicksrnetsmall@galaxy-s24"), load_device("sd-v1-5@galaxy-s24"), load_link("lte")
    costs = [predict_sr(Layout(128, 32, 4, n, 25 - n), upscaler, light, decoder, link, steps=20) for n in (0, 4, 8, 25)]
    assert costs[0].cloud_gpu_s == 0 and costs[0].bytes_up == 0 and costs[0].latency_s == pytest.approx(0.000441)
    for c in costs:
        assert sum(c.parts.values()) == pytest.approx(c.latency_s)
    assert [c.latency_s for c in costs] == sorted(c.latency_s for c in costs)
    assert costs[2].requests == 8 and costs[2].bytes_up == 2 * costs[1].bytes_up
    # 8 patch latents of 32^2 cells: 8 / 16 of one 128^2 step, 20 steps (no batching gain assumed)
    assert costs[2].cloud_gpu_s == pytest.approx(20 * 8 * 0.04 / 16)
    with pytest.raises(Exception, match="unet_step_s"):  # the profile has no figure: refused, not guessed
        predict_sr(Layout(128, 32, 4, 1, 24), load_device("sd-x4-upscaler@a100"), light, decoder, link)


def test_the_adaptive_choice_takes_the_best_quality_within_the_budget(tmp_path):
    from latentwire.pipelines.hybrid_sr.adaptive import choose, load_quality

    quality_ = {(5, 2): 0.3, (10, 2): 0.5, (20, 2): 0.6, (5, 4): 0.4, (10, 4): 0.7, (20, 4): 0.8}
    latency = lambda n, s: 0.1 * n + (0.5 if s == 4 else 0.2)  # noqa: E731
    assert choose(2, 10.0, quality_, latency).pick == (20, 4)  # everything fits: the best
    assert choose(2, 1.6, quality_, latency).pick == (10, 4)
    assert choose(4, 1.2, quality_, latency).pick == (5, 4)  # x4 wanted: x2 is not a candidate
    late = choose(4, 0.5, quality_, latency)
    assert not late.within_budget and late.pick == (5, 4)  # nothing fits: the fastest, said so
    shipped = load_quality()  # the measured one (bench/hybrid_sr_table.py --quality)
    assert {s for _, s in shipped} == {2, 4} and all(0 <= q <= 1 for q in shipped.values())
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"rows": [{"steps": 5, "scale": 2, "quality": 0.3}]}))
    assert load_quality(str(path)) == {(5, 2): 0.3}
    path.write_text(json.dumps({"rows": [{"steps": 5, "scale": 2, "quality": 1.3}]}))
    with pytest.raises(ValueError, match="rows.0"):
        load_quality(str(path))


@pytest.mark.parametrize("scale", [2, 4])
def test_the_committed_models_draw_the_texture_the_caption_names(scale):
    from latentwire.pipelines import hybrid_sr

    scenes = [world.Scene("red", "square", "top left", t) for t in world.TEXTURES] + \
             [world.Scene("blue", "circle", "bottom right", t) for t in world.TEXTURES]
    low = world.render(scenes, 3)
    upscaler = load_model(str(hybrid_sr.upscaler_path(scale)))
    light = LightSR.from_pretrained(str(hybrid_sr.light_path(scale)))
    sr = HybridSR(upscaler, light, steps=10)
    outs = torch.stack([sr.upscale(im, world.caption(s, detail=True), seed=k).image for k, (im, s) in
                        enumerate(zip(low, scenes))])
    assert quality.texture_accuracy(outs, scenes, scale) >= 5 / 6
    assert quality.texture_accuracy(torch.stack([sr.upscale(im, "", mode="light").image for im in low]),
                                    scenes, scale) <= 3 / 6  # the image alone cannot say
