"""Model families behind one interface, each loaded from its diffusers folder with the real from_pretrained.

    model = load_model(path, device="cuda", dtype=torch.float16)   # the family from model_index.json

Every family's model class has what a split generation needs (the runners, scheduler/segments.py and
scheduler/engine.py, use nothing else):

    from_pretrained(path, device="cpu", dtype=torch.float32)
    family                      "sd", "sdxl", "sd3", "flux", "cogvideox"
    device, dtype
    latent_shape                one latent without the batch dim: (C, H, W), or (F, C, H, W) for video
    latent_space, text_space    NamedTuples of plain values: two models can continue each other's
                                generation only if both are equal (a handoff checks them)
    scheduler_config, scheduler the folder's scheduler (config, and a fresh instance)
    make_scheduler(name=None)   a fresh scheduler from the folder's config, of its class or of ``name``
    timestep_kwargs(steps)      extra set_timesteps arguments the family's pipeline passes for ``steps``
                                inference steps (Flux's mu and sigmas), or {}
    encode_prompt(prompt, negative_prompt="") -> (cond, uncond)
                                each a tensor, or a tuple of tensors, with a batch dim of 1
    predict(x, t, cond, uncond=None, *, scheduler=None, guidance=None) -> (pred_cond, pred_uncond)
                                the model's raw predictions (epsilon, v or a flow velocity) at x (B, ...);
                                t a timestep or a (B,) tensor; guidance the classifier-free guidance scale
                                (a float or (B,)): a guidance-distilled model (Flux) takes it as an
                                embedding, runs once and returns its prediction twice, so that the runner's
                                guided combination (1 - g) u + g c is that prediction
    initial_noise(seed, batch=1, *, scheduler=None, generator_device=None) -> x_T
    decode(latent, output_type="pil") -> images (a video: a list of frames per latent)

"sd-upscale" (StableDiffusionUpscalePipeline folders, sd_upscale.py) also conditions on a low-res image:
condition(encode_prompt(...), image, seed, noise_level) -> (cond, uncond) tuples, what its predict takes.
"""
import json
import logging
import os

# diffusers warns at every model load (twice a daemon start) that `accelerate` is missing and it loads with
# low_cpu_mem_usage=False. Silenced on purpose, this one message only: with diffusers 0.42 both paths skip
# the random initialisation, and bench/accelerate_load.py measured them equal (an 860 M-parameter UNet:
# 3.74 s and 5435 MiB peak without accelerate, 3.72 s and 5436 MiB with it), so latentwire does not
# require accelerate; where it is installed, diffusers uses it and never warns.
ACCELERATE_WARNING = "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: not record.getMessage().startswith(ACCELERATE_WARNING))

from .sd import StableDiffusionModel  # noqa: E402 - after the filter, which every family's load passes

# model_index.json's _class_name -> (module, class) of the family that loads it
FAMILIES = {
    "StableDiffusionPipeline": ("sd", "StableDiffusionModel"),
    "StableDiffusionXLPipeline": ("sdxl", "StableDiffusionXLModel"),
    "StableDiffusion3Pipeline": ("sd3", "StableDiffusion3Model"),
    "FluxPipeline": ("flux", "FluxModel"),
    "CogVideoXPipeline": ("cogvideox", "CogVideoXModel"),
    "StableDiffusionUpscalePipeline": ("sd_upscale", "StableDiffusionUpscaleModel"),
}


class UnsupportedModel(ValueError):
    """A folder no family here loads; the text names the folder's pipeline class and the supported ones."""


def pipeline_class(path):
    """The diffusers pipeline class a folder was saved by (model_index.json's _class_name)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UnsupportedModel(f"{path!r} has no model_index.json: give a folder a diffusers pipeline's "
                               "save_pretrained wrote")
    with open(index) as f:
        return json.load(f).get("_class_name")


def load_model(path, device="cpu", dtype=None):
    """The model of the diffusers folder ``path``, by its family, on ``device`` in ``dtype`` (default float32)."""
    import importlib

    import torch

    name = pipeline_class(path)
    if name not in FAMILIES:
        raise UnsupportedModel(f"{path!r} holds a {name}; latentwire loads {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name]
    family = getattr(importlib.import_module(f".{module}", __name__), cls)
    return family.from_pretrained(path, device=device, dtype=torch.float32 if dtype is None else dtype)


__all__ = ["FAMILIES", "StableDiffusionModel", "UnsupportedModel", "load_model", "pipeline_class"]
