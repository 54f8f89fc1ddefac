"""A CogVideoX text-to-video model taken apart into the pieces a split generation needs: T5 text
embeddings, one transformer evaluation, the initial noise, the 3-D VAE decode. Each piece computes exactly
what diffusers' CogVideoXPipeline computes at that point, so a loop of ``predict`` and ``FusedSampler.step``
reproduces the pipeline (``generate`` is that loop: the single-process reference).

    model = CogVideoXModel.from_pretrained(path)                  # a CogVideoXPipeline folder
    cond, uncond = model.encode_prompt("a red circle")            # (1, L, D) each, L = 226 for CogVideoX
    sched = model.make_scheduler(); sched.set_timesteps(steps)
    sampler = FusedSampler(sched)
    x = model.initial_noise(seed, scheduler=sched)                # x_T: (B, F, C, H, W)
    for i, t in enumerate(sampler.timesteps):
        v_c, v_u = model.predict(x, t, cond, uncond, scheduler=sched)
        x, state = sampler.step(x, i, cond=v_c, uncond=v_u, guidance_scale=g, state=state)
    videos = model.decode(x)                                      # B lists of PIL frames

Latents are held as the pipeline holds them, frames before channels: (B, F, C, H, W), F = (frames - 1) / 4
+ 1 latent frames at 1/8 of the video's height and width (CogVideoX-2b/5b: 49 frames at 480 x 720 ->
(13, 16, 60, 90)). They cross the wire in that layout.

Symbols: x_t the latent at timestep t, v(x_t, t, c) the transformer's raw prediction (v for CogVideoX's
v_prediction) under text embeddings c, RoPE(F, H, W) the 3-D rotary position embeddings of the latent grid.
"""
import json
import os
from typing import NamedTuple

import torch

from .sd import SCHEDULER_CONFIG, _placed, scale_model_input, scheduler_class_named
from .common import PipelineModel, batch_embeds, guidance_rows, require_subfolders

SUBFOLDERS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
ROTARY_CACHE_ENTRIES = 8  # latent grids (F, H, W) whose rotary embeddings a model keeps


class TextSpace(NamedTuple):
    """What the transformer's text stream sees: (1, max_length, hidden_size) embeddings of a ``encoder`` text
    encoder (the transformers model_type, "t5") over token ids < vocab_size."""

    encoder: str
    hidden_size: int
    max_length: int
    vocab_size: int


class LatentSpace(NamedTuple):
    """latent = scaling_factor * 3-D VAE encoding, with ``channels`` channels at 1 / scale_factor of the video's
    height and width and 1 / temporal_scale_factor of its frames (plus one)."""

    channels: int
    scale_factor: int
    temporal_scale_factor: int
    scaling_factor: float


def video_latent_shape(frames, height, width, *, channels, scale_factor, temporal_scale_factor, patch_size_t=None):
    """((F, C, H, W), padding) of the latent CogVideoXPipeline.prepare_latents draws for a video of ``frames``
    frames at ``height`` x ``width`` pixels: F = (frames - 1) // temporal_scale_factor + 1 latent frames, plus,
    for CogVideoX 1.5 (patch_size_t set), ``padding`` frames that make F a multiple of patch_size_t (the
    pipeline drops the first ``padding`` latent frames before it decodes)."""
    f = (frames - 1) // temporal_scale_factor + 1
    padding = 0 if patch_size_t is None or f % patch_size_t == 0 else patch_size_t - f % patch_size_t
    return (f + padding, channels, height // scale_factor, width // scale_factor), padding


class CogVideoXModel(PipelineModel):
    """T5 tokenizer and text encoder, CogVideoX transformer, 3-D VAE and the scheduler config of one
    CogVideoXPipeline folder (CogVideoX 1.0 text-to-video: CogVideoX-2b, CogVideoX-5b; 1.5 too).

    Attributes: latent_shape (F, C, H, W) of one latent at the pipeline's default frame count and size
    (the transformer config's sample_frames, sample_height and sample_width); text_space and latent_space,
    which two models must share for one to continue the other's generation; scheduler, a fresh instance
    of the folder's scheduler; device, dtype.
    """

    family = "cogvideox"

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler_config, *, device="cpu",
                 dtype=torch.float32):
        from diffusers.video_processor import VideoProcessor

        tc = transformer.config
        if tc.text_embed_dim != text_encoder.config.d_model:
            raise ValueError(f"the transformer's text_embed_dim {tc.text_embed_dim} differs from the text encoder's "
                             f"d_model {text_encoder.config.d_model}: not one model's components")
        if tc.in_channels != vae.config.latent_channels:
            raise ValueError(f"the transformer takes {tc.in_channels} channels but the VAE's latents have "
                             f"{vae.config.latent_channels}: not one text-to-video model's components (an image-"
                             "to-video transformer takes the image latents too: CogVideoXImageToVideoPipeline)")
        if tc.ofs_embed_dim:
            raise ValueError(f"this transformer takes an ofs embedding (ofs_embed_dim {tc.ofs_embed_dim}: "
                             "CogVideoX1.5-5B-I2V); predict() supplies none")
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = tokenizer
        self.text_encoder, self.transformer, self.vae = (_placed(m, self.device, dtype)
                                                         for m in (text_encoder, transformer, vae))
        self.scheduler_config = scheduler_config
        # as CogVideoXPipeline.__init__ derives them
        self.vae_scale_factor_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scale_factor_temporal = vae.config.temporal_compression_ratio
        self.vae_scaling_factor_image = vae.config.scaling_factor
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        # the pipeline's defaults: sample_frames frames at sample_height x sample_width latent pixels
        self.num_frames = tc.sample_frames
        self.height = tc.sample_height * self.vae_scale_factor_spatial
        self.width = tc.sample_width * self.vae_scale_factor_spatial
        self.latent_shape, self.padding_frames = video_latent_shape(
            self.num_frames, self.height, self.width, channels=tc.in_channels,
            scale_factor=self.vae_scale_factor_spatial, temporal_scale_factor=self.vae_scale_factor_temporal,
            patch_size_t=tc.patch_size_t)
        self.text_space = TextSpace(text_encoder.config.model_type, text_encoder.config.d_model,
                                    tc.max_text_seq_length, text_encoder.config.vocab_size)
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor_spatial,
                                        self.vae_scale_factor_temporal, float(vae.config.scaling_factor))
        self._rotary = {}
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads the folder ``path`` (as CogVideoXPipeline.save_pretrained lays it out) with each component's
        own from_pretrained, from local files only."""
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import T5EncoderModel, T5Tokenizer

        require_subfolders(path, SUBFOLDERS, "CogVideoX", "CogVideoXPipeline")
        local = dict(local_files_only=True)
        tokenizer = T5Tokenizer.from_pretrained(path, subfolder="tokenizer", **local)
        text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
        transformer = CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                                  **local)
        vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        with open(os.path.join(path, "scheduler", SCHEDULER_CONFIG)) as f:
            scheduler_class = scheduler_class_named(json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **local)
        return cls(tokenizer, text_encoder, transformer, vae, scheduler.config, device=device, dtype=dtype)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config: of the folder's class (CogVideoXDDIMScheduler), or of
        diffusers class ``name``, built with from_config as one swaps a pipeline's scheduler. CogVideoXPipeline
        uses the config as it is."""
        cls = scheduler_class_named(name or self.scheduler_config["_class_name"])
        return cls.from_config(dict(self.scheduler_config))

    def timestep_kwargs(self, steps=None):
        """set_timesteps takes nothing more for this family."""
        return {}

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond): T5's last hidden states of ``prompt`` and ``negative_prompt``, each (1, L, D) in
        self.dtype, L = text_space.max_length (the transformer's max_text_seq_length, CogVideoX's 226), D =
        text_space.hidden_size. As the pipeline's _get_t5_prompt_embeds: padded to L tokens, longer prompts
        truncated to L, with the EOS token and no attention mask."""
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        return self._embed(prompt), self._embed(negative_prompt)

    def _embed(self, text):
        ids = self.tokenizer([text], padding="max_length", max_length=self.text_space.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(v(x_t, t, cond), v(x_t, t, uncond)): the transformer's two raw predictions at x_t, unguided, in the
        scheduler's prediction_type (v for CogVideoX).

        x: (B, F, C, H, W) latents x_t, in self.dtype.
        t: the timestep, an element of scheduler.timesteps (a 0-d tensor or number), or a (B,) tensor of them.
        cond, uncond: (1 or B, L, D) text embeddings. With uncond=None only cond is evaluated (the pipeline
            does that at guidance_scale <= 1) and the second result is None.
        scheduler: the scheduler whose timesteps t comes from, after set_timesteps (default self.scheduler);
            its scale_model_input (the identity for CogVideoXDDIMScheduler) scales x_t.
        guidance: unused (guidance combines the two predictions outside, in the fused step, at one scale for
            every step: the pipeline's use_dynamic_cfg is not supported).

        One transformer call on the batch cat([x, x]) with embeddings cat([uncond, cond]), the timestep
        expanded to that batch and RoPE(F, H, W) where the config uses rotary embeddings, as the pipeline's
        denoising loop batches classifier-free guidance.
        """
        c = self.latent_shape[1]
        if x.dim() != 5 or x.shape[2] != c:
            raise ValueError(f"x must be (B, F, {c}, H, W), got {tuple(x.shape)}")
        b, frames, _, h, w = x.shape
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t
        if h % p or w % p or (p_t is not None and frames % p_t):
            raise ValueError(f"x's latent grid (F, H, W) = {(frames, h, w)} must divide into the transformer's "
                             f"patches ({p_t or 1}, {p}, {p})")
        embeds = [cond] if uncond is None else [uncond, cond]
        embeds = [batch_embeds(e, b, self.text_space.max_length, self.text_space.hidden_size) for e in embeds]
        k = len(embeds)
        x_in, t = guidance_rows(x, t, k)
        x_in = scale_model_input(scheduler if scheduler is not None else self.scheduler, x_in, t)
        timestep = torch.as_tensor(t, device=self.device).expand(k * b)  # the pipeline's t.expand(B)
        rotary = None  # CogVideoX-2b adds sinusoidal position embeddings inside the transformer instead
        if self.transformer.config.use_rotary_positional_embeddings:
            rotary = self._rotary_embeddings(frames, h, w)
        out = self.transformer(hidden_states=x_in, encoder_hidden_states=torch.cat(embeds), timestep=timestep,
                               image_rotary_emb=rotary, return_dict=False)[0]
        if k == 1:
            return out, None
        v_uncond, v_cond = out.chunk(2)
        return v_cond, v_uncond

    def _rotary_embeddings(self, frames, h, w):
        """(cos, sin) RoPE(F, H, W) of a latent grid, each (F' H/p W/p, head_dim): the pipeline's
        _prepare_rotary_positional_embeddings(height, width, F) at height = H * vae_scale_factor_spatial."""
        key = (frames, h, w)
        if key not in self._rotary:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            tc = self.transformer.config
            p, p_t = tc.patch_size, tc.patch_size_t
            grid = (h // p, w // p)  # = height // (vae_scale_factor_spatial * p), and the same for width
            base_width, base_height = tc.sample_width // p, tc.sample_height // p
            if p_t is None:  # CogVideoX 1.0
                crops = get_resize_crop_region_for_grid(grid, base_width, base_height)
                emb = get_3d_rotary_pos_embed(embed_dim=tc.attention_head_dim, crops_coords=crops, grid_size=grid,
                                              temporal_size=frames, device=self.device)
            else:  # CogVideoX 1.5
                emb = get_3d_rotary_pos_embed(embed_dim=tc.attention_head_dim, crops_coords=None, grid_size=grid,
                                              temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                              max_size=(base_height, base_width), device=self.device)
            if len(self._rotary) >= ROTARY_CACHE_ENTRIES:
                self._rotary.pop(next(iter(self._rotary)))
            self._rotary[key] = emb
        return self._rotary[key]

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, F, C, H, W) -> B videos as the pipeline returns them: per latent a list of PIL frames
        ("pil"), or a (B, frames, 3, H*f, W*f) tensor in [0, 1] ("pt") or (B, frames, H*f, W*f, 3) array
        ("np"); f = vae_scale_factor_spatial, frames = (F - 1) * vae_scale_factor_temporal + 1.

        As the pipeline's decode_latents: the padding frames of CogVideoX 1.5 dropped, (B, C, F, H, W) / the
        VAE's scaling_factor through the 3-D VAE (which decodes two latent frames at a time), then the video
        processor's postprocess_video."""
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        if latent.dim() != 5 or latent.shape[2] != self.latent_shape[1]:
            raise ValueError(f"latent must be (B, F, {self.latent_shape[1]}, H, W), got {tuple(latent.shape)}")
        latent = latent.to(device=self.device, dtype=self.vae.dtype)[:, self.padding_frames:]
        latent = 1 / self.vae_scaling_factor_image * latent.permute(0, 2, 1, 3, 4)
        video = self.vae.decode(latent).sample
        return self.video_processor.postprocess_video(video=video, output_type=output_type)

__all__ = ["CogVideoXModel", "LatentSpace", "TextSpace", "video_latent_shape"]
