"""What a process ran before changes its UNet's speed on a CPU: the same UNet call timed before the VAE
decoder has ever run in the process, and again after one decode (why `latentwire profile --side` exists).

    .venv/bin/python bench/decode_warmup.py [--repeats 15] [--processes 3]

Each process (a fresh one, one torch thread): tiny-sd at 4x64x64 (pipelines/models/tiny.py, image_size 512),
the cloud UNet's guided step timed --repeats times twice (median of each), one decode, then the same twice
again. Printed: one line per process, and the ratio after / before.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import statistics, sys, time, torch
torch.set_num_threads(1)
from latentwire.pipelines.models import load_model
m = load_model(sys.argv[1])
s = m.make_scheduler(); s.set_timesteps(20)
c = m.encode_prompt("a red cat", "")
x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(0))
def steps(n):
    times = []
    with torch.no_grad():
        for _ in range(n):
            t0 = time.perf_counter(); m.predict(x, s.timesteps[10], *c, scheduler=s, guidance=3.0)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
n = int(sys.argv[2])
before = min(steps(n), steps(n))
with torch.no_grad():
    m.decode(x)
after = min(steps(n), steps(n))
print(before, after)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--processes", type=int, default=3)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.processes < 1:
        ap.error("--repeats and --processes must be >= 1")
    from latentwire.pipelines.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(str(Path(tempfile.mkdtemp(prefix="latentwire-warmup-")) / "cloud"), image_size=512)
    ratios = []
    for k in range(args.processes):
        done = subprocess.run([sys.executable, "-P", "-c", CHILD, folder, str(args.repeats)], capture_output=True,
                              text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        before, after = (float(v) for v in done.stdout.split())
        ratios.append(after / before)
        print(f"process {k}: UNet step {1e3 * before:.1f} ms before any decode, {1e3 * after:.1f} ms after one "
              f"(after / before {after / before:.3f})")
    print(f"median after / before over {args.processes} processes: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
