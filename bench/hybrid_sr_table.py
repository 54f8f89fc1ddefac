"""Region-aware hybrid SR reproduced on the world: hybrid against all-diffusion SR, all-lightweight SR,
bicubic, and generating at the high resolution in the cloud, as the README's table.

    .venv/bin/python bench/hybrid_sr_table.py --scale 4 [--n 128] [--seed 9] [--links lte,wifi] [--quality]

Images: world.sample_scenes(n, seed, textures=True), held out (the SR models trained on seeds >= 4 000 000).
Two inputs per scene:
- exact: the world's 32-px render, so every output has its exact high-resolution render and mask: PSNR and
  SSIM on the foreground (the exact mask) and the background apart, and the seam error (patch borders
  against interiors, on the foreground);
- generated: the edge's own 20-step generation of the scene's caption (world-sd-edge, guidance 3, DDIM),
  the hybrid system end to end; no exact render exists for it, so only the judges score it.
Detail recovered: the texture judge (quality.py) at the high resolution; attributes: the world's judge on
the output pooled to 32 px; Fréchet distance: judge features of the pooled output against the exact
high-resolution renders pooled the same way (a texture darkens a shape's mean, so the 32-px renders, which
draw it plain, are not the reference; the features see the low resolution only: texture is the texture
judge's).

Methods (HybridSR.upscale, everything in this process: the engine batches the diffusion patches):
  hybrid         foreground patches (regions.foreground) to the diffusion upscaler, the rest to ESPCN
  diffusion      the whole image to the upscaler in one piece (patch = the image: no overlap overhead; the
                 upscaler was trained on 8x8 patches, so a 32x32 latent is outside what it saw)
  diffusion-patches   every patch to the upscaler (hybrid's patches, none to the lightweight model)
  light          ESPCN over the whole image
  bicubic        the floor

Latency, predicted with published device profiles at the real resolution the world stands for (each
mapping an assumption, all printed): the world's 32 px is a 128-px image, the SD x4 upscaler's native
input (512 px out at x4); the upscaler is sd-x4-upscaler@a100 with its step ASSUMED from the one public
end-to-end figure (tomesd#21, 3.333 s at 128 px in) over the pipeline's default 75 steps; the lightweight
model is quicksrnetsmall@galaxy-s24 (ESPCN-class, cited); the edge decodes the upscaler's patch latents at
sd-v1-5@galaxy-s24's VAE decoder cost per latent cell (ASSUMED); the edge generates the 128-px image with
bk-sdm-tiny@galaxy-s24 (estimated) at 1/16 of its 512-px step (by latent cells, ASSUMED). Generating at
the high resolution in the cloud is SD v1.5 at 512 on sd-v1-5@a100, cloud-only, its latent decoded on the
phone: predicted only, since the world has no 128-px generator to measure its quality.

--quality also writes pipelines/hybrid_sr/quality.json: the adaptive chooser's quality model (all
attributes and texture right, by edge steps and scale), from generated inputs.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from latentwire.pipelines import embedded, evaluate, hybrid_sr, judge, world
from latentwire.pipelines.hybrid_sr import quality, regions
from latentwire.pipelines.hybrid_sr.adaptive import QUALITY_PATH, choose
from latentwire.pipelines.hybrid_sr.cost import Layout, predict_sr
from latentwire.pipelines.hybrid_sr.light import Bicubic, LightSR
from latentwire.pipelines.hybrid_sr.pipeline import HybridSR
from latentwire.pipelines.models import load_model
from latentwire.scheduler import make
from latentwire.scheduler.cost.model import predict
from latentwire.scheduler.cost.profiles import assume, load_device, load_link

REAL_PX = 128          # what the world's 32 px stands for
WORLD_TO_REAL = REAL_PX // world.IMAGE_SIZE
UPSCALER, LIGHT, DECODER = "sd-x4-upscaler@a100", "quicksrnetsmall@galaxy-s24", "sd-v1-5@galaxy-s24"
EDGE_GEN, CLOUD_GEN = "bk-sdm-tiny@galaxy-s24", "sd-v1-5@a100"
UPSCALER_STEP_S = 3.333 / 75  # tomesd#21's end-to-end at 128 px in, over the pipeline's default 75 steps
GEN_STEPS, GUIDANCE = 20, evaluate.EVAL_GUIDANCE
METHODS = ("hybrid", "diffusion", "diffusion-patches", "light", "bicubic")


def profiles():
    upscaler = assume(load_device(UPSCALER), "unet_step_s", UPSCALER_STEP_S)
    decoder = load_device(DECODER)
    edge = load_device(EDGE_GEN)
    # the edge's 128-px generation: 1/16 of the 512-px step by latent cells (16^2 of 64^2)
    edge_small = assume(edge, "unet_step_s", edge.unet_step_s / 16)
    edge_small = assume(edge_small, "vae_decode_s", edge.vae_decode_s / 16)
    cloud = assume(load_device(CLOUD_GEN), "text_encode_s", 0.0)
    return {"upscaler": upscaler, "light": load_device(LIGHT), "decoder": decoder, "edge_small": edge_small,
            "edge": edge, "cloud": cloud}


def generate(scenes, seed, steps):
    """The edge's generations of the scenes' captions: (N, 3, 32, 32) in [-1, 1]."""
    model = load_model(str(embedded.EDGE_PATH))
    return embedded.sample(model, scenes, steps=steps, guidance=GUIDANCE, seed=seed)


def run_method(method, srs, image, prompt, seed):
    """(output, cloud patches, edge patches, seconds here) of one image under ``method``."""
    if method == "bicubic":
        t0 = time.perf_counter()
        out = Bicubic(srs["hybrid"].scale).upscale(image[None])[0]
        return out, 0, 0, time.perf_counter() - t0
    sr = srs["whole"] if method == "diffusion" else srs["hybrid"]
    r = sr.upscale(image, prompt, seed=seed, mode="diffusion" if method == "diffusion-patches" else method)
    return r.image, len(r.cloud_patches), len(r.edge_patches), r.seconds["total"]


MODELS = {"dir": None}  # --models: another folder holding world-sr-xS and world-light-xS


def models(scale):
    if MODELS["dir"]:
        return (load_model(f"{MODELS['dir']}/world-sr-x{scale}"),
                LightSR.from_pretrained(f"{MODELS['dir']}/world-light-x{scale}"))
    return load_model(str(hybrid_sr.upscaler_path(scale))), LightSR.from_pretrained(str(hybrid_sr.light_path(scale)))


def measure(scale, images, scenes, seed, steps, exact=True, methods=METHODS):
    """{method: scores} of every method on ``images`` (N, 3, 32, 32)."""
    upscaler, light = models(scale)
    srs = {"hybrid": HybridSR(upscaler, light, steps=steps),
           "whole": HybridSR(upscaler, light, steps=steps, patch=world.IMAGE_SIZE, overlap=0)}  # one tile
    truth = world.render(scenes, seed, scale=scale)
    mask = world.coverage(scenes, seed, scale=scale) > 0
    out = {}
    for method in methods:
        outs, cloud, edge, wall = [], [], [], []
        for k, (image, scene) in enumerate(zip(images, scenes)):
            o, c, e, w = run_method(method, srs, image, world.caption(scene, detail=True), seed * 1000 + k)
            outs.append(o)
            cloud.append(c)
            edge.append(e)
            wall.append(w)
        outs = torch.stack(outs).clamp(-1, 1)
        pooled = F.avg_pool2d(outs, scale)
        attrs = judge.attribute_scores(pooled, scenes)
        row = {"texture": quality.texture_accuracy(outs, scenes, scale), "all_attributes": attrs["all"],
               "frechet": judge.frechet_distance(pooled, F.avg_pool2d(truth, scale)),
               "cloud_patches": statistics.mean(cloud), "edge_patches": statistics.mean(edge),
               "wall_s_here": statistics.median(wall)}
        if exact:
            row.update(psnr_fg=quality.psnr(outs, truth, mask), psnr_bg=quality.psnr(outs, truth, ~mask),
                       ssim_fg=quality.ssim(outs, truth, mask), ssim_bg=quality.ssim(outs, truth, ~mask))
            seams = [regions.seam_error(o, t, hybrid_grid(), 8, scale, within=m)
                     for o, t, m in zip(outs, truth, mask)]
            row["seam_border"] = statistics.mean(s["border"] for s in seams)
            row["seam_interior"] = statistics.mean(s["interior"] for s in seams)
        out[method] = row
        print(f"  {method}: {json.dumps({k: round(v, 4) for k, v in row.items()})}", file=sys.stderr, flush=True)
    return out


def hybrid_grid():
    return regions.patch_grid(world.IMAGE_SIZE, world.IMAGE_SIZE, 8, 2)


def latency(method, cloud_patches, edge_patches, p, link, scale, sr_steps, gen_steps=GEN_STEPS):
    """Predicted seconds and cloud GPU-seconds of one request at the real resolution: the edge's generation,
    then the method's SR; or the cloud generating the high resolution itself."""
    if method == "cloud-generates":
        c = predict(make("cloud-only", gen_steps), p["cloud"], p["edge"], link)
        return c.latency_s, c.cloud_gpu_s, c.bytes_up + c.bytes_down
    gen = predict(make("edge-only", gen_steps), p["cloud"], p["edge_small"], link, latent_shape=(4, 16, 16))
    if method == "bicubic":
        return gen.latency_s, 0.0, 0
    patch = 8 * WORLD_TO_REAL if method != "diffusion" else REAL_PX  # diffusion: one tile, the whole image
    layout = Layout(REAL_PX, patch, scale, round(cloud_patches), round(edge_patches))
    sr = predict_sr(layout, p["upscaler"], p["light"], p["decoder"], link, steps=sr_steps)
    return gen.latency_s + sr.latency_s, sr.cloud_gpu_s, sr.bytes_up + sr.bytes_down


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4, choices=(2, 4))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--sr-steps", type=int, default=20)
    ap.add_argument("--links", default="lte,wifi")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quality", action="store_true", help="also write the adaptive chooser's quality model")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--methods", default=",".join(METHODS), help="which of " + ", ".join(METHODS))
    ap.add_argument("--models", help="a folder with world-sr-xS and world-light-xS (default: the committed ones)")
    a = ap.parse_args(argv)
    MODELS["dir"] = a.models
    torch.set_num_threads(a.threads)
    scenes = world.sample_scenes(a.n, a.seed, textures=True)
    p = profiles()
    links = {name: load_link(name) for name in a.links.split(",")}
    low = world.render(scenes, a.seed)
    masks = regions.mask_scores(torch.stack([regions.foreground(im) for im in low]).repeat_interleave(a.scale, 1)
                                .repeat_interleave(a.scale, 2), world.coverage(scenes, a.seed, scale=a.scale) > 0)
    print(f"foreground rule vs exact masks: {masks}", file=sys.stderr)
    results = {"masks": masks, "scale": a.scale, "n": a.n, "seed": a.seed}
    print("exact inputs", file=sys.stderr)
    methods = tuple(a.methods.split(","))
    results["exact"] = measure(a.scale, low, scenes, a.seed, a.sr_steps, methods=methods)
    print("generated inputs", file=sys.stderr)
    generated = generate(scenes, a.seed, GEN_STEPS)
    results["generated"] = measure(a.scale, generated, scenes, a.seed, a.sr_steps, exact=False, methods=methods)
    rows = {}
    for link_name, link in links.items():
        for method in methods + ("cloud-generates",):
            r = results["generated"].get(method, {"cloud_patches": 0, "edge_patches": 0})
            rows[(method, link_name)] = latency(method, r["cloud_patches"], r["edge_patches"], p, link, a.scale,
                                                a.sr_steps)
    results["latency"] = {f"{m}/{l}": {"latency_s": v[0], "cloud_gpu_s": v[1], "bytes": v[2]}
                          for (m, l), v in rows.items()}
    print_table(results, rows, links, methods)
    if a.quality:
        write_quality(a, scenes, p, links)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


def print_table(results, rows, links, methods):
    ex, gen = results["exact"], results["generated"]
    names = list(links)
    print(f"| method | PSNR fg / bg dB | SSIM fg / bg | texture (exact / generated) | all attributes (generated) | "
          f"Fréchet (generated) | patches cloud / edge | cloud GPU s | predicted latency "
          f"{' / '.join(names)} s | vs diffusion {' / '.join(names)} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    reference = "diffusion" if "diffusion" in methods else methods[0]
    for m in methods + ("cloud-generates",):
        e, g = ex.get(m), gen.get(m)
        lat = [rows[(m, n)][0] for n in names]
        ref = [rows[(reference, n)][0] for n in names]
        cells = ["-"] * 6 if e is None else [
            f"{e['psnr_fg']:.2f} / {e['psnr_bg']:.2f}", f"{e['ssim_fg']:.3f} / {e['ssim_bg']:.3f}",
            f"{e['texture']:.3f} / {g['texture']:.3f}", f"{g['all_attributes']:.3f}", f"{g['frechet']:.1f}",
            f"{g['cloud_patches']:.1f} / {g['edge_patches']:.1f}"]
        print(f"| {m} | " + " | ".join(cells) + f" | {rows[(m, names[0])][1]:.3f} | "
              + " / ".join(f"{v:.3f}" for v in lat) + " | "
              + " / ".join(f"{100 * (v / r - 1):+.1f}%" for v, r in zip(lat, ref)) + " |")


def write_quality(a, scenes, p, links):
    """The chooser's quality model: all attributes and texture right, generated at N steps, upscaled x S."""
    rows = []
    for steps in (5, 10, 20):
        generated = generate(scenes, a.seed, steps)
        for scale in (2, 4):
            sr = HybridSR(*models(scale), steps=a.sr_steps)
            outs = torch.stack([sr.upscale(im, world.caption(sc, detail=True), seed=k).image
                                for k, (im, sc) in enumerate(zip(generated, scenes))]).clamp(-1, 1)
            textures = quality.judge_texture(outs, scale)
            right = (judge.predict(F.avg_pool2d(outs, scale)) == torch.tensor([sc.labels() for sc in scenes])).all(1)
            q = sum(bool(r) and t == sc.texture for r, t, sc in zip(right, textures, scenes)) / len(scenes)
            rows.append({"steps": steps, "scale": scale, "quality": round(q, 4)})
            print(f"  quality steps {steps} scale {scale}: {q:.3f}", file=sys.stderr, flush=True)
    with open(QUALITY_PATH, "w") as f:
        json.dump({"command": "python bench/hybrid_sr_table.py " + " ".join(sys.argv[1:]),
                   "n": a.n, "seed": a.seed, "rows": rows}, f, indent=1)
    link = links[next(iter(links))]
    for budget in (1.0, 2.0, 4.0):
        choice = choose(4, budget, {(r["steps"], r["scale"]): r["quality"] for r in rows},
                        lambda n, s: latency("hybrid", 8, 17, p, link, s, a.sr_steps, gen_steps=n)[0])
        print(f"  budget {budget} s: {choice}", file=sys.stderr)


if __name__ == "__main__":
    main()
