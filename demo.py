"""`latentwire demo` (what `make demo` runs): the trade-off the papers exploit, across real processes.

Starts `latentwire cloud` on loopback with the embedded cloud model (or the world's exact denoiser,
cloud="ideal"), runs edge sessions with the embedded edge model for a handful of world prompts under
cloud-only, edge-only, hybrid-sd, ec-diff and preview-refine, and writes into ``out``:

    grid.png    rows: prompts; columns: plans (each image 32x32, shown 4x)
    report.md   per plan: wall time, cloud and edge model calls, bytes on the wire, attribute accuracy

then stops the cloud. Every number comes from this run.
"""
import tempfile
import time
from pathlib import Path

import torch

PLANS = [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {}), ("ec-diff", {"p": 3, "k": 1}),
         ("preview-refine", {"strength": 0.5})]
PROMPTS = 6
STEPS = 20
SCALE = 4  # pixels per world pixel in the grid
STOP_TIMEOUT_S = 10  # after SIGTERM the cloud finishes what it holds (nothing: the demo is done), else it is killed
LABEL_H = 14  # pixels of the grid's header row
SCENE_STRIDE = 7


def start_cloud(bind, cloud, log_path):
    """`latentwire cloud` in its own process, its stderr in ``log_path``, ready when it says so -> its Child.
    A cloud that dies first raises ChildFailed at once, with the end of its log."""
    from latentwire.scheduler.serving.process import Child, cli_command

    args = ["cloud", "--bind", bind, "--threads", "1"] + (["--model", "ideal"] if cloud == "ideal" else [])
    return Child(cli_command(*args), log=log_path, name="the demo's cloud").wait_ready("serving")


def grid(rows, plan_names):
    """rows: per prompt, a list of (3, 32, 32) images in [-1, 1], one per plan -> a PIL image."""
    from PIL import Image, ImageDraw

    size, pad = 32 * SCALE, 4
    width = len(plan_names) * (size + pad) + pad
    canvas = Image.new("RGB", (width, LABEL_H + len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(plan_names):
        draw.text((pad + c * (size + pad), 1), name, fill="black")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (pad + c * (size + pad), LABEL_H + pad + r * (size + pad)))
    return canvas


def run(out="demo-out", cloud="trained", prompts=PROMPTS, steps=STEPS, log=print):
    """The demo; -> the rows of report.md as dicts."""
    from latentwire.pipelines import evaluate, world
    from latentwire.pipelines.embedded import EDGE_PATH
    from latentwire.pipelines.models.sd import StableDiffusionModel
    from latentwire.scheduler import make
    from latentwire.scheduler.serving.edge import EdgeClient

    torch.set_num_threads(1)  # the cloud has the other core
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latentwire-demo-") as tmp:
        bind = f"ipc://{tmp}/cloud.sock"
        log(f"starting the cloud ({'exact denoiser' if cloud == 'ideal' else 'world-sd-cloud'}) on {bind} ...")
        proc = start_cloud(bind, cloud, Path(tmp) / "cloud.log")
        log(f"cloud ready (pid {proc.pid})")
        try:
            edge = StableDiffusionModel.from_pretrained(EDGE_PATH)
            scheduler = edge.make_scheduler()  # the folders share it
            every = world.all_scenes()  # a stride coprime with their count walks across colours, shapes, places
            scenes = [every[(SCENE_STRIDE * k) % len(every)] for k in range(prompts)]
            images = {name: [] for name, _ in PLANS}
            rows = []
            for name, params in PLANS:
                plan = make(name, steps, **params)
                client = EdgeClient(bind, edge, timeout_s=120)
                calls = {"cloud": 0, "edge": 0}
                start = time.perf_counter()
                for k, scene in enumerate(scenes):
                    latent, summary = client.generate(evaluate.session(scheduler, plan, scene, k))
                    images[name].append(evaluate.to_pixels(edge, latent)[0])
                    calls["cloud"] += summary.cloud_model_calls
                    calls["edge"] += summary.edge_model_calls
                wall = time.perf_counter() - start
                scores = evaluate.score(torch.stack(images[name]), scenes)
                rows.append({"plan": name, "wall_s": wall, "cloud_calls": calls["cloud"], "edge_calls": calls["edge"],
                             "bytes": client.bytes_up + client.bytes_down, **scores})
                log(f"  {name:<15} {wall:6.2f} s  cloud calls {calls['cloud']:>4}  edge calls {calls['edge']:>4}  "
                    f"{client.bytes_up + client.bytes_down:>7} B on the wire  attribute accuracy "
                    f"{scores['attribute_accuracy']:.3f}")
        finally:
            proc.stop(STOP_TIMEOUT_S)
    names = [name for name, _ in PLANS]
    grid([[images[n][k] for n in names] for k in range(prompts)], names).save(out / "grid.png")
    (out / "report.md").write_text(report(rows, scenes, steps, cloud, time.perf_counter() - started))
    log(f"wrote {out / 'grid.png'} and {out / 'report.md'} in {time.perf_counter() - started:.0f} s")
    return rows


def report(rows, scenes, steps, cloud, total_s):
    from latentwire.pipelines import world

    lines = ["# latentwire demo\n",
             f"Cloud model: {'the exact denoiser' if cloud == 'ideal' else 'world-sd-cloud'}; edge model: "
             f"world-sd-edge; {steps} DDIM steps; {len(scenes)} prompts; the cloud a separate process on "
             f"loopback; {total_s:.0f} s in all.\n",
             "Rows of grid.png, top to bottom: " + "; ".join(f"\"{world.caption(s)}\"" for s in scenes) + ".\n",
             "| plan | wall s | cloud model calls | edge model calls | bytes on wire | attribute accuracy | all attributes right |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['wall_s']:.2f} | {r['cloud_calls']} | {r['edge_calls']} | {r['bytes']} | "
                     f"{r['attribute_accuracy']:.3f} | {r['all_attributes']:.3f} |")
    lines.append("\nAttribute accuracy: the share of prompted attributes (colour, shape, position) the judge "
                 "(pipelines/judge.py) reads in the images. With this few prompts it is coarse: "
                 "`latentwire eval --plan NAME --n 256` measures it properly.\n")
    return "\n".join(lines)
