"""A Stable Diffusion XL model taken apart into the pieces a split generation needs: text embeddings, one
UNet evaluation with SDXL's added conditions, the initial noise, the VAE decode. Each piece computes exactly
what diffusers' StableDiffusionXLPipeline computes at that point (SDXL-Base, SSD-1B, Vega and other
refiner-free SDXL folders), so a loop of ``predict`` and ``FusedSampler.step`` reproduces the pipeline
(``generate`` is that loop: the single-process reference).

    model = StableDiffusionXLModel.from_pretrained(path)       # a StableDiffusionXLPipeline folder
    cond, uncond = model.encode_prompt("a red circle")         # (embeds (1, L, D1 + D2), pooled (1, P)) each
    sched = model.make_scheduler(); sched.set_timesteps(steps)
    sampler = FusedSampler(sched)
    x = model.initial_noise(seed, scheduler=sched)             # x_T: (B, 4, H, W)
    for i, t in enumerate(sampler.timesteps):
        eps_c, eps_u = model.predict(x, t, cond, uncond, scheduler=sched)
        x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=g, state=state)
    images = model.decode(x)

Symbols: x_t the latent at timestep t; u(x_t, t, c, p, tau) the UNet's raw prediction under token embeddings
c (both CLIP encoders' penultimate hidden states side by side), pooled embedding p (the second encoder's
projected text embedding) and time ids tau = (original_size, crops_coords_top_left, target_size); c_in(t)
the input scaling of k-diffusion-style schedulers (Euler, SDXL's default: 1 / sqrt(sigma_t^2 + 1)).
"""
import json
import os
from typing import NamedTuple

import torch

from .sd import SCHEDULER_CONFIG, LatentSpace, _placed, scale_model_input, scheduler_class_named
from .common import PipelineModel, batch_embeds, check_unet, guidance_rows, require_subfolders

SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
MODEL_INDEX = "model_index.json"


class TextSpace(NamedTuple):
    """What the UNet sees of a prompt: (1, max_length, hidden_size + hidden_size_2) token embeddings (the two
    encoders' penultimate hidden states side by side) and a (1, pooled_size) pooled embedding, of token ids
    < vocab_size and < vocab_size_2. SDXL-Base, SSD-1B, Vega: (768, 1280, 1280, 77, 49408, 49408). Its six
    fields tell it from SD's three-field TextSpace (hidden_size, max_length, vocab_size)."""

    hidden_size: int
    hidden_size_2: int
    pooled_size: int
    max_length: int
    vocab_size: int
    vocab_size_2: int


class StableDiffusionXLModel(PipelineModel):
    """Both tokenizers and CLIP text encoders, UNet, VAE and the scheduler config of one StableDiffusionXLPipeline
    folder.

    Attributes: latent_shape (C, H, W) of one latent at the pipeline's default size (SDXL: (4, 128, 128) for
    1024 x 1024); text_space and latent_space, which two models must share for one to continue the other's
    generation; time_ids (1, 6), the added time condition at that size; force_zeros_for_empty_prompt, the
    folder's (model_index.json); scheduler, a fresh instance of the folder's scheduler; device, dtype.
    """

    family = "sdxl"

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler_config, *,
                 force_zeros_for_empty_prompt=True, device="cpu", dtype=torch.float32):
        from diffusers.image_processor import VaeImageProcessor

        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise ValueError(f"the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs from the text "
                             f"encoders' hidden sizes {text_encoder.config.hidden_size} + "
                             f"{text_encoder_2.config.hidden_size}: not one SDXL model's components")
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError(f"the tokenizers pad to {tokenizer.model_max_length} and {tokenizer_2.model_max_length} "
                             "tokens; SDXL concatenates both encoders' states token by token, so they must agree")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"the UNet's addition_embed_type is {unet.config.addition_embed_type!r}, not 'text_time': "
                             "not an SDXL UNet")
        check_unet(unet, vae)
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = tuple(_placed(m, self.device, dtype) for m in (text_encoder, text_encoder_2))
        self.unet, self.vae = (_placed(m, self.device, dtype) for m in (unet, vae))
        self.scheduler_config = scheduler_config
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline derives it
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        size = unet.config.sample_size  # default_sample_size: the image is sample_size * vae_scale_factor a side
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (unet.config.in_channels, h, w)
        projection = text_encoder_2.config.projection_dim
        self.text_space = TextSpace(text_encoder.config.hidden_size, text_encoder_2.config.hidden_size, projection,
                                    tokenizer.model_max_length, text_encoder.config.vocab_size,
                                    text_encoder_2.config.vocab_size)
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor,
                                        float(vae.config.scaling_factor))
        self.time_ids = self._time_ids((h * self.vae_scale_factor, w * self.vae_scale_factor), projection)
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads the folder ``path`` (as StableDiffusionXLPipeline.save_pretrained lays it out) with each
        component's own from_pretrained, from local files only."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        require_subfolders(path, SUBFOLDERS, "Stable Diffusion XL", "StableDiffusionXLPipeline", " (a refiner has no text_encoder/tokenizer and is not supported)")
        local = dict(local_files_only=True)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, **local) for s in ("tokenizer", "tokenizer_2")]
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype,
                                                                     **local)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        with open(os.path.join(path, "scheduler", SCHEDULER_CONFIG)) as f:
            scheduler_class = scheduler_class_named(json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **local)
        with open(os.path.join(path, MODEL_INDEX)) as f:
            index = json.load(f)
        if index.get("requires_aesthetics_score"):
            raise ValueError(f"{path!r} is a refiner (requires_aesthetics_score): latentwire serves refiner-free "
                             "SDXL folders (SDXL-Base, SSD-1B, Vega)")
        return cls(*tokenizers, text_encoder, text_encoder_2, unet, vae, scheduler.config,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   device=device, dtype=dtype)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config: of the folder's class, or of diffusers class ``name``
        (e.g. "DDIMScheduler"), built with from_config as one swaps a pipeline's scheduler. (Unlike
        StableDiffusionPipeline, StableDiffusionXLPipeline corrects no config value: neither do we.)"""
        cls = scheduler_class_named(name or self.scheduler_config["_class_name"])
        return cls.from_config(dict(self.scheduler_config))

    def timestep_kwargs(self, steps=None):
        """set_timesteps takes nothing more for this family."""
        return {}

    def _time_ids(self, size, projection):
        """tau = (original_size, crops_coords_top_left, target_size) = (size, (0, 0), size): (1, 6) in self.dtype,
        as the pipeline's _get_add_time_ids makes it at its default size, with its check of the UNet's width."""
        ids = [*size, 0, 0, *size]
        passed = self.unet.config.addition_time_embed_dim * len(ids) + projection
        expected = self.unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"the UNet's added embedding takes {expected} values, but {len(ids)} time ids of "
                             f"addition_time_embed_dim {self.unet.config.addition_time_embed_dim} and a pooled "
                             f"embedding of projection_dim {projection} make {passed}: not one SDXL model's components")
        return torch.tensor([ids], dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond), each (embeds (1, L, D1 + D2), pooled (1, P)) in self.dtype; L = text_space.max_length,
        D1, D2, P = its hidden_size, hidden_size_2, pooled_size.

        embeds: both encoders' penultimate hidden states (hidden_states[-2]) concatenated along features;
        pooled: the second encoder's projected text_embeds. Like the pipeline, each tokenizer pads to L tokens
        and truncates longer prompts. An empty negative prompt is the pipeline's default (negative_prompt=None):
        zeros when the folder's force_zeros_for_empty_prompt is set (SDXL-Base's is), else "" encoded.
        """
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        cond = self._embed(prompt)
        if not negative_prompt and self.force_zeros_for_empty_prompt:
            return cond, tuple(torch.zeros_like(e) for e in cond)
        return cond, self._embed(negative_prompt)

    def _embed(self, text):
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if out[0].dim() == 2:  # CLIPTextModelWithProjection's text_embeds: the pooled embedding
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(u(c_in x_t, t, cond), u(c_in x_t, t, uncond)): the UNet's two raw predictions at x_t, unguided, in
        the scheduler's prediction_type (epsilon for SDXL-Base, SSD-1B and Vega).

        x: (B, C, H, W) latents x_t, in self.dtype.
        t: the timestep, an element of scheduler.timesteps (a 0-d tensor or number), or a (B,) tensor of them.
        cond, uncond: (embeds (1 or B, L, D1 + D2), pooled (1 or B, P)) from encode_prompt (the engine stacks
            several sessions' rows). With uncond=None only cond is evaluated (the pipeline does that at
            guidance_scale <= 1) and the second result is None.
        scheduler: the scheduler whose timesteps t comes from, after set_timesteps (default self.scheduler);
            its scale_model_input gives c_in. It must not have been stepped by diffusers itself.
        guidance: unused (guidance combines the two predictions outside, in the fused step).

        One UNet call on the batch cat([x, x]) with encoder_hidden_states cat([uncond embeds, cond embeds]) and
        added_cond_kwargs {"text_embeds": cat([uncond pooled, cond pooled]), "time_ids": tau repeated to 2B rows},
        as the pipeline batches classifier-free guidance.
        """
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.latent_shape[0]:
            raise ValueError(f"x must be (B, {self.latent_shape[0]}, H, W), got {tuple(x.shape)}")
        pairs = [cond] if uncond is None else [uncond, cond]
        space = self.text_space
        length, width, pooled_width = space.max_length, space.hidden_size + space.hidden_size_2, space.pooled_size
        embeds, pooled = [], []
        for c in pairs:
            if not (isinstance(c, tuple) and len(c) == 2):
                raise ValueError("SDXL conditioning must be the (embeds, pooled) pair encode_prompt returns, got "
                                 f"{type(c).__name__}")
            e, p = c
            embeds.append(batch_embeds(e, b, length, width))
            if p.dim() != 2 or p.shape[0] != e.shape[0] or p.shape[1] != pooled_width:
                raise ValueError(f"pooled embeddings must be ({e.shape[0]}, {pooled_width}), got {tuple(p.shape)}")
            pooled.append(p.expand(b, -1))
        k = len(pairs)
        x_in, t = guidance_rows(x, t, k)
        x_in = scale_model_input(scheduler if scheduler is not None else self.scheduler, x_in, t)
        added = {"text_embeds": torch.cat(pooled), "time_ids": self.time_ids.repeat(k * b, 1)}
        out = self.unet(x_in, t, encoder_hidden_states=torch.cat(embeds), added_cond_kwargs=added,
                        return_dict=False)[0]
        if k == 1:
            return out, None
        eps_uncond, eps_cond = out.chunk(2)
        return eps_cond, eps_uncond

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, C, H, W) -> B images as the pipeline returns them: a list of PIL images ("pil"), a
        (B, 3, H*f, W*f) tensor in [0, 1] ("pt") or a (B, H*f, W*f, 3) array ("np"); f = vae_scale_factor.

        As the pipeline: a float16 VAE with force_upcast (SDXL's overflows in float16) decodes in float32;
        a VAE with latents_mean and latents_std denormalizes with them. No invisible watermark is applied.
        """
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        vae, config = self.vae, self.vae.config
        upcast = vae.dtype == torch.float16 and config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latent = latent.to(device=self.device, dtype=vae.dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                view = lambda v: torch.tensor(v).view(1, -1, 1, 1).to(latent.device, latent.dtype)  # noqa: E731
                latent = latent * view(std) / config.scaling_factor + view(mean)
            else:
                latent = latent / config.scaling_factor
            image = vae.decode(latent, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return self.image_processor.postprocess(image, output_type=output_type)
