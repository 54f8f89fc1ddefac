"""EC-Diff reproduced and searched, as the README's table: every plan's quality on held-out world prompts,
its cloud calls and GPU-seconds, and its predicted latency over LTE and Wi-Fi.

    .venv/bin/python bench/ecdiff_table.py [--clouds trained,ideal] [--links lte,wifi] [--cache-dir DIR]
                                           [--plans-dir docs/plans] [--n 64] [--confirm-n 256] [--budget 30]

For each cloud model of the world (the trained world-sd-cloud UNet, and the exact denoiser) and each link it
runs two searches, as `latentwire search` (the commands are printed): EC-Diff's (its two stages, its own
forecasting rule) and latentwire's (also Taylor forecasters, where the cloud's calls fall, and no handoff at
all), on the SD v1.5 A100 and estimated BK-SDM-Tiny Galaxy S24 profiles, the A100's text encoding assumed 0.
Then it measures every row on the same held-out prompts (seed EVAL_SEED + 1, --held-out-n of them: prompts
no search measured) and predicts each on every link. Measurements are kept in --cache-dir (one JSON file a
cloud model, `latentwire search --cache`), so a second run, or a search that shares candidates with another,
measures only what is new: cold, the whole table takes hours on two cores; warm, a minute.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from latentwire.pipelines.ecdiff import share
from latentwire.pipelines.ecdiff.cache import Cache, quality
from latentwire.pipelines.evaluate import EVAL_SEED, load_models
from latentwire.scheduler import Plan, make
from latentwire.scheduler.cost.model import predict
from latentwire.scheduler.cost.profiles import apply_assumptions, load_device, load_link

CLOUD, EDGE, ASSUME = "sd-v1-5@a100", "bk-sdm-tiny@galaxy-s24", "cloud.text_encode_s=0"
STEPS = 20
SYSTEMS = {"ec-diff": ["--forecasters", "ecdiff"],
           "latentwire": ["--forecasters", "ecdiff,taylor", "--spacing", "--no-handoff"]}
FIXED = [("cloud-only", {}, "cloud-only"), ("edge-only", {}, "edge-only"),
         ("hybrid-sd", {"k": 8}, "hybrid-sd k=8 (latentwire's default, 40% on the cloud)"),
         ("hybrid-sd", {"k": 16}, "hybrid-sd k=16 (EC-Diff's baseline, 40 of 50, scaled)"),
         ("ec-diff", {}, "ec-diff p=3 k=2 a=0.3 s=15 (EC-Diff's setting, scaled: the default)")]


def counts(plan):
    labels = [label for _, label in plan.labels()]
    return f"{labels.count('cloud')} / {labels.count('forecast')} / {labels.count('edge')}"


def best_hybrid(cache, models, cloud, cloud_p, edge_p, link, args):
    """Hybrid SD's best k: the least predicted latency over k = 1..STEPS-1 whose quality keeps 95% of
    cloud-only's on the search's prompts and on its confirmation prompts, as the search decides -> (plan, k)."""
    plans = sorted((make("hybrid-sd", STEPS, k=k) for k in range(1, STEPS)),
                   key=lambda p: predict(p, cloud_p, edge_p, link).latency_s)
    q = {n: quality(cache, make("cloud-only", STEPS), models, cloud, n, EVAL_SEED, 1) for n in (args.n, args.confirm_n)}
    for plan in plans:
        if all(share(quality(cache, plan, models, cloud, n, EVAL_SEED, 1), q[n]) >= 0.95 for n in (args.n, args.confirm_n)):
            return plan
    return None


def run_search(cli, cloud, system, link, args):
    cmd = [cli, "search", "--cloud-device", CLOUD, "--edge-device", EDGE, "--link", link, "--assume", ASSUME,
           "--steps", str(STEPS), "--n", str(args.n), "--confirm-n", str(args.confirm_n), "--held-out-n",
           str(args.held_out_n), "--budget", str(args.budget), "--cloud", cloud, "--threads", "1",
           *SYSTEMS[system], "--cache", os.path.join(args.cache_dir, f"cache-{cloud}.json"),
           "--out", os.path.join(args.plans_dir, f"{system}-{cloud}-{link}.json"), "--json"]
    print(f"    {' '.join(os.path.basename(c) if c == cli else c for c in cmd)}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 3):
        raise SystemExit(f"search failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clouds", default="trained,ideal")
    ap.add_argument("--links", default="lte,wifi")
    ap.add_argument("--cache-dir", default="/tmp/latentwire-ecdiff")
    ap.add_argument("--plans-dir", default="docs/plans")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--confirm-n", type=int, default=256)
    ap.add_argument("--held-out-n", type=int, default=256)
    ap.add_argument("--budget", type=int, default=30)
    args = ap.parse_args(argv)
    os.makedirs(args.cache_dir, exist_ok=True)
    os.makedirs(args.plans_dir, exist_ok=True)
    torch.set_num_threads(1)  # the searches' thread count: the cache's key, and the last digits, depend on it
    cli = os.path.join(os.path.dirname(sys.executable), "latentwire")
    cloud_p, edge_p, _ = apply_assumptions([ASSUME], load_device(CLOUD), load_device(EDGE))
    links = {name: load_link(name) for name in args.links.split(",")}
    held_out = EVAL_SEED + 1
    print(f"Commands: `python bench/ecdiff_table.py --clouds {args.clouds} --links {args.links} --n {args.n} "
          f"--confirm-n {args.confirm_n} --held-out-n {args.held_out_n} --budget {args.budget}`; {STEPS} DDIM steps, "
          f"{CLOUD} and {EDGE} (estimated), {ASSUME} assumed; quality on {args.held_out_n} held-out prompts "
          f"(seed {held_out})\n")
    for cloud in args.clouds.split(","):
        print(f"  searching, {cloud} cloud:", file=sys.stderr, flush=True)
        found = {(system, link): run_search(cli, cloud, system, link, args) for system in SYSTEMS for link in links}
        cache = Cache(os.path.join(args.cache_dir, f"cache-{cloud}.json"))
        models = load_models(cloud)
        rows = [(make(name, STEPS, **params), label) for name, params, label in FIXED]
        best = best_hybrid(cache, models, cloud, cloud_p, edge_p, next(iter(links.values())), args)
        rows.insert(4, (best, f"hybrid-sd k={best.params['k']} (its best k: the fastest within the bound on the "
                              f"search's prompts, confirmed)" if best else "hybrid-sd, best k: none within the bound"))
        for system in SYSTEMS:
            for link in links:
                r = found[(system, link)]
                who = "EC-Diff's search" if system == "ec-diff" else "latentwire's search"
                label = (f"{who}, {link}: " + ("no plan met the bound" if r["plan"] is None else r["plan_text"]) +
                         f" ({r['evaluations']} measurements)")
                rows.append((None if r["plan"] is None else Plan.from_plain(r["plan"]), label))
        ref = quality(cache, make("cloud-only", STEPS), models, cloud, args.held_out_n, held_out, 1)
        base = {link: predict(make("cloud-only", STEPS), cloud_p, edge_p, lk).latency_s for link, lk in links.items()}
        print(f"\n**{cloud} cloud** ({'world-sd-cloud' if cloud == 'trained' else 'the exact denoiser'})\n")
        print("| plan | cloud calls / forecasts / edge steps | accuracy | Fréchet | share of cloud-only | cloud GPU s | "
              + " | ".join(f"latency {link} s | speedup {link}" for link in links) + " |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in links) + " |")
        for plan, label in rows:
            if plan is None:
                print(f"| {label} | - | - | - | - | - | " + " | ".join("- | -" for _ in links) + " |")
                continue
            q = quality(cache, plan, models, cloud, args.held_out_n, held_out, 1)
            costs = {link: predict(plan, cloud_p, edge_p, lk) for link, lk in links.items()}
            gpu = next(iter(costs.values())).cloud_gpu_s
            print(f"| {label} | {counts(plan)} | {q['attribute_accuracy']:.3f} | {q['frechet_distance']:.0f} | "
                  f"{share(q, ref):.3f} | {gpu:.3f} | " +
                  " | ".join(f"{c.latency_s:.3f} | {base[link] / c.latency_s:.2f}x" for link, c in costs.items()) + " |")
        for system in SYSTEMS:
            for link in links:
                r = found[(system, link)]
                measured = [t for t in r["trials"] if not t["screened"]]
                print(f"\n{system} search, {link}: {r['evaluations']} measurements of its budget {args.budget} "
                      f"(confirmations and cloud-only's two references included; {r['cache_hits']} answered by the "
                      f"cache), {len(r['trials']) - len(measured)} candidates screened out by the proxy; "
                      "measured, in order:\n")
                print("| stage | plan | predicted latency s | proxy | share (64) | share (256) |\n| ---: | --- | ---: | ---: | ---: | ---: |")
                for t in measured:
                    proxy = "-" if t["proxy"] is None else f"{t['proxy']:.4f}"
                    conf = "-" if t["confirmed_share"] is None else f"{t['confirmed_share']:.3f}"
                    print(f"| {t['stage']} | {t['plan'].replace('|', '/')} | {t['latency_s']:.3f} | {proxy} | "
                          f"{t['share']:.3f} | {conf} |")


if __name__ == "__main__":
    main()
