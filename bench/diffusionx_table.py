"""DiffusionX reproduced: multi-round prompt sessions on the world, the noise-level predictor against fixed
strengths and against every round on the cloud or on the edge, as the README's table.

    .venv/bin/python bench/diffusionx_table.py [--traces 128] [--seed 23] [--links lte,wifi] [--loads 0,0.9]

Traces (held out: the predictor was trained on seeds 11 and 12): trace k has 1 + k % 5 rounds; its first
prompt is world.sample_scenes(traces, seed)[k]'s caption, and each later round changes one attribute of
the one before (which and to what from the trace's generator), as a person refines a prompt; in odd traces
the final prompt changes one attribute more (typed with /final, never previewed). Every generation runs on
the world models in this process (what two processes equal); quality is the judge's on each session's final
image against the final prompt (attribute accuracy, all three right, Fréchet distance against renders of
the final scenes); time and cloud GPU-seconds are the cost model's on sd-v1-5@a100 and the estimated
bk-sdm-tiny@galaxy-s24 (the A100's text encoding assumed 0), per session:

    DiffusionX    rounds x preview (edge, 8 steps) + the final (the cloud refines the last preview at
                  strength s, 20-step schedule; s fixed, or the predictor's at the load and link)
    cloud         every round and the final a cloud-only generation (SD v1.5's place: "SD v1.5")
    edge          every round and the final an edge-only generation, 20 steps ("Tiny-SD"'s place)

Load u enters as the cost model's M/D/1 queue wait on every cloud request, and in the predictor's objective.
"""
import argparse
import random
import sys

import torch

from latentwire.pipelines import evaluate, judge, world
from latentwire.pipelines.diffusionx import PromptSession
from latentwire.pipelines.diffusionx.predictor import STRENGTHS, WEIGHTS_PATH, NoisePredictor, strength_costs
from latentwire.pipelines.diffusionx.train_predictor import changed
from latentwire.scheduler import make
from latentwire.scheduler.cost.model import predict
from latentwire.scheduler.cost.profiles import apply_assumptions, load_device, load_link

CLOUD, EDGE, ASSUME = "sd-v1-5@a100", "bk-sdm-tiny@galaxy-s24", "cloud.text_encode_s=0"
STEPS, PREVIEW_STEPS, GUIDANCE = 20, 8, evaluate.EVAL_GUIDANCE
FIXED = (0.3, 0.5, 0.7, 1.0)


def traces(n, seed):
    """[(preview scenes, final scene, noise seed)]: see the module doc."""
    out = []
    for k, first in enumerate(world.sample_scenes(n, seed)):
        rng = random.Random(seed * 7919 + k)
        rounds = [first]
        for _ in range(k % 5):
            rounds.append(changed(rounds[-1], 1, rng))
        final = changed(rounds[-1], 1, rng) if k % 2 else rounds[-1]
        out.append((rounds, final, seed * 1_000_003 + k))
    return out


def quality(latents, scenes, models, seed):
    images = evaluate.to_pixels(models["edge"], torch.cat(latents))
    return evaluate.score(images, scenes, seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=128)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--links", default="lte,wifi")
    ap.add_argument("--loads", default="0,0.9")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = evaluate.load_models("trained")
    edge = models["edge"]
    cloud_p, edge_p, _ = apply_assumptions([ASSUME], load_device(CLOUD), load_device(EDGE))
    links = {name: load_link(name) for name in args.links.split(",")}
    loads = [float(u) for u in args.loads.split(",")]
    predictors = {name: NoisePredictor.load(strength_costs(STEPS, cloud_p, edge_p, lk)) for name, lk in links.items()}
    data = traces(args.traces, args.seed)
    finals = [t[1] for t in data]

    # what each policy's final image is, per trace: finals at each strength used (made on demand, kept)
    at = [{} for _ in data]
    last = []
    for k, (rounds, final, noise_seed) in enumerate(data):
        session = PromptSession(edge, models["cloud"], steps=STEPS, preview_steps=PREVIEW_STEPS, seed=noise_seed,
                                guidance_scale=GUIDANCE)
        for scene in rounds:
            session.preview(world.caption(scene))
        last.append(session)
        if k % 16 == 15:
            print(f"  {k + 1}/{len(data)} traces previewed", file=sys.stderr, flush=True)

    def final_at(k, s):
        if s not in at[k]:
            at[k][s] = last[k].finalize(world.caption(finals[k]), strength=s).latent
        return at[k][s]

    choices = {}  # (link, load) -> [strength per trace]
    for name, p in predictors.items():
        for u in loads:
            choices[name, u] = [p.choose_for(edge, last[k].last_preview.prompt, world.caption(finals[k]), u).strength
                                for k in range(len(data))]
    scores = {}
    for s in FIXED:
        scores[f"fixed {s}"] = quality([final_at(k, s) for k in range(len(data))], finals, models, args.seed)
    for key, strengths in choices.items():
        scores[key] = quality([final_at(k, s) for k, s in enumerate(strengths)], finals, models, args.seed)
    print("  finals made", file=sys.stderr, flush=True)
    spec = lambda plan: [evaluate.session(edge.make_scheduler(), plan, f, k, args.seed, GUIDANCE)  # noqa: E731
                         for k, f in enumerate(finals)]
    from latentwire.scheduler import run_plan

    cloud_x = [run_plan(sp, models)[0] for sp in spec(make("cloud-only", STEPS))]
    edge_x = [run_plan(sp, models)[0] for sp in spec(make("edge-only", STEPS))]
    scores["cloud"] = quality(cloud_x, finals, models, args.seed)
    scores["edge"] = quality(edge_x, finals, models, args.seed)
    # the fresh-or-previous question: the same sessions with image-to-image previews, the predictor's final at u=0
    first_link = next(iter(links))
    prev_x = []
    for k, (rounds, final, noise_seed) in enumerate(data):
        session = PromptSession(edge, models["cloud"], steps=STEPS, preview_steps=PREVIEW_STEPS, seed=noise_seed,
                                guidance_scale=GUIDANCE, from_previous=True)
        for scene in rounds:
            session.preview(world.caption(scene))
        s = predictors[first_link].choose_for(edge, session.last_preview.prompt, world.caption(final), 0.0).strength
        prev_x.append(session.finalize(world.caption(final), strength=s).latent)
    scores["previous"] = quality(prev_x, finals, models, args.seed)
    preview_calls_prev = sum(max(1, round(0.6 * PREVIEW_STEPS)) * (len(r) - 1) + PREVIEW_STEPS for r, _, _ in data)

    n_rounds = [len(r) for r, _, _ in data]
    n_gen = [len(r) + (1 if k % 2 else 0) for k, (r, _, _) in enumerate(data)]  # cloud/edge: every round, the final
    print(f"Command: `python bench/diffusionx_table.py --traces {args.traces} --seed {args.seed} --links {args.links} "
          f"--loads {args.loads}`; {len(data)} held-out traces of 1-5 rounds (mean {sum(n_rounds) / len(data):.1f}), "
          f"{STEPS}-step finals, {PREVIEW_STEPS}-step previews; {CLOUD} and {EDGE} (estimated), {ASSUME} assumed\n")
    print("| link | cloud load | sessions | mean strength | time per session s | vs cloud every round | vs edge "
          "every round | cloud GPU s per session | accuracy | all three right | Fréchet |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, lk in links.items():
        cost = predictors[name].cost
        for u in loads:
            c_only = predict(make("cloud-only", STEPS), cloud_p, edge_p, lk, load=u)
            e_only = predict(make("edge-only", STEPS), cloud_p, edge_p, lk)
            preview = predict(make("edge-only", PREVIEW_STEPS), cloud_p, edge_p, lk).latency_s
            rows = [("cloud every round (SD v1.5's place)", None, [g * c_only.latency_s for g in n_gen],
                     [g * c_only.cloud_gpu_s for g in n_gen], scores["cloud"]),
                    ("edge every round (Tiny-SD's place)", None, [g * e_only.latency_s for g in n_gen],
                     [0.0] * len(data), scores["edge"])]
            for s in FIXED:
                rows.append((f"DiffusionX, fixed strength {s}", [s] * len(data),
                             [r * preview + cost(s, u)[0] for r in n_rounds], [cost(s, u)[1]] * len(data),
                             scores[f"fixed {s}"]))
            picks = choices[name, u]
            rows.append(("DiffusionX, the predictor", picks, [r * preview + cost(s, u)[0] for r, s in zip(n_rounds, picks)],
                         [cost(s, u)[1] for s in picks], scores[name, u]))
            base_c = sum(rows[0][2]) / len(data)
            base_e = sum(rows[1][2]) / len(data)
            for label, strengths, times, gpu, q in rows:
                t = sum(times) / len(data)
                ms = "-" if strengths is None else f"{sum(strengths) / len(strengths):.2f}"
                print(f"| {name} | {u:g} | {label} | {ms} | {t:.3f} | {100 * (t / base_c - 1):+.1f}% | "
                      f"{100 * (t / base_e - 1):+.1f}% | {sum(gpu) / len(data):.3f} | {q['attribute_accuracy']:.3f} | "
                      f"{q['all_attributes']:.3f} | {q['frechet_distance']:.0f} |")
    q = scores["previous"]
    print(f"\nPreviews from the previous preview (image-to-image on the edge, strength 0.6: "
          f"{preview_calls_prev / len(data):.1f} edge calls per session against "
          f"{sum(n_rounds) * PREVIEW_STEPS / len(data):.1f} fresh), the predictor's final at load 0 on {first_link}: "
          f"accuracy {q['attribute_accuracy']:.3f}, all three right {q['all_attributes']:.3f}, Fréchet "
          f"{q['frechet_distance']:.0f}; from fresh noise: accuracy {scores[first_link, loads[0]]['attribute_accuracy']:.3f}, "
          f"all three {scores[first_link, loads[0]]['all_attributes']:.3f}, Fréchet "
          f"{scores[first_link, loads[0]]['frechet_distance']:.0f}.")
    print(f"\nPredictor: {WEIGHTS_PATH.name}; its choices per (link, load): " + "; ".join(
        f"{n} u={u:g}: " + ", ".join(f"{s}: {c.count(s)}" for s in STRENGTHS if c.count(s))
        for (n, u), c in choices.items()))


if __name__ == "__main__":
    main()
