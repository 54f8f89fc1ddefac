"""A Stable Diffusion model taken apart into the pieces a split generation needs: text embeddings, one
guided UNet evaluation, the initial noise, the VAE decode. Each piece computes exactly what
diffusers' StableDiffusionPipeline computes at that point, so a loop of ``predict`` and ``FusedSampler.step``
reproduces the pipeline (``generate`` is that loop: the single-process reference).

    model = StableDiffusionModel.from_pretrained(path)            # a StableDiffusionPipeline folder
    cond, uncond = model.encode_prompt("a red circle")            # (1, L, D) each
    sched = model.make_scheduler(); sched.set_timesteps(steps)
    sampler = FusedSampler(sched)
    x = model.initial_noise(seed, scheduler=sched)                # x_T: (B, C, H, W)
    for i, t in enumerate(sampler.timesteps):
        eps_c, eps_u = model.predict(x, t, cond, uncond, scheduler=sched)
        x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=g, state=state)
    images = model.decode(x)                                      # B PIL images

Symbols: x_t the latent at timestep t, u(x_t, t, c) the UNet's raw prediction (epsilon, v, ...) under text embeddings
c, c_in(t) the input scaling of k-diffusion-style schedulers (Euler: 1 / sqrt(sigma_t^2 + 1)).
"""
import copy
import json
import os
from typing import NamedTuple

import torch

from .common import PipelineModel, batch_embeds, check_unet, guidance_rows, require_subfolders

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"


class TextSpace(NamedTuple):
    """What the UNet's cross-attention sees: (1, max_length, hidden_size) embeddings of token ids < vocab_size."""

    hidden_size: int
    max_length: int
    vocab_size: int


class LatentSpace(NamedTuple):
    """latent = scaling_factor * VAE encoding, with ``channels`` channels at 1 / scale_factor of image size."""

    channels: int
    scale_factor: int
    scaling_factor: float


class StableDiffusionModel(PipelineModel):
    """Tokenizer, CLIP text encoder, UNet, VAE and the scheduler config of one StableDiffusionPipeline folder.

    Attributes: latent_shape (C, H, W) of one latent at the pipeline's default size; text_space and
    latent_space, which two models must share for one to continue the other's generation; scheduler, a
    fresh instance of the folder's scheduler; device, dtype.
    """

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, *, device="cpu", dtype=torch.float32):
        from diffusers.image_processor import VaeImageProcessor

        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(f"the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs from the text "
                             f"encoder's hidden_size {text_encoder.config.hidden_size}: not one model's components")
        check_unet(unet, vae)
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = tokenizer
        self.text_encoder, self.unet, self.vae = (_placed(m, self.device, dtype) for m in (text_encoder, unet, vae))
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline derives it
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        size = unet.config.sample_size  # the pipeline's default image is sample_size * vae_scale_factor a side
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (unet.config.in_channels, h, w)
        self.text_space = TextSpace(text_encoder.config.hidden_size, tokenizer.model_max_length,
                                    text_encoder.config.vocab_size)
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor,
                                        float(vae.config.scaling_factor))
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads the folder ``path`` (as StableDiffusionPipeline.save_pretrained lays it out) with each
        component's own from_pretrained, from local files only."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        require_subfolders(path, SUBFOLDERS, "Stable Diffusion", "StableDiffusionPipeline")
        local = dict(local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        with open(os.path.join(path, "scheduler", SCHEDULER_CONFIG)) as f:
            scheduler_class = scheduler_class_named(json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **local)
        return cls(tokenizer, text_encoder, unet, vae, scheduler.config, device=device, dtype=dtype)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config: of the folder's class, or of diffusers class ``name``
        (e.g. "EulerDiscreteScheduler"), built with from_config as one swaps a pipeline's scheduler."""
        cls = scheduler_class_named(name or self.scheduler_config["_class_name"])
        config = dict(self.scheduler_config)
        # StableDiffusionPipeline.__init__ overrides these two outdated settings; so do we, to stay its equal
        if config.get("steps_offset", 1) != 1:
            config["steps_offset"] = 1
        if config.get("clip_sample", False) is True:
            config["clip_sample"] = False
        return cls.from_config(config)

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond): CLIP's last hidden states of ``prompt`` and ``negative_prompt``, each (1, L, D) in
        self.dtype, L = text_space.max_length, D = text_space.hidden_size. Like the pipeline, pads to L
        tokens and truncates longer prompts to L."""
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        return self._embed(prompt), self._embed(negative_prompt)

    def _embed(self, text):
        tokens = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    family = "sd"

    def timestep_kwargs(self, steps=None):
        """set_timesteps takes nothing more for this family."""
        return {}

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(u(c_in x_t, t, cond), u(c_in x_t, t, uncond)): the UNet's two raw predictions at x_t, unguided, in
        the scheduler's prediction_type (epsilon for SD 1.x, v for SD 2.x-v and the world models).

        x: (B, C, H, W) latents x_t, in self.dtype.
        t: the timestep, an element of scheduler.timesteps (a 0-d tensor or number), or a (B,) tensor of them.
        cond, uncond: (1 or B, L, D) text embeddings. With uncond=None only cond is evaluated (the pipeline
            does that at guidance_scale <= 1) and the second result is None.
        scheduler: the scheduler whose timesteps t comes from, after set_timesteps (default self.scheduler);
            its scale_model_input gives c_in. It must not have been stepped by diffusers itself.
        guidance: unused (guidance combines the two predictions outside, in the fused step).

        One UNet call on the batch cat([x, x]) with embeddings cat([uncond, cond]), as the pipeline batches
        classifier-free guidance.
        """
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.latent_shape[0]:
            raise ValueError(f"x must be (B, {self.latent_shape[0]}, H, W), got {tuple(x.shape)}")
        embeds = [cond] if uncond is None else [uncond, cond]
        embeds = [batch_embeds(e, b, self.text_space.max_length, self.text_space.hidden_size) for e in embeds]
        k = len(embeds)
        x_in, t = guidance_rows(x, t, k)
        x_in = scale_model_input(scheduler if scheduler is not None else self.scheduler, x_in, t)
        out = self.unet(x_in, t, encoder_hidden_states=torch.cat(embeds), return_dict=False)[0]
        if k == 1:
            return out, None
        eps_uncond, eps_cond = out.chunk(2)
        return eps_cond, eps_uncond

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, C, H, W) -> B images as the pipeline returns them: a list of PIL images ("pil"), a
        (B, 3, H*f, W*f) tensor in [0, 1] ("pt") or a (B, H*f, W*f, 3) array ("np"); f = vae_scale_factor."""
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        latent = latent.to(device=self.device, dtype=self.vae.dtype)
        image = self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))

def _placed(module, device, dtype):
    """``module`` on ``device`` in ``dtype``, frozen for inference. Casts only when the dtype differs:
    diffusers warns on every .to(dtype=...), even a no-op one."""
    if module.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


def scheduler_class_named(name):
    """The diffusers scheduler class called ``name`` (e.g. "EulerDiscreteScheduler")."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class; give a name such as "
                         "'DDIMScheduler', 'DPMSolverMultistepScheduler' or 'EulerDiscreteScheduler'")
    return cls


def scale_model_input(scheduler, x, t):
    """c_in(t) x_t, as ``scheduler.scale_model_input(x, t)`` gives it at the start of a generation.

    k-diffusion-style schedulers (Euler) look the step up from t only while their step counter is unset,
    and advance it in step(). FusedSampler never calls step(), so the counter of ``scheduler`` stays unset;
    each call here scales with a shallow copy, which finds t's step and leaves ``scheduler`` untouched.
    t: a number or 0-d tensor, or a (B,) tensor (one per row of x, scaled row group by row group).
    """
    if not hasattr(scheduler, "scale_model_input"):
        return x
    step_index, begin_index = getattr(scheduler, "step_index", None), getattr(scheduler, "begin_index", None)
    if step_index is not None or begin_index is not None:
        raise ValueError(f"{type(scheduler).__name__} has been stepped (step_index {step_index}, begin_index "
                         f"{begin_index}), so its scale_model_input ignores t; use a fresh one "
                         "(StableDiffusionModel.make_scheduler) and set_timesteps on it")
    if not (isinstance(t, torch.Tensor) and t.dim() == 1):
        return _scaled(scheduler, x, t)
    out = torch.empty_like(x)
    for value in t.unique():
        rows = t == value
        out[rows] = _scaled(scheduler, x[rows], value)
    return out


def _scaled(scheduler, x, t):
    try:
        return copy.copy(scheduler).scale_model_input(x, t)
    except IndexError:  # Euler's index_for_timestep found no step at t
        raise ValueError(f"timestep {float(t)} is not in {type(scheduler).__name__}.timesteps; pass the scheduler "
                         "(after set_timesteps) that t comes from") from None
