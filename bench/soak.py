"""Soak: a worker pool under steady load for minutes, with a worker killed midway.

    .venv/bin/python bench/soak.py [--minutes 3] [--edges 6] [--workers 2] [--steps 20]

`latentwire cloud --workers W --threads 1 --max-batch 8` (a broker and W worker processes) serves the
tiny cloud model on loopback; E edges (threads here, each its own EdgeClient) run cloud-only sessions
back to back, cycling through a few prompts and seeds. Halfway through, one worker gets SIGKILL; the
pool restarts it, and the edges whose sessions it held retry them on the other worker. Latents travel
as fp32, and every session's is compared with the same session computed in this process (one thread,
as the workers) to the batching bound, 1e-5 of its largest value, so a lost or wrong session counts. Reported: sessions completed, lost, wrong, retried; the
workers' resident memory after warm-up and at the end (a surviving worker's must stay flat).
"""
import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import daemons  # noqa: E402

from latentwire.pipelines.models.sd import StableDiffusionModel  # noqa: E402
from latentwire.pipelines.models.tiny import save_tiny_pair  # noqa: E402
from latentwire.scheduler import SessionSpec, make, run_plan  # noqa: E402
from latentwire.scheduler.serving.edge import EdgeClient  # noqa: E402
from latentwire.scheduler.wire import Codecs  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = 4
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
BATCHED_RTOL = 1e-5  # a batched session against the same session alone (tests/test_batching.py)


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def workers_of(pid):
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--edges", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as the workers: results compare bit for bit
    root = Path(tempfile.mkdtemp(prefix="latentwire-soak-"))
    cloud_path, edge_path = save_tiny_pair(root, seed=0)
    models = {"cloud": StableDiffusionModel.from_pretrained(str(cloud_path)),
              "edge": StableDiffusionModel.from_pretrained(str(edge_path))}
    s = models["cloud"].make_scheduler("DDIMScheduler")
    specs = [SessionSpec(prompt=p, plan=make("cloud-only", args.steps), scheduler=type(s).__name__,
                         scheduler_config=dict(s.config), guidance_scale=5.0, seed=seed)
             for p in PROMPTS for seed in range(SEEDS)]
    expected = [run_plan(spec, models)[0] for spec in specs]
    bind = f"ipc://{root}/pool.sock"
    pool = daemons.start("cloud", "--workers", str(args.workers), "--threads", "1", "--max-batch", "8",
                         "--max-wait-ms", "2", "--heartbeat", "0.5", "--bind", bind, "--model", str(cloud_path),
                         same_threads=False)
    stop = threading.Event()
    counts = {"completed": 0, "lost": 0, "wrong": 0, "retried": 0}
    lock = threading.Lock()

    def edge(e):
        client = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=120, heartbeat_timeout_s=5, retries=3)
        i = e
        while not stop.is_set():
            k = i % len(specs)
            before = client.attempts
            try:
                latent, summary = client.generate(specs[k])
                err = ((latent - expected[k]).abs().max() / expected[k].abs().max()).item()
                outcome = "completed" if err <= BATCHED_RTOL and not summary.degraded else "wrong"
            except Exception as err:
                print(f"  lost: {type(err).__name__}: {err}", flush=True)
                outcome = "lost"
            with lock:
                counts[outcome] += 1
                counts["retried"] += client.attempts - before - 1
            i += args.edges

    duration = args.minutes * 60
    threads = [threading.Thread(target=edge, args=(e,)) for e in range(args.edges)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(min(20.0, duration / 6))  # warm-up
        first = {pid: rss_mb(pid) for pid in workers_of(pool.pid)}
        print(f"after warm-up ({time.monotonic() - start:.0f} s): {counts}, worker RSS MB "
              f"{ {p: round(m, 1) for p, m in first.items()} }", flush=True)
        time.sleep(max(0.0, start + duration / 2 - time.monotonic()))
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        print(f"killed worker {victim} at {time.monotonic() - start:.0f} s: {counts}", flush=True)
        time.sleep(max(0.0, start + duration - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(timeout=180)
        last = {pid: rss_mb(pid) for pid in workers_of(pool.pid)}
    finally:
        stop.set()
        code = daemons.stop(pool)
    survivors = sorted(set(first) & set(last))
    print(f"after {time.monotonic() - start:.0f} s: {counts}; pool exit code {code}; "
          f"restarts logged: {daemons.log_text(pool).count('worker restarted')}")
    for pid in survivors:
        print(f"surviving worker {pid}: RSS {first[pid]:.1f} MB after warm-up, {last[pid]:.1f} MB at the end "
              f"({(last[pid] / first[pid] - 1) * 100:+.1f}%)")
    for pid in sorted(set(last) - set(first)):
        print(f"restarted worker {pid}: RSS {last[pid]:.1f} MB at the end")


if __name__ == "__main__":
    main()
