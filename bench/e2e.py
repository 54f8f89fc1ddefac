"""End to end: each plan on the tiny test models, with `latentwire cloud` as a real process on loopback.

    .venv/bin/python bench/e2e.py [--steps 20] [--repeats 3]

Prints, per plan: wall time (median of repeats, edge side, after a warm-up), bytes up and down, model
calls on each side, forecast steps, model calls saved against cloud-only, and how far the final
latent lands from cloud-only's (relative L2). Then the cost of restarting DPM-Solver++ at a handoff
instead of carrying its state. The tiny models are ~1M-parameter UNets on 4x8x8 latents: the
timings show the overheads of the split, not the compute ratio of real models.
"""
import argparse
import platform
import statistics
import tempfile
import time

import torch

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.serving.process import Child, cli_command

PLANS = [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {}), ("ec-diff", {"p": 3, "k": 1}),
         ("preview-refine", {"strength": 0.5})]
PROMPT = "a red circle on a blue square"


def start_cloud(model, bind, log_path):
    return Child(cli_command("cloud", "--bind", bind, "--model", model, "--threads", torch.get_num_threads()),
                 log=log_path, name="the cloud").wait_ready("serving")


def spec_for(model, plan, scheduler, **kw):
    s = model.make_scheduler(scheduler)
    return SessionSpec(prompt=PROMPT, plan=plan, scheduler=type(s).__name__, scheduler_config=dict(s.config),
                       guidance_scale=6.0, seed=1, **kw)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cloud_path, edge_path = save_tiny_pair(tmp, seed=0)
        edge = StableDiffusionModel.from_pretrained(edge_path)
        proc = start_cloud(str(cloud_path), f"ipc://{tmp}/cloud.sock", f"{tmp}/cloud.log")
        try:
            client = lambda: EdgeClient(f"ipc://{tmp}/cloud.sock", edge, timeout_s=120)  # noqa: E731
            print(f"# End to end on the tiny test models\n\nCommand: `python bench/e2e.py --steps {args.steps} "
                  f"--repeats {args.repeats}`; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads; DPM-Solver++(2M), {args.steps} steps, guidance 6, default codecs "
                  "(int8 + zstd 3 latents, fp16 state), ipc://.\n")
            print("| plan | wall s | bytes up | bytes down | cloud calls | edge calls | forecast steps | "
                  "cloud calls saved | final vs cloud-only |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            reference = None
            for name, params in PLANS:
                spec = spec_for(edge, make(name, args.steps, **params), "DPMSolverMultistepScheduler")
                client().generate(spec)  # warm-up
                walls = []
                for _ in range(args.repeats):
                    c = client()
                    start = time.perf_counter()
                    latent, summary = c.generate(spec)
                    walls.append(time.perf_counter() - start)
                if name == "cloud-only":
                    reference = latent
                saved = args.steps - summary.cloud_model_calls
                print(f"| {name} {params or ''} | {statistics.median(walls):.3f} | {c.bytes_up} | {c.bytes_down} | "
                      f"{summary.cloud_model_calls} | {summary.edge_model_calls} | {summary.forecast_steps} | "
                      f"{saved} | {rel(latent, reference):.3e} |")
            print("\n## Per emulated link (wall s, median of repeats; latent codec chosen for the link)\n")
            from latentwire.scheduler.serving.link import PROFILES
            print("| plan | " + " | ".join(PROFILES) + " |")
            print("| --- |" + " ---: |" * len(PROFILES))
            for name, params in PLANS:
                if name == "edge-only":
                    continue
                spec = spec_for(edge, make(name, args.steps, **params), "DPMSolverMultistepScheduler")
                cells = []
                for link in PROFILES.values():
                    walls = []
                    for _ in range(args.repeats):
                        c = EdgeClient(f"ipc://{tmp}/cloud.sock", edge, link=link, error_budget=0.01, timeout_s=120)
                        start = time.perf_counter()
                        c.generate(spec)
                        walls.append(time.perf_counter() - start)
                    cells.append(f"{statistics.median(walls):.3f} ({c.codecs.latent[0]} z{c.codecs.latent[1]})")
                print(f"| {name} | " + " | ".join(cells) + " |")
            print("\n## Solver state at a handoff (hybrid-sd, DPM-Solver++(2M), fp32 codecs)\n")
            from latentwire.scheduler.wire import Codecs
            exact = Codecs(latent=("fp32", 0), state=("fp32", 0))
            plan = make("hybrid-sd", args.steps)
            carry_client, restart_client = (EdgeClient(f"ipc://{tmp}/cloud.sock", edge, codecs=exact) for _ in "ab")
            carried, _ = carry_client.generate(spec_for(edge, plan, "DPMSolverMultistepScheduler"))
            restarted, _ = restart_client.generate(spec_for(edge, plan, "DPMSolverMultistepScheduler",
                                                            restart_solver=True))
            print(f"Restarting the solver at first order on the edge, instead of carrying its previous x_0, moves "
                  f"the final latent by {rel(restarted, carried):.3e} (relative L2) and saves "
                  f"{carry_client.bytes_down - restart_client.bytes_down} bytes (fp32 state) on the way down. "
                  "Carrying the state is the default; in fp16, its default codec, it costs 2 bytes a latent value.")
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
