"""What diffusers' `accelerate` path buys a daemon: time and peak memory to load a UNet, with and without it.

diffusers warns at every load when `accelerate` is missing, and then loads with low_cpu_mem_usage=False:
it builds the model with random weights, then copies the checkpoint over them. With accelerate it builds
the model on the meta device and materialises the checkpoint's tensors directly. This measures both on
the same saved folders, each load in a fresh interpreter (peak RSS is per process):

    .venv/bin/python bench/accelerate_load.py [--repeats 3]

Models: the tiny test UNet (what the tests load), the embedded world-sd-cloud UNet (what the demo's cloud
loads), and a UNet with Stable Diffusion v1.5's architecture (its published config: 320/640/1280/1280
channels, 2 layers a block, cross-attention 768; 860 M parameters) with random weights saved here in
float16, since no real weights can be downloaded: load time depends on the architecture and the bytes,
not on the values.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

CHILD = """
import json, sys, time
import torch
from diffusers import UNet2DConditionModel
folder, low = sys.argv[1], sys.argv[2] == "1"
torch.set_num_threads(1)
start = time.perf_counter()
unet = UNet2DConditionModel.from_pretrained(folder, low_cpu_mem_usage=low)
took = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork and exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": took, "peak_rss_mib": hwm / 1024,
                  "params_m": sum(p.numel() for p in unet.parameters()) / 1e6}))
"""


def load(folder, low):
    done = subprocess.run([sys.executable, "-P", "-c", CHILD, str(folder), "1" if low else "0"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    from diffusers import UNet2DConditionModel

    from latentwire.pipelines.embedded import CLOUD_PATH
    from latentwire.pipelines.models.tiny import save_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        tiny, _ = save_tiny_pair(Path(tmp) / "tiny", seed=0)
        sd15 = Path(tmp) / "sd15-unet"
        torch.manual_seed(0)
        UNet2DConditionModel(**SD15_UNET).to(torch.float16).save_pretrained(sd15)
        folders = [("tiny test UNet", Path(tiny) / "unet"), ("world-sd-cloud UNet", Path(CLOUD_PATH) / "unet"),
                   ("SD v1.5-architecture UNet, fp16", sd15)]
        print(f"Command: `python bench/accelerate_load.py --repeats {args.repeats}`; median of {args.repeats} "
              "loads, each in a fresh interpreter, one torch thread.\n")
        print("| UNet | params (M) | load s, without | load s, with accelerate | peak RSS MiB, without | "
              "peak RSS MiB, with accelerate |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, folder in folders:
            runs = {low: [load(folder, low) for _ in range(args.repeats)] for low in (False, True)}
            med = {low: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "peak_rss_mib")}
                   for low, rs in runs.items()}
            print(f"| {name} | {runs[True][0]['params_m']:.1f} | {med[False]['load_s']:.2f} | "
                  f"{med[True]['load_s']:.2f} | {med[False]['peak_rss_mib']:.0f} | {med[True]['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
