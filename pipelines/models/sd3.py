"""A Stable Diffusion 3 / 3.5 model taken apart into the pieces a split generation needs: the joint text
embeddings, one guided MMDiT evaluation, the initial noise, the VAE decode. Each piece computes exactly what
diffusers' StableDiffusion3Pipeline computes at that point, so a loop of ``predict`` and ``FusedSampler.step``
(FlowMatchEulerDiscreteScheduler: x_next = x + (sigma_next - sigma) v) reproduces the pipeline.

    model = StableDiffusion3Model.from_pretrained(path)       # a StableDiffusion3Pipeline folder
    cond, uncond = model.encode_prompt("a red circle")        # each (embeds (1, L, D), pooled (1, P))
    sched = model.make_scheduler(); sched.set_timesteps(steps, **model.timestep_kwargs())
    sampler = FusedSampler(sched)
    x = model.initial_noise(seed)                             # x_1: (B, 16, H, W), plain N(0, I)
    for i, t in enumerate(sampler.timesteps):
        v_c, v_u = model.predict(x, t, cond, uncond)
        x, state = sampler.step(x, i, cond=v_c, uncond=v_u, guidance_scale=g, state=state)
    images = model.decode(x)

Symbols (SD3 paper, Esser et al. 2024, "Scaling Rectified Flow Transformers"): x_t = (1 - t) x_0 + t eps with
t = sigma in [0, 1] (the scheduler's timesteps are 1000 sigma, shifted: sigma = s u / (1 + (s - 1) u), s = 3);
v(x_t, t, c) = eps - x_0 the transformer's velocity under the conditioning c = (joint embeddings, pooled).

The conditioning, as the pipeline's encode_prompt builds it (L_c = CLIP's 77 tokens, L_t = 256 T5 tokens):

    h_1 = CLIP-L penultimate hidden states (1, L_c, 768),  p_1 = CLIP-L text_embeds (1, 768)
    h_2 = CLIP-G penultimate hidden states (1, L_c, 1280), p_2 = CLIP-G text_embeds (1, 1280)
    embeds = cat_seq(pad_D(cat_feat(h_1, h_2)), T5 last hidden states (1, L_t, D))   (1, L_c + L_t, D = 4096)
    pooled = cat_feat(p_1, p_2)                                                        (1, P = 2048)

Without T5 (a folder saved with text_encoder_3=None) the T5 rows are zeros of the same (1, L_t, D): the
pipeline's _get_t5_prompt_embeds returns torch.zeros then. A T5 and a no-T5 model of one family therefore
condition on tensors of one shape, and text_space does not tell them apart: they may continue each
other's generation. (SD3 is trained with each text encoder dropped independently, so zero T5 rows are a
conditioning the transformer knows; each side simply conditions on what its own encoders give.)
"""
import json
import os
from typing import NamedTuple

import torch

from .sd import _placed, scheduler_class_named
from .common import PipelineModel, batch_embeds, guidance_rows, require_subfolders

SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")
MAX_SEQUENCE_LENGTH = 256  # T5 tokens: the pipeline's default max_sequence_length (__call__, encode_prompt)
SCHEDULER_CONFIG = "scheduler_config.json"
FLOW_SCHEDULER_PREFIX = "FlowMatch"  # the diffusers schedulers that step a flow velocity


class TextSpace(NamedTuple):
    """What the MMDiT's joint attention sees: (1, clip_length + t5_length, hidden_size) embeddings whose first
    clip_length rows hold [CLIP-L | CLIP-G | 0] (clip_hidden_size wide, then zeros), and (1, pooled_size) pooled
    embeddings, from CLIP token ids < vocab_size (CLIP-L) and < vocab_size_2 (CLIP-G). Whether T5 or zeros fill
    the last t5_length rows is not part of it (see the module doc)."""

    hidden_size: int
    clip_length: int
    t5_length: int
    clip_hidden_size: int
    pooled_size: int
    vocab_size: int
    vocab_size_2: int


class LatentSpace(NamedTuple):
    """latent = scaling_factor * (VAE encoding - shift_factor), with ``channels`` channels at 1 / scale_factor
    of image size (SD3's VAE: 16 channels, 8, 1.5305, 0.0609)."""

    channels: int
    scale_factor: int
    scaling_factor: float
    shift_factor: float


class StableDiffusion3Model(PipelineModel):
    """Two CLIP tokenizers and text encoders (with projection), T5 (or none), the SD3 transformer, the VAE
    and the scheduler config of one StableDiffusion3Pipeline folder.

    Attributes: latent_shape (16, H, W) of one latent at the pipeline's default size (transformer
    sample_size a side); text_space and latent_space, which two models must share for one to continue the
    other's generation; has_t5; scheduler, a fresh instance of the folder's scheduler; device, dtype.
    """

    family = "sd3"

    def __init__(self, tokenizers, text_encoders, transformer, vae, scheduler_config, t5_tokenizer=None,
                 t5_encoder=None, *, device="cpu", dtype=torch.float32):
        from diffusers.image_processor import VaeImageProcessor

        if (t5_tokenizer is None) != (t5_encoder is None):
            raise ValueError("give T5's tokenizer and encoder both, or neither (an SD3 folder without T5)")
        config = transformer.config
        clip_width = sum(e.config.hidden_size for e in text_encoders)
        pooled = sum(e.config.projection_dim for e in text_encoders)
        if pooled != config.pooled_projection_dim:
            raise ValueError(f"the CLIP encoders' projection dims sum to {pooled} but the transformer's "
                             f"pooled_projection_dim is {config.pooled_projection_dim}: not one model's components")
        if clip_width > config.joint_attention_dim:
            raise ValueError(f"the CLIP encoders' hidden sizes sum to {clip_width}, wider than the transformer's "
                             f"joint_attention_dim {config.joint_attention_dim}: not one model's components")
        if t5_encoder is not None and t5_encoder.config.d_model != config.joint_attention_dim:
            raise ValueError(f"T5's d_model {t5_encoder.config.d_model} differs from the transformer's "
                             f"joint_attention_dim {config.joint_attention_dim}: not one model's components")
        if config.in_channels != vae.config.latent_channels:
            raise ValueError(f"the transformer takes {config.in_channels} channels but the VAE's latents have "
                             f"{vae.config.latent_channels}: not one model's components")
        if vae.config.shift_factor is None:
            raise ValueError("the VAE has no shift_factor: the SD3 pipeline decodes latent / scaling_factor + "
                             "shift_factor; give an SD3 VAE (its shift_factor is 0.0609)")
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizers, self.t5_tokenizer = tuple(tokenizers), t5_tokenizer
        self.text_encoders = tuple(_placed(e, self.device, dtype) for e in text_encoders)
        self.t5_encoder = None if t5_encoder is None else _placed(t5_encoder, self.device, dtype)
        self.transformer, self.vae = (_placed(m, self.device, dtype) for m in (transformer, vae))
        self.has_t5 = t5_encoder is not None
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline derives it
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # the pipeline's default image is sample_size * vae_scale_factor a side: latents sample_size a side
        self.latent_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.clip_length = self.tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        self.text_space = TextSpace(config.joint_attention_dim, self.clip_length, MAX_SEQUENCE_LENGTH, clip_width,
                                    pooled, *(e.config.vocab_size for e in text_encoders))
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor,
                                        float(vae.config.scaling_factor), float(vae.config.shift_factor))
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads the folder ``path`` (as StableDiffusion3Pipeline.save_pretrained lays it out) with each
        component's own from_pretrained, from local files only. A folder whose model_index.json names no
        text_encoder_3 (saved with text_encoder_3=None) loads without T5."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        require_subfolders(path, SUBFOLDERS, "Stable Diffusion 3", "StableDiffusion3Pipeline")
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        listed = [s for s in T5_SUBFOLDERS if (index.get(s) or [None])[0] is not None]
        if listed and len(listed) < len(T5_SUBFOLDERS):
            raise ValueError(f"{path!r} lists {listed[0]} but not its partner in model_index.json: give T5's "
                             "encoder and tokenizer both, or neither")
        absent = [s for s in listed if not os.path.isdir(os.path.join(path, s))]
        if absent:
            raise FileNotFoundError(f"{path!r}'s model_index.json lists {', '.join(absent)} but the folder lacks "
                                    "it; save the pipeline again, or with text_encoder_3=None for no T5")
        local = dict(local_files_only=True)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, **local) for s in ("tokenizer", "tokenizer_2")]
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=s, dtype=dtype, **local)
                    for s in ("text_encoder", "text_encoder_2")]
        t5_tokenizer = t5_encoder = None
        if listed:
            t5_tokenizer = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **local)
            t5_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype, **local)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        with open(os.path.join(path, "scheduler", SCHEDULER_CONFIG)) as f:
            scheduler_class = scheduler_class_named(json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **local)
        return cls(tokenizers, encoders, transformer, vae, scheduler.config, t5_tokenizer, t5_encoder,
                   device=device, dtype=dtype)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config: of the folder's class, or of the flow-matching diffusers
        class ``name``, built with from_config as one swaps a pipeline's scheduler. A scheduler of another
        kind (DDIM, Euler, ...) is refused: from the folder's config it would step an epsilon schedule, and
        the transformer predicts a flow velocity."""
        cls = scheduler_class_named(name or self.scheduler_config["_class_name"])
        if not cls.__name__.startswith(FLOW_SCHEDULER_PREFIX):
            raise ValueError(f"scheduler {cls.__name__!r} does not step a flow velocity, which the SD3 transformer "
                             "predicts; give a flow-matching one, e.g. 'FlowMatchEulerDiscreteScheduler' (the "
                             "folder's)")
        return cls.from_config(dict(self.scheduler_config))

    def timestep_kwargs(self, steps=None):
        """{} for SD3 and SD3.5's folders (use_dynamic_shifting false: the fixed shift 3.0). A folder with
        use_dynamic_shifting gets the pipeline's mu at the default size: calculate_shift of the image
        sequence length (H / patch) (W / patch), with the config's base/max shift and sequence lengths."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting", None):
            return {}
        patch = self.transformer.config.patch_size
        seq_len = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)  # the pipeline's defaults
        m = (max_shift - base_shift) / (max_len - base_len)  # mu linear in the sequence length
        return {"mu": seq_len * m + base_shift - m * base_len}

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond), each (embeds (1, L, D), pooled (1, P)) in self.dtype with L = clip_length + t5_length,
        D = hidden_size, P = pooled_size of text_space: the pipeline's (prompt_embeds, pooled_prompt_embeds)
        and (negative_prompt_embeds, negative_pooled_prompt_embeds), the same prompt to all three encoders.
        Pads each tokenization to its length and truncates longer prompts, as the pipeline does."""
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        return self._embed(prompt), self._embed(negative_prompt)

    def _embed(self, text):
        hidden, pooled = zip(*(self._clip(tokenizer, encoder, text)
                               for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)))
        clip = torch.cat(hidden, dim=-1)  # (1, L_c, 768 + 1280)
        t5 = self._t5(text)  # (1, L_t, D)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2).to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype)

    def _clip(self, tokenizer, encoder, text):
        """(penultimate hidden states (1, L_c, W), text_embeds (1, W')): _get_clip_prompt_embeds, clip_skip None."""
        ids = tokenizer(text, padding="max_length", max_length=self.clip_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoders[0].dtype), out[0]  # out[0]: the projected pooled output

    def _t5(self, text):
        """(1, L_t, D): _get_t5_prompt_embeds, T5's last hidden states, or zeros without T5."""
        if self.t5_encoder is None:
            return torch.zeros((1, MAX_SEQUENCE_LENGTH, self.transformer.config.joint_attention_dim),
                               device=self.device, dtype=self.text_encoders[0].dtype)
        ids = self.t5_tokenizer(text, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
        return self.t5_encoder(ids.to(self.device))[0].to(self.t5_encoder.dtype)

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(v(x_t, t, cond), v(x_t, t, uncond)): the transformer's two flow velocities at x_t, unguided.

        x: (B, C, H, W) latents x_t, in self.dtype.
        t: the timestep (1000 sigma), an element of scheduler.timesteps (a 0-d tensor or number), or a (B,)
            tensor of them.
        cond, uncond: (embeds (1 or B, L, D), pooled (1 or B, P)). With uncond=None only cond is evaluated
            (the pipeline does that at guidance_scale <= 1) and the second result is None.
        scheduler, guidance: unused (the flow schedulers scale no model input; guidance combines the two
            predictions outside, in the fused step: u + g (c - u)).

        One transformer call on the batch cat([x, x]) with cat([uncond, cond]) conditioning and t expanded to
        the batch, as the pipeline's denoising loop batches classifier-free guidance:
            noise_pred = transformer(hidden_states=latent_model_input, timestep=t.expand(2B),
                                     encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds)
        """
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.latent_shape[0]:
            raise ValueError(f"x must be (B, {self.latent_shape[0]}, H, W), got {tuple(x.shape)}")
        conds = [cond] if uncond is None else [uncond, cond]
        space = self.text_space
        length = space.clip_length + space.t5_length
        for c in conds:
            if not (isinstance(c, tuple) and len(c) == 2):
                raise ValueError(f"SD3 conditioning is a tuple (embeds, pooled), got {type(c).__name__}")
            embeds, pooled = c
            batch_embeds(embeds, b, length, space.hidden_size)  # checked; expanded below, with the pooled
            if pooled.dim() != 2 or pooled.shape != (embeds.shape[0], space.pooled_size):
                raise ValueError(f"pooled embeddings must be ({embeds.shape[0]}, {space.pooled_size}), got "
                                 f"{tuple(pooled.shape)}")
        k = len(conds)
        x_in, t = guidance_rows(x, torch.as_tensor(t, device=x.device), k)
        timestep = t if t.dim() == 1 else t.expand(k * b)
        embeds = torch.cat([e.expand(b, -1, -1) for e, _ in conds])
        pooled = torch.cat([p.expand(b, -1) for _, p in conds])
        out = self.transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        if k == 1:
            return out, None
        v_uncond, v_cond = out.chunk(2)
        return v_cond, v_uncond

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, C, H, W) -> B images as the pipeline returns them: a list of PIL images ("pil"), a
        (B, 3, H*f, W*f) tensor in [0, 1] ("pt") or a (B, H*f, W*f, 3) array ("np"); f = vae_scale_factor.
        The VAE decodes latent / scaling_factor + shift_factor."""
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        latent = latent.to(device=self.device, dtype=self.vae.dtype)
        latent = latent / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)
