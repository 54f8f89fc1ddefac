"""The one-process reference (both sides' models in one process) that a two-process run must equal, and
what every runner shares: a model's device, x_T, a plan's stretches of one side.

A model here is anything with the interface of ``latentwire.pipelines.models.sd.StableDiffusionModel``:
``encode_prompt(prompt, negative) -> (cond, uncond)``, ``predict(x, t, cond, uncond, scheduler=) ->
(pred_cond, pred_uncond)``: the model's raw predictions (epsilon, v or a flow velocity, whatever it was
trained on) (the scheduler scales the model input where it needs to, as Euler's does),
``initial_noise(seed, scheduler=) -> x_T``, and ``latent_space`` / ``text_space`` descriptions; optionally
``device`` and ``dtype`` (default: the CPU, and the dtype of what it is given).
"""
from dataclasses import dataclass, field

import torch

from latentwire.kernels import FusedSampler

from .plan import PlanError
from .segments import SegmentRun, drive


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


def initial_noise(model, seed, scheduler, size=None):
    """x_T from the seed, drawn on the CPU so that every side, whatever its device, draws the same; on the
    model's device in its dtype. size: an upscaler's latent (h, w), its low-resolution image's."""
    if size is not None:
        return model.initial_noise(seed, scheduler=scheduler, generator_device="cpu", size=size)
    return model.initial_noise(seed, scheduler=scheduler, generator_device="cpu")


def model_device(model):
    """Where a model computes: its ``device`` (the embedded and diffusers models have one), else the CPU."""
    return torch.device(getattr(model, "device", "cpu"))


def on_model(model, tensor):
    """A tensor that arrived (on the CPU, in the wire's dtype) on the model's device and in its dtype."""
    if tensor is None:
        return None
    return tensor.to(device=model_device(model), dtype=getattr(model, "dtype", tensor.dtype))


def stretches(plan):
    """The plan's segments grouped into maximal runs of one side -> [(a, b)]: segments [a, b) in turn."""
    out, a = [], 0
    for j in range(1, len(plan.segments) + 1):
        if j == len(plan.segments) or plan.segments[j].side != plan.segments[a].side:
            out.append((a, j))
            a = j
    return out


def run_plan(spec, models):
    """One process, both models: the reference a split run must equal. -> (latent, Summary). Each model
    runs on its own device; the latent moves between them as it would cross the wire."""
    plan = spec.plan
    check_models(plan, models)
    scheduler = spec.make_scheduler()
    samplers, conditioning = {}, {}
    x = state = None
    summary = Summary(plan=plan.name, steps=plan.num_steps, labels=plan.labels())
    for a, b in stretches(plan):
        side = plan.segments[a].side
        model = models[side]
        if a:
            summary.handoffs += 1
            if spec.restart_solver:
                state = None
        if side not in samplers:
            samplers[side] = FusedSampler(scheduler, device=model_device(model))
            conditioning[side] = model.encode_prompt(spec.prompt, spec.negative_prompt)
        x = initial_noise(model, spec.seed, scheduler) if x is None else on_model(model, x)
        state = None if state is None else state.map(lambda t: on_model(model, t))
        run = drive(SegmentRun(spec, plan.segments[a:b], samplers[side], conditioning[side], x, state), model)
        x, state = run.x, run.state
        setattr(summary, f"{side}_model_calls", getattr(summary, f"{side}_model_calls") + run.calls)
        summary.forecast_steps += run.forecasts
    return x, summary
