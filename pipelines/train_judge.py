"""Train the world's attribute judge and save its state_dict:

    python -m latentwire.pipelines.train_judge --out pipelines/assets/judge.pt

Runs on one CPU thread (the scores are meant to be reproduced bit for bit, and the machine is shared), then
reloads the saved file and prints its held-out accuracies on clean renders of a world seed below
judge.FIRST_TRAINING_SEED, and the training wall time.
"""
import argparse
import time
from pathlib import Path

import torch

from . import judge as judge_mod
from . import world


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=judge_mod.JUDGE_PATH, help="where to write the state_dict")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights and augmentation")
    p.add_argument("--eval-n", type=int, default=4000, help="held-out renders to score")
    p.add_argument("--eval-seed", type=int, default=1, help="world seed of the held-out renders")
    args = p.parse_args(argv)
    if not 0 <= args.eval_seed < judge_mod.FIRST_TRAINING_SEED:
        p.error(f"--eval-seed must be in [0, {judge_mod.FIRST_TRAINING_SEED}) so it is not a training seed, "
                f"got {args.eval_seed}")
    torch.set_num_threads(1)

    start = time.perf_counter()
    j = judge_mod.train_judge(args.steps, args.batch_size, args.seed, args.lr,
                              log=lambda k, loss: print(f"step {k:5d}  loss {loss:.4f}", flush=True))
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(j.state_dict(), args.out)

    scenes = world.sample_scenes(args.eval_n, args.eval_seed)
    images = world.render(scenes, args.eval_seed)
    scores = judge_mod.attribute_scores(images, scenes, judge_mod.load_judge(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(f"held-out (world seed {args.eval_seed}, {args.eval_n} clean renders): "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(f"training wall time {seconds:.0f} s ({args.steps} steps x {args.batch_size} images)")


if __name__ == "__main__":
    main()
