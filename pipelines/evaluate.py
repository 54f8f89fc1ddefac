"""Quality of a split plan, measured exactly on the procedural world: `latentwire eval`.

    evaluate_plan(make("hybrid-sd", 20), models, n=256)
    -> {"attribute_accuracy": 0.93, "all_attributes": 0.81, "frechet_distance": 41.2,
        "cloud_model_calls": 8.0, "edge_model_calls": 12.0, "wall_s": 61.3, ...}

Prompt k is the caption of world.sample_scenes(n, seed)[k], with noise seed seed * 1_000_003 + k; each
generation runs through the one-process reference executor (scheduler.run_plan, which a two-process run
equals), is decoded by the shared VAE, and the judge (pipelines/judge.py) reads it: attribute_accuracy is
the share of the 3n prompted attributes it finds, all_attributes the share of images with all three right,
frechet_distance the Fréchet distance of judge features against renders of the same scenes. Model calls
are per generation. Deterministic for given seeds and thread count.
"""
import time

import torch

from latentwire.scheduler import SessionSpec, run_plan

from . import judge, world

EVAL_SEED = 7        # prompts: world.sample_scenes(n, EVAL_SEED); noise seeds EVAL_SEED * 1_000_003 + k
EVAL_GUIDANCE = 3.0  # classifier-free guidance scale of every evaluated generation
CLOUD_MODELS = ("trained", "ideal")  # what runs the cloud's steps: the world-sd-cloud UNet, or the exact denoiser


def load_models(cloud="trained"):
    """{"cloud", "edge"}: the embedded world models; cloud="ideal" puts the exact denoiser in the cloud."""
    from . import embedded
    from .models.sd import StableDiffusionModel

    if cloud not in CLOUD_MODELS:
        raise ValueError(f"cloud must be one of {', '.join(CLOUD_MODELS)}, got {cloud!r}")
    if cloud == "ideal":
        from .ideal import IdealDenoiser

        cloud_model = IdealDenoiser.from_pretrained(embedded.CLOUD_PATH)
    else:
        cloud_model = StableDiffusionModel.from_pretrained(embedded.CLOUD_PATH)
    return {"cloud": cloud_model, "edge": StableDiffusionModel.from_pretrained(embedded.EDGE_PATH)}


def session(scheduler, plan, scene, k, seed=EVAL_SEED, guidance=EVAL_GUIDANCE):
    """The SessionSpec of prompt k: the scene's caption, the models' scheduler, noise seed from k."""
    return SessionSpec(prompt=world.caption(scene), plan=plan, scheduler=type(scheduler).__name__,
                       scheduler_config=dict(scheduler.config), guidance_scale=guidance,
                       seed=seed * 1_000_003 + k)


def to_pixels(model, latents):
    """(N, C, H, W) latents -> (N, 3, 32, 32) images in [-1, 1], as the pipeline postprocesses them."""
    return model.decode(latents, output_type="pt") * 2 - 1


def score(images, scenes, seed=EVAL_SEED):
    """The quality half of evaluate_plan's answer, for images generated for ``scenes``."""
    scores = judge.attribute_scores(images, scenes)
    mean = sum(scores[a] for a in world.ATTRIBUTES) / len(world.ATTRIBUTES)
    return {"attribute_accuracy": round(mean, 4), "all_attributes": round(scores["all"], 4),
            "frechet_distance": round(judge.frechet_distance(images, world.render(scenes, seed)), 2),
            **{f"{a}_accuracy": round(scores[a], 4) for a in world.ATTRIBUTES}}


@torch.no_grad()
def generate(plan, models, n=256, seed=EVAL_SEED, guidance=EVAL_GUIDANCE, progress=None):
    """The final latents of the n prompts with ``plan`` -> (latents (n, C, H, W), scenes, cloud calls, edge
    calls), the calls summed over the prompts."""
    scenes = world.sample_scenes(n, seed)
    latents, cloud_calls, edge_calls = [], 0, 0
    scheduler = models["cloud"].make_scheduler()
    for k, scene in enumerate(scenes):
        x, summary = run_plan(session(scheduler, plan, scene, k, seed, guidance), models)
        latents.append(x)
        cloud_calls += summary.cloud_model_calls
        edge_calls += summary.edge_model_calls
        if progress is not None:
            progress(k + 1, n)
    return torch.cat(latents), scenes, cloud_calls, edge_calls


def latent_distance(latents, reference):
    """The mean over prompts of ||x - x_ref|| / ||x_ref||: how far a plan's final latents are from a
    reference's on the same prompts and noise (the search's cheap proxy for quality lost; no judge)."""
    diff = (latents - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def evaluate_plan(plan, models, n=256, seed=EVAL_SEED, guidance=EVAL_GUIDANCE, progress=None):
    """Generate the n prompts with ``plan`` and score them (see the module docstring) -> dict."""
    start = time.perf_counter()
    latents, scenes, cloud_calls, edge_calls = generate(plan, models, n, seed, guidance, progress)
    wall = time.perf_counter() - start
    images = to_pixels(models["edge"], latents)
    return {"plan": plan.name, "steps": plan.num_steps, "n": n, **score(images, scenes, seed),
            "cloud_model_calls": cloud_calls / n, "edge_model_calls": edge_calls / n, "wall_s": round(wall, 2)}
