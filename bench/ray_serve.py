"""The cloud on Ray Serve against the worker pool: throughput and p99 of `latentwire cloud --ray` with 1
and 2 replicas against `latentwire cloud --workers 2`, and the time a new replica takes to take load.

    .venv/bin/python bench/ray_serve.py [--sessions 16 64] [--steps 20] [--max-batch 8] [--skip-scale]

Every cloud is a real process on ipc:// serving the tiny cloud model with --max-batch N and one torch
thread per worker or replica; the rounds are bench/load.py's (S edge sessions started at once, cloud-only,
each its own EdgeClient and connection). Ray runs as one local instance started here (its replicas take
0.5 CPU each, so two fit the two-core machine this was measured on).

Take-up: a gateway with --replicas 1 --max-replicas 2 --target-sessions 2 under a steady load of 16 sessions
at a time; reported are the seconds from the load's start to Serve's second replica RUNNING, and to the
first session it finished. Serve's autoscaler waits its upscale_delay_s (its default) before it decides.
"""
import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemons  # noqa: E402
from load import pct, round_of, specs  # noqa: E402

# Ray on loopback only (tests/conftest.py says why); read when ray is imported, inherited by the gateways
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray  # noqa: E402
from ray import serve  # noqa: E402

from latentwire.pipelines.models.sd import StableDiffusionModel  # noqa: E402
from latentwire.pipelines.models.tiny import save_tiny_pair  # noqa: E402
from latentwire.scheduler.serving.edge import EdgeClient  # noqa: E402
from latentwire.scheduler.serving.rayserve import gateway  # noqa: E402

TAKE_UP_S = 180  # the longest the take-up run waits for the second replica's first session


def take_up(bind, edge, steps, app):
    """Keep 16 sessions in flight until a session finishes on a second replica -> (s to 2 RUNNING, s to its
    first session), both from the load's start."""
    running_at, first_new = [None], [None]
    stop = threading.Event()

    def edge_loop():
        while not stop.is_set():
            client = EdgeClient(bind, edge, timeout_s=600, heartbeat_timeout_s=60)
            client.generate(specs(edge, 1, steps)[0])
            if client.worker not in seen and first_new[0] is None:  # a replica that was not there at the start
                first_new[0] = time.monotonic() - start
                stop.set()

    first = EdgeClient(bind, edge, timeout_s=600)
    first.generate(specs(edge, 1, steps)[0])
    seen, start = {first.worker}, time.monotonic()
    threads = [threading.Thread(target=edge_loop, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    while not stop.wait(0.25):
        if running_at[0] is None and gateway.replicas_running(app) >= 2:
            running_at[0] = time.monotonic() - start
        if time.monotonic() - start > TAKE_UP_S:
            stop.set()
    for t in threads:
        t.join(timeout=120)
    return running_at[0], first_new[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--skip-scale", action="store_true", help="leave out the take-up run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="latentwire-ray-bench-"))
    cloud_path, edge_path = save_tiny_pair(root, seed=0)
    edge = StableDiffusionModel.from_pretrained(str(edge_path))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    common = ["--model", str(cloud_path), "--threads", "1", "--max-batch", str(args.max_batch),
              "--max-sessions-per-client", "1024"]
    configs = [("--workers 2", ["--workers", "2"]),
               ("--ray, 1 replica", ["--ray", address, "--ray-app", "one", "--replicas", "1", "--replica-cpus", "0.5"]),
               ("--ray, 2 replicas", ["--ray", address, "--ray-app", "two", "--replicas", "2", "--replica-cpus", "0.5"])]
    print(f"# tiny cloud model, cloud-only, {args.steps} steps, max-batch {args.max_batch}, 1 thread per worker or "
          f"replica; {platform.processor() or platform.machine()}, {torch.get_num_threads()} bench thread")
    print("| sessions | cloud | completed | wall s | sessions/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    try:
        for name, extra in configs:
            bind = f"ipc://{root}/{len(rows)}.sock"
            proc = daemons.start("cloud", "--bind", bind, *common, *extra, same_threads=False)
            try:
                round_of(bind, edge, specs(edge, 4, args.steps))  # warm-up: lazy initialisation, both replicas
                for n in args.sessions:
                    latencies, wall = round_of(bind, edge, specs(edge, n, args.steps))
                    rows[name, n] = len(latencies) / wall
                    print(f"| {n} | {name} | {len(latencies)}/{n} | {wall:.2f} | {rows[name, n]:.2f} | "
                          f"{pct(latencies, 50):.2f} | {pct(latencies, 99):.2f} |", flush=True)
            finally:
                daemons.stop(proc)
                if "--ray" in extra:
                    serve.delete(extra[extra.index("--ray-app") + 1])
        for n in args.sessions:
            print(f"{n} sessions: 2 replicas / 1 replica {rows['--ray, 2 replicas', n] / rows['--ray, 1 replica', n]:.2f}x; "
                  f"2 replicas / --workers 2 {rows['--ray, 2 replicas', n] / rows['--workers 2', n]:.2f}x")
        if not args.skip_scale:
            bind = f"ipc://{root}/scale.sock"
            proc = daemons.start("cloud", "--bind", bind, *common, "--ray", address, "--ray-app", "scale",
                                 "--replicas", "1", "--max-replicas", "2", "--target-sessions", "2",
                                 "--replica-cpus", "0.5", same_threads=False)
            try:
                running, served = take_up(bind, edge, args.steps, "scale")
                print(f"take-up: second replica RUNNING {running if running is None else round(running, 1)} s and "
                      f"its first session finished {served if served is None else round(served, 1)} s after the "
                      f"load began (Serve's default upscale_delay_s included)")
            finally:
                daemons.stop(proc)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
