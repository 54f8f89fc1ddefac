"""Handoff time per emulated link: every fixed latent codec against the per-link choice.

    .venv/bin/python bench/link.py

For SD1.5 and SDXL latents at a middle handoff step (x_t at t = 500, latentwire.protocol.samples), on
one thread: each codec's measured encode and decode time plus the link's transfer time for its bytes
(latency + bytes / bandwidth). The choice (scheduler.link.choose_codec, error budget 0.01 of the
latent's std) is made from timings on a noise latent of the same size, as the edge client makes it
before it knows the latent, and judged on the real one. Target: within 10% of the best fixed codec.
"""
import platform

import torch

from latentwire.protocol.samples import mixture, noise
from latentwire.scheduler.serving.link import CANDIDATES, DEFAULT_ERROR_BUDGET, PROFILES, choose_codec, measure_codecs

SHAPES = {"SD1.5": (1, 4, 64, 64), "SDXL": (1, 4, 128, 128)}


def main():
    torch.set_num_threads(1)
    print("# Handoff time per link\n")
    print(f"Command: `python bench/link.py`; {platform.machine()}, torch {torch.__version__}, one thread; "
          f"error budget {DEFAULT_ERROR_BUDGET} (RMSE / std); milliseconds (encode + transfer + decode).\n")
    verdicts = []
    for label, shape in SHAPES.items():
        latent = mixture(shape, 500)
        costs = {(c.codec, c.level): c for c in measure_codecs(latent, repeats=7)}
        sample_costs = measure_codecs(noise(shape, 1), repeats=7)
        header = " | ".join(f"{c} z{z}" for c, z in CANDIDATES)
        print(f"## {label} {shape}\n")
        print(f"| link | {header} | chosen | chosen / best within budget |")
        print("| --- |" + " ---: |" * len(CANDIDATES) + " --- | ---: |")
        for name, link in PROFILES.items():
            times = {k: c.handoff_s(link) * 1e3 for k, c in costs.items()}
            within = {k: t for k, t in times.items() if costs[k].rel_rmse <= DEFAULT_ERROR_BUDGET}
            best = min(within.values())
            chosen = choose_codec(sample_costs, link)
            ratio = times[chosen] / best
            verdicts.append(ratio)
            cells = " | ".join(f"{times[k]:.2f}" + ("" if k in within else "*") for k in CANDIDATES)
            print(f"| {name} | {cells} | {chosen[0]} z{chosen[1]} | {ratio:.3f} |")
        print("\n(*: over the error budget.) Bytes: " + ", ".join(f"{c} z{z} {costs[c, z].nbytes}" for c, z in CANDIDATES)
              + "; RMSE / std: " + ", ".join(f"{c} z{z} {costs[c, z].rel_rmse:.1e}" for c, z in CANDIDATES) + "\n")
    print(f"Worst chosen / best: {max(verdicts):.3f} (target <= 1.10): {'met' if max(verdicts) <= 1.10 else 'not met'}")


if __name__ == "__main__":
    main()
