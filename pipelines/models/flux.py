"""A Flux model taken apart into the pieces a split generation needs: text embeddings, one transformer
evaluation, the initial noise, the VAE decode. Each piece computes exactly what diffusers' FluxPipeline
computes at that point, so a loop of ``predict`` and ``FusedSampler.step`` reproduces the pipeline
(``generate`` is that loop: the single-process reference).

    model = FluxModel.from_pretrained(path)                       # a FluxPipeline folder
    cond, uncond = model.encode_prompt("a red circle")            # ((1, L, D), (1, P)) each; uncond is cond
    sched = model.make_scheduler(); sched.set_timesteps(steps, **model.timestep_kwargs())
    sampler = FusedSampler(sched)
    x = model.initial_noise(seed)                                 # x_1: (B, 16, h, w), unpacked
    for i, t in enumerate(sampler.timesteps):
        v, _ = model.predict(x, t, cond, uncond, guidance=3.5)   # the flow velocity, once
        x, state = sampler.step(x, i, v, state=state)
    images = model.decode(x)                                      # B PIL images

Symbols (rectified flow, Esser et al. 2024): x_sigma = (1 - sigma) x_0 + sigma eps, the transformer's
velocity v(x_sigma, sigma, c, g) ~ eps - x_0 under text c = (T5 embeddings, CLIP pooled) and the distilled
guidance scale g (an embedding, FLUX.1-dev: no second, unconditional pass), the timestep t = 1000 sigma.

The latent is the VAE's (16, h, w), h = H / 8: the transformer's (h/2 * w/2, 64) sequence of 2x2 patches is
made inside ``predict`` and undone on its output. Packing is a permutation and the Euler step elementwise,
so stepping the unpacked latent is stepping the pipeline's packed one; and the wire's int8 codec scales
each channel of dim 1 (SPEC.md section 4): 16 channels of 16,384 values at 1024 px here, where the packed
layout's dim 1 would be 4,096 tokens of 64 values each, 4,096 (lo, step) pairs (32 KiB of header).
"""
import os
from typing import NamedTuple

import numpy as np
import torch

from ...kernels import FusedSampler
from .sd import _placed, scheduler_class_named
from .common import PipelineModel, require_subfolders

SUBFOLDERS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and largest max_sequence_length (T5 tokens)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
PATCH = 2  # FluxPipeline packs 2x2 latent patches into one token
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # what steps a flow velocity in the fused step


class TextSpace(NamedTuple):
    """What the transformer sees: T5's (1, max_length, hidden_size) embeddings of token ids < vocab_size, and
    CLIP's (1, pooled_size) pooled output of clip_max_length token ids < clip_vocab_size."""

    hidden_size: int
    max_length: int
    vocab_size: int
    pooled_size: int
    clip_max_length: int
    clip_vocab_size: int


class LatentSpace(NamedTuple):
    """latent = scaling_factor * (VAE encoding - shift_factor), ``channels`` channels at 1 / scale_factor of
    image size (as FluxPipeline decodes it: latent / scaling_factor + shift_factor)."""

    channels: int
    scale_factor: int
    scaling_factor: float
    shift_factor: float


class FluxModel(PipelineModel):
    """CLIP and T5 tokenizers and text encoders, the Flux transformer, the VAE and the scheduler config of one
    FluxPipeline folder.

    Attributes: latent_shape (16, h, w) of one latent at the image size (the VAE config's sample_size:
    FLUX.1's 1024, the pipeline's default 128 * 8; or height/width given to from_pretrained); text_space and
    latent_space, which two models must share for one to continue the other's generation; guidance_embeds,
    whether the transformer takes the guidance scale (FLUX.1-dev) or not (FLUX.1-schnell); txt_ids and
    img_ids, the rotary positions of the text and image tokens; scheduler; device, dtype.
    """

    family = "flux"

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, scheduler_config, *,
                 device="cpu", dtype=torch.float32, height=None, width=None, max_sequence_length=MAX_SEQUENCE_LENGTH):
        from diffusers.image_processor import VaeImageProcessor

        tc = transformer.config
        if tc.patch_size != 1 or tc.in_channels != vae.config.latent_channels * PATCH * PATCH:
            raise ValueError(f"the transformer takes {tc.in_channels} channels (patch_size {tc.patch_size}) but "
                             f"FluxPipeline feeds it 2x2 patches of the VAE's {vae.config.latent_channels}: "
                             "not one model's components")
        if tc.joint_attention_dim != text_encoder_2.config.d_model:
            raise ValueError(f"the transformer's joint_attention_dim {tc.joint_attention_dim} differs from T5's "
                             f"d_model {text_encoder_2.config.d_model}: not one model's components")
        if tc.pooled_projection_dim != text_encoder.config.hidden_size:
            raise ValueError(f"the transformer's pooled_projection_dim {tc.pooled_projection_dim} differs from "
                             f"CLIP's hidden_size {text_encoder.config.hidden_size}: not one model's components")
        if type(max_sequence_length) is not int or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be an int in 1..{MAX_SEQUENCE_LENGTH} (FluxPipeline's "
                             f"limit), got {max_sequence_length!r}")
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2, self.transformer, self.vae = (
            _placed(m, self.device, dtype) for m in (text_encoder, text_encoder_2, transformer, vae))
        self.scheduler_config = scheduler_config
        self.max_sequence_length = max_sequence_length
        self.guidance_embeds = bool(tc.guidance_embeds)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline derives it
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * PATCH)
        size = vae.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        # prepare_latents: "latent height and width have to be divisible by 2" (rounded down)
        step = self.vae_scale_factor * PATCH
        h, w = (PATCH * (int(v or d) // step) for v, d in ((height, default_h), (width, default_w)))
        if h == 0 or w == 0:
            raise ValueError(f"the image must be at least {step} pixels a side, got {height or default_h} x "
                             f"{width or default_w}")
        self.latent_shape = (vae.config.latent_channels, h, w)
        self.image_seq_len = (h // PATCH) * (w // PATCH)
        self.text_space = TextSpace(text_encoder_2.config.d_model, max_sequence_length,
                                    text_encoder_2.config.vocab_size, text_encoder.config.hidden_size,
                                    tokenizer.model_max_length, text_encoder.config.vocab_size)
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor,
                                        float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0))
        # FluxPipeline.encode_prompt's text_ids: zeros, one row per T5 token; _prepare_latent_image_ids: each
        # patch's (0, row, column)
        self.txt_ids = torch.zeros(max_sequence_length, 3, device=self.device, dtype=dtype)
        ids = torch.zeros(h // PATCH, w // PATCH, 3)
        ids[..., 1] += torch.arange(h // PATCH)[:, None]
        ids[..., 2] += torch.arange(w // PATCH)[None, :]
        self.img_ids = ids.reshape(-1, 3).to(device=self.device, dtype=dtype)
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, *, height=None, width=None,
                        max_sequence_length=MAX_SEQUENCE_LENGTH):
        """Loads the folder ``path`` (as FluxPipeline.save_pretrained lays it out) with each component's own
        from_pretrained, from local files only. height, width: the image size in pixels (default: the VAE
        config's sample_size); max_sequence_length: T5 tokens, as the pipeline's argument of that name."""
        import json

        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        require_subfolders(path, SUBFOLDERS, "Flux", "FluxPipeline")
        local = dict(local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
        tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", **local)
        text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **local)
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            scheduler_class = scheduler_class_named(json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **local)
        return cls(tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, scheduler.config,
                   device=device, dtype=dtype, height=height, width=width, max_sequence_length=max_sequence_length)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config: of the folder's class, or of diffusers class ``name``. Flux
        predicts a flow velocity, so only a flow-matching scheduler the fused step runs will do."""
        name = name or self.scheduler_config["_class_name"]
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"scheduler {name!r} cannot step Flux: the transformer predicts a flow velocity; use "
                             f"{' or '.join(FLOW_SCHEDULERS)}, FLUX.1's own")
        return scheduler_class_named(name).from_config(dict(self.scheduler_config))

    def timestep_kwargs(self, steps=None):
        """What FluxPipeline passes set_timesteps besides the step count: mu, the resolution-dependent shift
        (calculate_shift of the image's token count: linear from base_shift at base_image_seq_len tokens to
        max_shift at max_image_seq_len), and, given ``steps``, its sigmas np.linspace(1, 1/steps, steps)
        before the shift (none where the config says use_flow_sigmas, as the pipeline drops them).

        Without sigmas, set_timesteps(steps, mu=mu) would space the unshifted sigmas over [1,
        1/num_train_timesteps] instead: the same first sigma, a last one near 0 where the pipeline's is 1/steps
        (shifted). ``SessionSpec.for_model`` passes the inference steps, and both travel in the session."""
        c = self.scheduler_config
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)  # calculate_shift, in its order of operations
        mu = self.image_seq_len * m + (base_shift - m * base_len)
        kwargs = {"mu": float(mu)}
        if steps is not None and not c.get("use_flow_sigmas", False):
            if type(steps) is not int or steps < 1:
                raise ValueError(f"steps must be an int >= 1, got {steps!r}")
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
        return kwargs

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond), each (prompt_embeds (1, L, D), pooled (1, P)) in self.dtype: T5's last hidden states
        of ``prompt`` padded (or truncated) to L = max_sequence_length tokens, and CLIP's pooled output
        (pooler_output, not projected) of it at CLIP's model_max_length, as FluxPipeline.encode_prompt.

        uncond is cond, the very same tensors: a guidance-distilled Flux takes the guidance scale as an
        embedding and has no unconditional pass, so ``negative_prompt`` is not encoded (the pipeline's
        true_cfg_scale, which would, is not supported)."""
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        clip_ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompt, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        cond = (embeds.to(self.dtype), pooled.to(self.dtype))
        return cond, cond

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(v, v): the transformer's flow velocity at x_t, once, returned twice so that a runner's guided
        combination (1 - g) v + g v is v (up to rounding; FLUX.1-dev distils guidance into the embedding).

        x: (B, 16, h, w) latents x_t, in self.dtype (unpacked; packed into (B, h/2 * w/2, 64) here).
        t: the timestep, an element of scheduler.timesteps (a 0-d tensor or number), or a (B,) tensor of them.
        cond: (prompt_embeds (1 or B, L, D), pooled (1 or B, P)) from encode_prompt. uncond: unused.
        scheduler: unused (flow matching does not scale the model input).
        guidance: the guidance scale g, a float or a (B,) tensor; required when the transformer embeds it
            (guidance_embeds), ignored when it does not (FLUX.1-schnell).

        FluxPipeline.__call__'s one transformer call per step:
            transformer(hidden_states=latents, timestep=t.expand(B) / 1000, guidance=full([1], g).expand(B),
                        pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids, img_ids)
        """
        b = x.shape[0]
        if x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.latent_shape))}), got {tuple(x.shape)}")
        if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
            raise ValueError("cond must be (prompt_embeds, pooled) as FluxModel.encode_prompt returns it")
        embeds, pooled = cond
        space = self.text_space
        length, width, pooled_size = space.max_length, space.hidden_size, space.pooled_size
        if embeds.dim() != 3 or embeds.shape[0] not in (1, b) or tuple(embeds.shape[1:]) != (length, width):
            raise ValueError(f"prompt_embeds must be (1 or {b}, {length}, {width}), got {tuple(embeds.shape)}")
        if pooled.dim() != 2 or pooled.shape[0] not in (1, b) or pooled.shape[1] != pooled_size:
            raise ValueError(f"pooled must be (1 or {b}, {pooled_size}), got {tuple(pooled.shape)}")
        timestep = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if timestep.dim() == 1 and timestep.shape != (b,):
            raise ValueError(f"a per-row t must have shape ({b},), got {tuple(timestep.shape)}")
        timestep = timestep.expand(b).to(self.dtype) / 1000  # sigma, as the pipeline passes it
        g = None
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this transformer embeds the guidance scale (guidance_embeds: FLUX.1-dev-like): "
                                 f"pass guidance=g (FluxPipeline's default is {DEFAULT_GUIDANCE})")
            g = torch.as_tensor(guidance, dtype=torch.float32, device=self.device)
            if g.dim() > 1 or (g.dim() == 1 and g.shape[0] not in (1, b)):
                raise ValueError(f"guidance must be a number or a ({b},) tensor, got shape {tuple(g.shape)}")
            g = g.reshape(-1).expand(b)
        out = self.transformer(hidden_states=pack(x), timestep=timestep, guidance=g,
                               pooled_projections=pooled.expand(b, -1), encoder_hidden_states=embeds.expand(b, -1, -1),
                               txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        v = unpack(out, *self.latent_shape[1:])
        return v, v

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, 16, h, w) -> B images as the pipeline returns them: a list of PIL images ("pil"), a
        (B, 3, 8h, 8w) tensor in [0, 1] ("pt") or a (B, 8h, 8w, 3) array ("np")."""
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        latent = latent.to(device=self.device, dtype=self.vae.dtype)
        latent = latent / self.latent_space.scaling_factor + self.latent_space.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def generate(self, prompt, *, seed, steps, guidance_scale=DEFAULT_GUIDANCE, sigmas=None, batch=1,
                 generator_device=None):
        """x_0: the final (batch, 16, h, w) latent of FluxPipeline(prompt, height=8h, width=8w,
        num_inference_steps=steps, sigmas=sigmas, guidance_scale=..., num_images_per_prompt=batch,
        max_sequence_length=self.max_sequence_length, generator=Generator(generator_device).manual_seed(seed),
        output_type="latent") unpacked, stepped by FusedSampler. sigmas: None (the pipeline's
        np.linspace(1, 1/steps, steps)) or the unshifted sigmas, as the pipeline's argument."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        sched = self.make_scheduler()
        kwargs = self.timestep_kwargs(steps)
        if sigmas is not None:
            kwargs["sigmas"] = list(sigmas)
        sched.set_timesteps(steps if "sigmas" not in kwargs else None, device=self.device, **kwargs)
        sampler = FusedSampler(sched, device=self.device)
        cond, uncond = self.encode_prompt(prompt)
        x = self._noise(self._generator(seed, generator_device), batch)
        state = None
        for i, t in enumerate(sampler.timesteps):
            v, _ = self.predict(x, t, cond, uncond, scheduler=sched, guidance=guidance_scale)
            x, state = sampler.step(x, i, v, state=state)
        return x


def pack(x):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, row-major, each patch's channels c-major
    then its row and column (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens, h, w):
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of ``pack`` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    return tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
