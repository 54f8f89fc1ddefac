"""Load: many concurrent edge sessions against one `latentwire cloud` daemon, with step-level batching
on and off, in one run.

    .venv/bin/python bench/load.py [--sessions 16 64] [--steps 20] [--max-batch 16] [--threads 1]

Two daemons of the tiny cloud model run as real processes on loopback, one with --max-batch 1 (each
request whole, one at a time) and one with --max-batch N; each round starts S edge sessions at once
(threads of this process, each its own EdgeClient and connection; cloud-only plans, with different
prompts, seeds and guidance scales, so the edges only send requests and receive latents) and waits
for all of them. Reported per round: sessions that completed (all must), throughput in sessions per
second, and p50/p99 session latency (request sent -> latent received), then the throughput ratio of
batching on over off. The tiny UNet on 4x8x8 latents is dominated by per-call overhead, which is
what batching amortizes; a large model on a GPU gains by filling the device instead.
"""
import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import daemons  # noqa: E402  (the tests' daemon starter: real processes, logs to a file)

from latentwire.pipelines.models.sd import StableDiffusionModel  # noqa: E402
from latentwire.pipelines.models.tiny import save_tiny_pair  # noqa: E402
from latentwire.scheduler import SessionSpec, make  # noqa: E402
from latentwire.scheduler.serving.edge import EdgeClient  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def specs(model, n, steps):
    s = model.make_scheduler("DDIMScheduler")
    return [SessionSpec(prompt=PROMPTS[i % len(PROMPTS)], plan=make("cloud-only", steps), scheduler=type(s).__name__,
                        scheduler_config=dict(s.config), guidance_scale=3.0 + i % 5, seed=i) for i in range(n)]


def round_of(bind, edge, sessions):
    """Start every session at once -> (completed, wall seconds, per-session latencies)."""
    latencies, failures = [None] * len(sessions), []
    barrier = threading.Barrier(len(sessions) + 1)

    def one(i):
        client = EdgeClient(bind, edge, timeout_s=600, heartbeat_timeout_s=60)
        barrier.wait()
        start = time.perf_counter()
        try:
            client.generate(sessions[i])
            latencies[i] = time.perf_counter() - start
        except Exception as e:  # counted, and printed: a load run must lose none
            failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for f in failures[:3]:
        print(f"  failed: {f}")
    return [x for x in latencies if x is not None], wall


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="the daemon's torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="latentwire-load-"))
    cloud_path, edge_path = save_tiny_pair(root, seed=0)
    edge = StableDiffusionModel.from_pretrained(str(edge_path))
    configs = [("off", ["--max-batch", "1"]),
               ("on", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)])]
    procs = {}
    for name, extra in configs:
        bind = f"ipc://{root}/{name}.sock"
        procs[name] = (bind, daemons.start("cloud", "--bind", bind, "--model", str(cloud_path), "--threads",
                                           str(args.threads), "--max-sessions-per-client", "1024", *extra,
                                           same_threads=False))
    print(f"# load: tiny cloud model, cloud-only, {args.steps} steps, daemon threads {args.threads}, "
          f"max-batch {args.max_batch} (max wait {args.max_wait_ms:g} ms) vs 1; {platform.processor() or platform.machine()}")
    print("| sessions | batching | completed | wall s | sessions/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name, _ in configs:  # warm-up: first calls pay for lazy initialisation
            round_of(procs[name][0], edge, specs(edge, 2, args.steps))
        ratios = []
        for n in args.sessions:
            rate = {}
            for name, _ in configs:
                latencies, wall = round_of(procs[name][0], edge, specs(edge, n, args.steps))
                rate[name] = len(latencies) / wall
                print(f"| {n} | {name} | {len(latencies)}/{n} | {wall:.2f} | {rate[name]:.2f} | "
                      f"{pct(latencies, 50):.2f} | {pct(latencies, 99):.2f} |", flush=True)
            ratios.append((n, rate["on"] / rate["off"]))
        for n, r in ratios:
            print(f"throughput with batching / without, {n} sessions: {r:.2f}x (target >= 1.5x)")
    finally:
        for _, proc in procs.values():
            daemons.stop(proc)


if __name__ == "__main__":
    main()
