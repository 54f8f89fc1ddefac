"""What the cost model predicts for the built-in plans on a device pair over named links, as a markdown table.

    .venv/bin/python bench/cost_table.py [--cloud sd-v1-5@a100] [--edge bk-sdm-tiny@galaxy-s24] [--links lte,wifi]
                                         [--assume cloud.text_encode_s=0 ...]

Each cell is scheduler.cost.model.predict, as `latentwire cost --json` prints it (the same profiles, the
default codecs, load 0, DDIM); the plans at 50 steps: cloud-only, edge-only, Hybrid SD with 40% of the steps
on the cloud (k = 20, latentwire's default) and with EC-Diff's baseline k = 40, EC-Diff as published (p=7,
k=2, a=0.3, s=37) and preview-refine at strength 0.5. --assume fills a figure the profiles lack, and the
table says so.
"""
import argparse

from latentwire.scheduler import make
from latentwire.scheduler.cost.model import predict
from latentwire.scheduler.cost.profiles import apply_assumptions, load_device, load_link

PLANS = [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {"k": 20}), ("hybrid-sd", {"k": 40}),
         ("ec-diff", {"p": 7, "k": 2, "a": 0.3, "s": 37}), ("preview-refine", {"strength": 0.5})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud", default="sd-v1-5@a100")
    ap.add_argument("--edge", default="bk-sdm-tiny@galaxy-s24")
    ap.add_argument("--links", default="lte,wifi")
    ap.add_argument("--assume", action="append", default=[], metavar="SIDE.FIGURE=SECONDS")
    args = ap.parse_args(argv)
    cloud, edge, _ = apply_assumptions(args.assume, load_device(args.cloud), load_device(args.edge))
    flags = " ".join(f"--assume {a}" for a in args.assume)
    print(f"Command: `python bench/cost_table.py --cloud {args.cloud} --edge {args.edge} --links {args.links}"
          f"{' ' + flags if flags else ''}`; 50 DDIM steps, default codecs, load 0\n")
    print("| link | plan | latency s | vs cloud-only | cloud GPU s | edge s | bytes up | bytes down | text | cloud "
          "steps | edge steps | transfer + rtt | decode |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.links.split(","):
        link = load_link(name)
        base = None
        for plan_name, params in PLANS:
            plan = make(plan_name, 50, **params)
            c = predict(plan, cloud, edge, link)
            base = c.latency_s if plan_name == "cloud-only" else base
            p = c.parts
            print(f"| {name} | {plan_name} {params or ''} | {c.latency_s:.3f} | {base / c.latency_s:.2f}x | "
                  f"{c.cloud_gpu_s:.3f} | {c.edge_s:.3f} | {c.bytes_up} | {c.bytes_down} | {p['text_encode']:.3f} | "
                  f"{p['cloud_steps']:.3f} | {p['edge_steps']:.3f} | "
                  f"{p['transfer_up'] + p['transfer_down'] + p['rtt']:.3f} | {p['decode']:.3f} |")
    for what in args.assume:
        print(f"\nASSUMED (no public figure): {what} s.")


if __name__ == "__main__":
    main()
