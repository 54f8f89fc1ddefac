"""Runs a split plan's segments: the per-side runner the daemons share, and the one-process reference
(both sides' models in one process) that a two-process run must equal.

A model here is anything with the interface of ``latentwire.pipelines.sd.StableDiffusionModel``:
``encode_prompt(prompt, negative) -> (cond, uncond)``, ``eps(x, t, cond, uncond, scheduler=) ->
(eps_cond, eps_uncond)`` (the scheduler scales the model input where it needs to, as Euler's does),
``initial_noise(seed, scheduler=) -> x_T``, and ``latent_space`` / ``text_space`` descriptions.
"""
from dataclasses import dataclass, field

from latentwire.kernels import FusedSampler, run_steps

from .plan import PlanError, forecaster
from .session import renoise_noise, step_noise


@dataclass
class Summary:
    """What a generation cost: model calls per side, forecast steps, handoffs."""

    plan: str
    steps: int
    cloud_model_calls: int = 0
    edge_model_calls: int = 0
    forecast_steps: int = 0
    handoffs: int = 0
    degraded: bool = False  # the cloud went away and the edge finished its steps
    labels: list = field(default_factory=list)  # per executed step: (index, 'cloud' | 'edge' | 'forecast')


def check_models(plan, models):
    """Both sides of a plan must share the latent space and the text-embedding space."""
    sides = {seg.side for seg in plan.segments}
    missing = sides - set(models)
    if missing:
        raise PlanError(f"plan {plan.name!r} needs a {' and '.join(sorted(missing))} model")
    if len(sides) == 2:
        cloud, edge = models["cloud"], models["edge"]
        for what in ("latent_space", "text_space"):
            if getattr(cloud, what) != getattr(edge, what):
                raise PlanError(f"plan {plan.name!r}: the cloud and edge models differ in {what.replace('_', ' ')} "
                                f"({getattr(cloud, what)} vs {getattr(edge, what)}); a handoff needs both the same")


def initial_noise(model, seed, scheduler):
    """x_T from the seed, drawn on the CPU so that every side, whatever its device, draws the same."""
    return model.initial_noise(seed, scheduler=scheduler, generator_device="cpu")


def run_segment(spec, seg, sampler, model, conditioning, x, state, callback=None):
    """Run one segment of ``spec.plan`` from latent x (and solver state) -> (x, state, model calls).
    conditioning: (cond, uncond) text embeddings from this side's own text encoder."""
    cond, uncond = conditioning
    g = float(spec.guidance_scale)
    if seg.renoise:  # preview-refine: the incoming latent is a clean preview
        t = sampler.timesteps[seg.start:seg.start + 1]
        x = sampler.scheduler.add_noise(x, renoise_noise(spec.seed, x.shape, x.dtype).to(x.device), t)
        state = None

    def guided(x, i, t):
        eps_c, eps_u = model.eps(x, t, cond, uncond, scheduler=sampler.scheduler)
        return [eps_u, eps_c], [1.0 - g, g]

    noise = (lambda i: step_noise(spec.seed, x.shape, i).to(x.device)) if sampler.stochastic else None
    return run_steps(sampler, x, guided, forecaster(seg), start=seg.start, stop=seg.stop, state=state,
                     noise=noise, callback=callback)


def run_plan(spec, models, device="cpu"):
    """One process, both models: the reference a split run must equal. -> (latent, Summary)."""
    plan = spec.plan
    check_models(plan, models)
    scheduler = spec.make_scheduler()
    sampler = FusedSampler(scheduler, device=device)
    conditioning = {}
    x = initial_noise(models[plan.segments[0].side], spec.seed, scheduler).to(device)
    state = None
    summary = Summary(plan=plan.name, steps=plan.num_steps, labels=plan.labels())
    for j, seg in enumerate(plan.segments):
        if j and seg.side != plan.segments[j - 1].side:
            summary.handoffs += 1
            if spec.restart_solver:
                state = None
        if seg.side not in conditioning:
            conditioning[seg.side] = models[seg.side].encode_prompt(spec.prompt, spec.negative_prompt)
        x, state, calls = run_segment(spec, seg, sampler, models[seg.side], conditioning[seg.side], x, state)
        setattr(summary, f"{seg.side}_model_calls", getattr(summary, f"{seg.side}_model_calls") + calls)
        summary.forecast_steps += (seg.stop - seg.start) - calls
    return x, summary
