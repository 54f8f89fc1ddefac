"""Train the noise-level predictor (predictor.py) on data generated from the world, resumably.

    python -m latentwire.pipelines.diffusionx.train_predictor [--pairs 256] [--held-out 64] [--data FILE]
                                                              [--out predictor.json] [--threads 1]

For pair k (world.sample_scenes(pairs, seed)[k], noise seed seed * 1_000_003 + k): the preview's scene, and
the final's, with k % 4 of its three attributes changed (0 to 3: which ones and to what, drawn from the pair's
own generator). The edge model previews the first caption (PREVIEW_STEPS steps, fresh noise); then for every
strength in predictor.STRENGTHS the trained world cloud refines that preview with the second caption
(STEPS steps, as PromptSession.finalize does); the judge reads each final, and the label is whether it shows
all three attributes the final caption names. Rows go to --data (JSON lines) as they are made: a run that
stops resumes where it was. The held-out pairs come from seed + 1. Then a logistic fit (predictor.fit) on
all the training pairs, and the learning curve (held-out log loss against the number of training pairs),
written with the weights to --out.
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from latentwire.pipelines import evaluate, judge, world
from latentwire.pipelines.diffusionx.predictor import (FEATURES, STRENGTHS, WEIGHTS_PATH, embed_distance, features,
                                                       fit, log_loss, word_edits)
from latentwire.pipelines.diffusionx.session import PromptSession

SEED = 11
STEPS, PREVIEW_STEPS = 20, 8
GUIDANCE = evaluate.EVAL_GUIDANCE
CHUNK = 8  # pairs generated between writes to --data


def changed(scene, count, rng):
    """``scene`` with ``count`` of its attributes changed to other values of their vocabularies."""
    values = {a: getattr(scene, a) for a in world.ATTRIBUTES}
    for a in rng.sample(world.ATTRIBUTES, count):
        values[a] = rng.choice([v for v in world.VOCABULARIES[a] if v != values[a]])
    return world.Scene(**values)


def pairs(n, seed):
    """[(k, preview scene, final scene, noise seed)] of the data set's n pairs from ``seed``."""
    out = []
    for k, scene in enumerate(world.sample_scenes(n, seed)):
        rng = random.Random(seed * 7919 + k)
        out.append((k, scene, changed(scene, k % 4, rng), seed * 1_000_003 + k))
    return out


@torch.no_grad()
def generate(todo, models, split):
    """Rows for the pairs in ``todo``: features per strength and the judge's verdict."""
    rows, images, targets = [], [], []
    for k, before, after, noise_seed in todo:
        a, b = world.caption(before), world.caption(after)
        session = PromptSession(models["edge"], models["cloud"], steps=STEPS, preview_steps=PREVIEW_STEPS,
                                seed=noise_seed, guidance_scale=GUIDANCE)
        session.preview(a)
        finals = [session.finalize(b, strength=s).latent for s in STRENGTHS]
        images.append(evaluate.to_pixels(models["edge"], torch.cat(finals)))
        targets += [after] * len(STRENGTHS)
        rows.append({"split": split, "k": k, "before": a, "after": b, "changed": k % 4,
                     "embed_distance": embed_distance(models["edge"], a, b), "word_edits": word_edits(a, b)})
    read = judge.predict(torch.cat(images))
    right = (read == torch.tensor([t.labels() for t in targets])).all(dim=1).view(len(todo), len(STRENGTHS))
    for row, ok in zip(rows, right.tolist()):
        row["success"] = [int(v) for v in ok]
    return rows


def load_rows(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def design(rows):
    """Feature rows and labels, one per (pair, strength)."""
    x, y = [], []
    for r in rows:
        for s, ok in zip(STRENGTHS, r["success"]):
            x.append(features(r["embed_distance"], r["word_edits"], s))
            y.append(ok)
    return x, y


def card(d):
    """PREDICTOR_CARD.md: what the model is, how it was trained, its learning curve, what it is not."""
    curve = "\n".join(f"| {c['pairs']} | {c['pairs'] * len(d['strengths'])} | {c['train_log_loss']:.4f} | "
                      f"{c['held_out_log_loss']:.4f} |" for c in d["curve"])
    by_change = "\n".join(f"| {c} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                           for c, row in d["success_by_change"].items())
    weights = ", ".join(f"{k} {v:+.3f}" for k, v in d["weights"].items())
    return f"""# The noise-level predictor (predictor.json)

**What it is.** A logistic model of P(the cloud's refine of an edge preview shows all three attributes the final
prompt names | prompt change, strength), over {len(d['features'])} features: {', '.join(d['features'])}
(pipelines/diffusionx/predictor.py). `embed_distance` is 1 - cosine of the mean-pooled text embeddings of the
preview's prompt and the final one from the edge's own text encoder; `word_edits` the word-level edit
distance. The strength the predictor picks is the least of an objective written in predictor.py's docstring
(latency, a load term that grows as u / (1 - u), and the price of a miss, `miss_s`, an assumption).

**Training data.** Generated here from the world: {d['pairs']} training pairs (seed {d['seed']}) and
{d['held_out_pairs']} held-out pairs (seed {d['seed'] + 1}); pair k changes k % 4 of the preview scene's three
attributes. The trained world edge model previews the first caption ({d['preview_steps']} DDIM steps, guidance
{d['guidance']}); for each strength in {d['strengths']} the trained world cloud re-noises that preview and
denoises it with the second caption ({d['steps']}-step schedule), as `PromptSession.finalize` does; the judge
labels each final. {d['pairs'] * len(d['strengths'])} training examples.

**Command** (resumable: rows are appended to --data as they are made; about {d['train_s']:.0f} s of generation on
one core here, shared with other work):

    {d['command']} --data predictor-data.jsonl

**Weights** (raw feature scale): {weights}.

**Learning curve** (log loss, lower is better; a constant at the held-out success rate
{d['held_out_success_rate']:.3f} scores {d['constant_log_loss']:.4f}):

| training pairs | examples | train log loss | held-out log loss |
| ---: | ---: | ---: | ---: |
{curve}

**Success rate in the training data** by attributes changed (rows) and strength (columns {', '.join(map(str, d['strengths']))}):

| changed | {' | '.join(map(str, d['strengths']))} |
| --- | {' | '.join('---:' for _ in d['strengths'])} |
{by_change}

**What it is not.** It knows the world's prompts and the world's models: for SD v1.5 and a real edge model
it must be retrained on their data (the same command with other models and a judge for their prompts). It does
not look at the preview itself (a preview the edge got wrong is refined as lightly as a right one); it does not
know the link (that enters the objective through the cost model).
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--data", default="predictor-data.jsonl", help="generated rows, appended as made (resumable)")
    ap.add_argument("--out", default=str(WEIGHTS_PATH))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.pairs < 8 or args.held_out < 4:
        raise SystemExit("train_predictor: --pairs >= 8 and --held-out >= 4")
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    models = evaluate.load_models("trained")
    have = {(r["split"], r["k"]) for r in load_rows(data)}
    todo = [("train", p) for p in pairs(args.pairs, args.seed)] + \
           [("held_out", p) for p in pairs(args.held_out, args.seed + 1)]
    todo = [(split, p) for split, p in todo if (split, p[0]) not in have]
    start = time.perf_counter()
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i:i + CHUNK]
        by_split = {}
        for split, p in chunk:
            by_split.setdefault(split, []).append(p)
        t0 = time.perf_counter()
        made = [row for split, ps in by_split.items() for row in generate(ps, models, split)]
        with data.open("a") as f:
            for row in made:
                row["gen_s"] = round((time.perf_counter() - t0) / len(made), 3)  # for the card's training time
                f.write(json.dumps(row) + "\n")
        print(f"  {i + len(chunk)}/{len(todo)} pairs generated, {time.perf_counter() - start:.0f} s", flush=True)
    rows = load_rows(data)
    train = sorted((r for r in rows if r["split"] == "train" and r["k"] < args.pairs), key=lambda r: r["k"])
    held = [r for r in rows if r["split"] == "held_out" and r["k"] < args.held_out]
    hx, hy = design(held)
    curve = []
    for m in sorted({m for m in (8, 16, 32, 64, 128, 256, 512) if m < len(train)} | {len(train)}):
        w = fit(*design(train[:m]))
        curve.append({"pairs": m, "held_out_log_loss": round(log_loss(w, hx, hy), 4),
                      "train_log_loss": round(log_loss(w, *design(train[:m])), 4)})
        print(f"  {m:>4} pairs: held-out log loss {curve[-1]['held_out_log_loss']:.4f}", flush=True)
    weights = fit(*design(train))
    base = sum(hy) / len(hy)
    out = {"features": list(FEATURES), "weights": weights, "strengths": list(STRENGTHS), "steps": STEPS,
           "preview_steps": PREVIEW_STEPS, "guidance": GUIDANCE, "seed": args.seed, "pairs": len(train),
           "held_out_pairs": len(held), "curve": curve,
           "held_out_success_rate": round(base, 4),
           "constant_log_loss": round(-(base * torch.log(torch.tensor(base)) +
                                        (1 - base) * torch.log(torch.tensor(1 - base))).item(), 4),
           "success_by_change": {str(c): [round(sum(r["success"][j] for r in train if r["changed"] == c) /
                                          max(1, sum(1 for r in train if r["changed"] == c)), 3)
                                          for j in range(len(STRENGTHS))] for c in range(4)},
           "command": f"python -m latentwire.pipelines.diffusionx.train_predictor --pairs {args.pairs} "
                      f"--held-out {args.held_out} --seed {args.seed}"}
    timed = [r["gen_s"] for r in rows if "gen_s" in r]  # rows made before gen_s was kept count at the mean
    out["train_s"] = round(sum(timed) / max(1, len(timed)) * len(rows), 1)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out).with_name("PREDICTOR_CARD.md").write_text(card(out))
    print(f"wrote {args.out}: held-out log loss {curve[-1]['held_out_log_loss']:.4f} (a constant: "
          f"{out['constant_log_loss']:.4f})")


if __name__ == "__main__":
    main()
