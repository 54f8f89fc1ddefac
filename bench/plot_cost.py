"""The cost model's picture: latency against bandwidth for every built-in plan on a named device pair, and
cloud GPU-seconds against quality (`latentwire eval`), as one PNG (matplotlib).

    .venv/bin/python bench/plot_cost.py [--out docs/cost.png] [--n 64] [--eval-json FILE] [--rtt-ms 55.25]

Left: scheduler.cost.model.predict for each plan, 50 DDIM steps, SD v1.5 in the cloud (sd-v1-5@a100) and
BK-SDM-Tiny on the edge (bk-sdm-tiny@galaxy-s24, an ESTIMATE: see its file), over symmetric links of
0.5 to 200 Mbit/s with the lte profile's round-trip time; the shipped lte and wifi profiles (asymmetric)
are marked. The A100 profile has no public text-encoding figure, so it is assumed 0 here (and said so on
the plot); every other figure is the profiles' own.
Right: for the same plans at 20 steps (and a few more parameter settings), the cloud GPU-seconds per image
predicted on sd-v1-5@a100 against the Fréchet distance that `latentwire eval --n N` measures on the
embedded world models (one process; the world is where quality is exact). Evaluations are cached in
--eval-json (written if missing, read if present).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from latentwire.scheduler import make
from latentwire.scheduler.cost.model import predict
from latentwire.scheduler.cost.profiles import LinkProfile, assume, load_device, load_link

CLI = str(Path(sys.executable).with_name("latentwire"))
CLOUD, EDGE = "sd-v1-5@a100", "bk-sdm-tiny@galaxy-s24"
# the plans at 50 steps: EC-Diff's published setting, Hybrid SD's k = 20 of 50 (the default scales with N)
LATENCY_PLANS = [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {"k": 20}),
                 ("ec-diff", {"p": 7, "k": 2, "a": 0.3, "s": 37}), ("preview-refine", {"strength": 0.5})]
# at 20 steps, as the README's quality table: each plan's defaults, and a few settings around them
QUALITY_PLANS = [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {"k": 4}), ("hybrid-sd", {"k": 8}),
                 ("hybrid-sd", {"k": 12}), ("ec-diff", {}), ("ec-diff", {"p": 3, "k": 1, "a": 0.5, "s": 15}),
                 ("preview-refine", {"strength": 0.3}), ("preview-refine", {"strength": 0.5})]
BANDWIDTHS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200]
COLOURS = {"cloud-only": "tab:blue", "edge-only": "tab:gray", "hybrid-sd": "tab:orange", "ec-diff": "tab:green",
           "preview-refine": "tab:purple"}


def label(name, params):
    return name + (" " + ", ".join(f"{k}={v:g}" for k, v in params.items()) if params else "")


def evaluate(name, params, n, steps=20):
    """`latentwire eval` of one plan -> its JSON (one process, one thread)."""
    cmd = [CLI, "eval", "--plan", name, "--steps", str(steps), "--n", str(n), "--threads", "1", "--json"]
    for k, v in params.items():
        cmd += [f"--{k}", f"{v:g}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/cost.png")
    ap.add_argument("--n", type=int, default=64, help="prompts per `latentwire eval`")
    ap.add_argument("--eval-json", default="docs/cost-eval.json", help="cache of the evaluations")
    ap.add_argument("--rtt-ms", type=float, default=None, help="the swept links' RTT (default: the lte profile's)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cloud = assume(load_device(CLOUD), "text_encode_s", 0.0)
    edge = load_device(EDGE)
    lte, wifi = load_link("lte"), load_link("wifi")
    rtt = lte.rtt_ms if args.rtt_ms is None else args.rtt_ms
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    for name, params in LATENCY_PLANS:
        plan = make(name, 50, **params)
        ys = [predict(plan, cloud, edge, LinkProfile(f"{b}mbit", b, b, rtt)).latency_s for b in BANDWIDTHS]
        left.plot(BANDWIDTHS, ys, marker="o", ms=3, color=COLOURS[name], label=label(name, params))
        for link, marker in ((lte, "s"), (wifi, "^")):
            y = predict(plan, cloud, edge, link).latency_s
            left.plot([link.down_mbit_s], [y], marker=marker, ms=8, color=COLOURS[name], mfc="none")
    left.plot([], [], "ks", mfc="none", label=f"lte ({lte.up_mbit_s:g} up / {lte.down_mbit_s:g} down Mbit/s, "
                                              f"{lte.rtt_ms:g} ms), at its downlink")
    left.plot([], [], "k^", mfc="none", label=f"wifi ({wifi.up_mbit_s:g} / {wifi.down_mbit_s:g}, {wifi.rtt_ms:g} ms)")
    left.set_xscale("log")
    left.set_xlabel(f"link bandwidth, Mbit/s each way (RTT {rtt:g} ms)")
    left.set_ylabel("predicted latency per image, s")
    left.set_title(f"50 DDIM steps: cloud {CLOUD}, edge {EDGE} (EST)\ncloud text encoding assumed 0 (no public "
                   "figure)", fontsize=9)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    cache = Path(args.eval_json)
    evals = json.loads(cache.read_text()) if cache.exists() else {}
    for name, params in QUALITY_PLANS:
        key = label(name, params)
        if key not in evals:
            evals[key] = evaluate(name, params, args.n)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(evals, indent=1))
        plan = make(name, 20, **params)
        gpu = predict(plan, cloud, edge, lte).cloud_gpu_s
        variant = sum(1 for n, _ in QUALITY_PLANS[:QUALITY_PLANS.index((name, params))] if n == name)
        shown = label(name, dict(plan.params)) if name == "ec-diff" else key  # the defaults spelled out
        right.scatter([gpu], [evals[key]["frechet_distance"]], color=COLOURS[name], s=40, marker="osD^v"[variant],
                      label=f"{shown}: accuracy {evals[key]['attribute_accuracy']:.3f}")
    n = next(iter(evals.values()))["n"]
    right.set_xlabel(f"predicted cloud GPU-seconds per image on {CLOUD}, 20 steps")
    right.set_ylabel(f"Fréchet distance on the world (lower is better), n = {n}")
    right.set_title("quality: `latentwire eval` on the embedded world models, 20 DDIM steps", fontsize=9)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} (evaluations: {cache})")


if __name__ == "__main__":
    main()
