"""The Stable Diffusion x4 upscaler's structure (diffusers' StableDiffusionUpscalePipeline) taken apart into
the pieces a split generation needs, each computing exactly what the pipeline computes at that point, so a
loop of ``predict`` and ``FusedSampler.step`` reproduces the pipeline (``upscale`` is that loop: the
single-process reference).

    model = StableDiffusionUpscaleModel.from_pretrained(path)     # a StableDiffusionUpscalePipeline folder
    image = model.image_processor.preprocess(low_res)             # (1, 3, h, w) in [-1, 1]
    cond, uncond = model.condition(model.encode_prompt("a cat"), image, seed, noise_level=20)
    sched = model.make_scheduler(); sched.set_timesteps(steps)
    x = model.initial_noise(seed, scheduler=sched, size=(h, w))   # x_T: (1, C, h, w), after the image noise
    for i, t in enumerate(sampler.timesteps):
        v_c, v_u = model.predict(x, t, cond, uncond, scheduler=sched)
        x, state = sampler.step(x, i, cond=v_c, uncond=v_u, guidance_scale=g, state=state)
    images = model.decode(x)                                      # (h * f, w * f) images, f = scale_factor

How the upscaler differs from text-to-image SD, and so what changes here:

- The latent is at the low-res image's own size: x_t (B, C, h, w) for an image (1, 3, h, w). The VAE's
  decoder alone makes the image f = 2 ** (levels - 1) times larger (the x4 upscaler: f = 4, C = 4).
- The UNet reads C + 3 channels: c_in(t) x_t concatenated with the noised low-res image z along channels,
  and the image's noise level n as its class label (an nn.Embedding of num_class_embeds > max_noise_level).
- z = low_res_scheduler.add_noise(image, eps_img, n): sqrt(abar_n) image + sqrt(1 - abar_n) eps_img under
  the folder's DDPMScheduler, with eps_img the generator's first draw. The pipeline draws x_T second, from
  the same generator: initial_noise redraws (and drops) the image noise first, so x_T is the pipeline's.
- So the conditioning of a step is a triple per branch, (text_embeds, z, n): ``condition`` makes it. It is
  a plain tuple, because the cloud engine stacks sessions' rows with type(first)(cat(parts) ...).

Symbols: x_t the latent at timestep t, u(., t, c, z, n) the UNet's raw prediction (v for the x4 upscaler),
c_in(t) the input scaling of k-diffusion-style schedulers (Euler: 1 / sqrt(sigma_t^2 + 1)).
"""
import json
import os
from typing import NamedTuple

import torch

from .common import batch_embeds, guidance_rows, require_subfolders
from .sd import SCHEDULER_CONFIG, StableDiffusionModel, TextSpace, _placed, scale_model_input, scheduler_class_named

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "low_res_scheduler")
MAX_NOISE_LEVEL = 350     # StableDiffusionUpscalePipeline's default max_noise_level (the x4 upscaler's)
NOISE_LEVEL = 20          # its __call__'s default noise_level
VAE_SCALING_FACTOR = 0.08333  # the pipeline forces the VAE's scaling_factor to this (the x4 upscaler's)
IMAGE_CHANNELS = 3        # the low-res RGB image concatenated to the latent


class LatentSpace(NamedTuple):
    """latent = scaling_factor * VAE encoding, ``channels`` channels at 1 / scale_factor of the output size,
    read beside an ``image_channels`` image noised to at most ``max_noise_level``. Five fields, so it never
    equals a text-to-image family's three-field LatentSpace: an SD model cannot continue an upscale."""

    channels: int
    scale_factor: int
    scaling_factor: float
    image_channels: int
    max_noise_level: int


class StableDiffusionUpscaleModel(StableDiffusionModel):
    """Tokenizer, CLIP text encoder, UNet, VAE, scheduler config and low-res scheduler of one
    StableDiffusionUpscalePipeline folder.

    Attributes: scale_factor (the SR factor f = vae_scale_factor); latent_shape (C, h, w) at the UNet's
    sample_size (the default low-res image is h x w); latent_space, text_space; max_noise_level (the
    folder's model_index.json, default 350); noise_level (20, the pipeline's default); image_channels (3);
    low_res_scheduler (a fresh instance of the folder's); scheduler; image_processor (the pipeline's, bicubic:
    its preprocess turns a [0, 1] or PIL image into condition()'s input); device, dtype.
    """

    family = "sd-upscale"
    image_channels = IMAGE_CHANNELS
    noise_level = NOISE_LEVEL

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, low_res_scheduler, *,
                 max_noise_level=MAX_NOISE_LEVEL, device="cpu", dtype=torch.float32):
        # Not StableDiffusionModel.__init__: its check_unet demands in_channels == the VAE's latent channels
        # and its latent_shape takes in_channels; the upscaler's UNet reads C + 3.
        from diffusers.image_processor import VaeImageProcessor

        _check_components(text_encoder, unet, vae, max_noise_level)
        if vae.config.scaling_factor != VAE_SCALING_FACTOR:
            # StableDiffusionUpscalePipeline.__init__ does the same (with a deprecation warning); a folder its
            # save_pretrained wrote holds 0.08333 already
            vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR)
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = tokenizer
        self.text_encoder, self.unet, self.vae = (_placed(m, self.device, dtype) for m in (text_encoder, unet, vae))
        self.scheduler_config = scheduler_config
        self.low_res_scheduler = type(low_res_scheduler).from_config(low_res_scheduler.config)
        self.max_noise_level = max_noise_level
        self._level_limits = _level_limits(unet, low_res_scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline derives it
        self.scale_factor = self.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (vae.config.latent_channels, h, w)
        self.text_space = TextSpace(text_encoder.config.hidden_size, tokenizer.model_max_length,
                                    text_encoder.config.vocab_size)
        self.latent_space = LatentSpace(vae.config.latent_channels, self.vae_scale_factor,
                                        float(vae.config.scaling_factor), IMAGE_CHANNELS, self.max_noise_level)
        self.scheduler = self.make_scheduler()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads the folder ``path`` (as StableDiffusionUpscalePipeline.save_pretrained lays it out) with each
        component's own from_pretrained, from local files only; max_noise_level from model_index.json."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        require_subfolders(path, SUBFOLDERS, "Stable Diffusion upscaler", "StableDiffusionUpscalePipeline",
                           hint=" (low_res_scheduler: the DDPMScheduler that noises the low-res image)")
        local = dict(local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        scheduler = _load_scheduler(path, "scheduler")
        low_res_scheduler = _load_scheduler(path, "low_res_scheduler")
        with open(os.path.join(path, "model_index.json")) as f:
            max_noise_level = json.load(f).get("max_noise_level", MAX_NOISE_LEVEL)
        return cls(tokenizer, text_encoder, unet, vae, scheduler.config, low_res_scheduler,
                   max_noise_level=max_noise_level, device=device, dtype=dtype)

    def make_scheduler(self, name=None):
        """A new scheduler from the folder's config, of its class or of diffusers class ``name``, with
        from_config. Unlike StableDiffusionPipeline, StableDiffusionUpscalePipeline keeps the config's
        steps_offset and clip_sample as they are, so this does too."""
        return scheduler_class_named(name or self.scheduler_config["_class_name"]).from_config(self.scheduler_config)

    def generate(self, *args, **kwargs):
        raise TypeError("an upscaler generates from a low-res image: call upscale(image, prompt, ...) instead")

    # -- the conditioning -------------------------------------------------------------------------------

    @torch.no_grad()
    def condition(self, conditioning, image, seed, noise_level=None, generator_device="cpu"):
        """(cond, uncond) text embeddings from encode_prompt -> (cond, uncond), each the plain tuple
        (text_embeds (1, L, D), z (1, 3, h, w), n (1,) int64) that predict takes.

        image: (1, 3, h, w) float in [-1, 1], h and w multiples of scale_factor: the pipeline's
            image_processor.preprocess of its image (model.image_processor.preprocess does the same).
        z = low_res_scheduler.add_noise(image, eps_img, n), eps_img the first draw of
            torch.Generator(generator_device).manual_seed(seed), as the pipeline draws it; n = noise_level
            (default self.noise_level, 20), an int in [0, max_noise_level]. Both branches see the same z and n.
        To reproduce one pipeline call, give initial_noise the same seed and generator_device.
        """
        cond, uncond = conditioning
        n = self._noise_level(noise_level)
        image = self._check_image(image)
        noise = self._image_noise(self._generator(seed, generator_device), image.shape[2:])
        levels = torch.tensor([n], dtype=torch.long, device=self.device)
        z = self.low_res_scheduler.add_noise(image, noise, levels)
        return (cond, z, levels), (uncond, z, levels)

    def _noise_level(self, noise_level):
        n = self.noise_level if noise_level is None else noise_level
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"noise_level must be an int in [0, {self.max_noise_level}], got {type(n).__name__}")
        if not 0 <= n <= self.max_noise_level:
            raise ValueError(f"noise_level must be in [0, {self.max_noise_level}] (the folder's max_noise_level), "
                             f"got {n}; the pipeline's default is {NOISE_LEVEL}")
        for limit, what in self._level_limits:
            if n > limit:
                raise ValueError(f"noise_level {n} is past {what} ({limit}); give one in [0, {limit}]")
        return n

    def _check_image(self, image):
        """image on self.device in self.dtype (as the pipeline casts it to the text embeddings' dtype)."""
        f = self.scale_factor
        if not (isinstance(image, torch.Tensor) and image.is_floating_point()):
            raise TypeError(f"image must be a float tensor (1, 3, h, w) in [-1, 1], got {type(image).__name__}; "
                            "pass model.image_processor.preprocess(image)")
        if image.dim() != 4 or image.shape[:2] != (1, IMAGE_CHANNELS) or image.shape[2] % f or image.shape[3] % f:
            raise ValueError(f"image must be (1, 3, h, w) with h and w multiples of {f} (the VAE's scale factor), "
                             f"got {tuple(image.shape)}; pass model.image_processor.preprocess(image), which "
                             "resizes, for one image")
        lo, hi = float(image.min()), float(image.max())
        if not (-1.0 <= lo and hi <= 1.0):
            raise ValueError(f"image values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]; pass "
                             "model.image_processor.preprocess(image) of an image in [0, 1]")
        return image.to(device=self.device, dtype=self.dtype)

    def _image_noise(self, generator, size):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((1, IMAGE_CHANNELS, *size), generator=generator, device=self.device, dtype=self.dtype)

    # -- the generation's pieces ------------------------------------------------------------------------

    def initial_noise(self, seed, batch=1, *, scheduler=None, generator_device=None, size=None):
        """x_T: (batch, C, h, w) in self.dtype, as the pipeline's prepare_latents draws it from
        generator=torch.Generator(generator_device).manual_seed(seed), times the scheduler's init_noise_sigma.

        The pipeline draws the image's noise (1, 3, h, w) from that generator first (see condition()), so
        this draws and drops it before x_T. size: (h, w) of the low-res image (default latent_shape's).
        generator_device defaults to self.device; "cpu" gives the same x_T on every device.
        """
        sched = self.scheduler if scheduler is None else scheduler
        generator = self._generator(seed, generator_device)
        size = self._size(size)
        self._image_noise(generator, size)
        x = self._latent_noise(generator, batch, size)
        return x * sched.init_noise_sigma

    def _size(self, size):
        if size is None:
            return tuple(self.latent_shape[1:])
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"size must be (h, w) of the low-res image, two positive ints, got {size!r}")
        return tuple(size)

    def _latent_noise(self, generator, batch, size):
        from diffusers.utils.torch_utils import randn_tensor

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        return randn_tensor((batch, self.latent_shape[0], *size), generator=generator, device=self.device,
                            dtype=self.dtype)

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(u(c_in x_t, t, cond), u(c_in x_t, t, uncond)): the UNet's two raw predictions at x_t, unguided, in
        the scheduler's prediction_type (v for the x4 upscaler).

        x: (B, C, h, w) latents x_t in self.dtype, at the low-res image's size.
        t: the timestep, an element of scheduler.timesteps (a 0-d tensor or number), or a (B,) tensor of them.
        cond, uncond: tuples (text_embeds (1 or B, L, D), z (1 or B, 3, h, w), n (1 or B,) int64) as
            condition() makes them (or engine-stacked rows of them); rows of 1 serve all B. With uncond=None
            only cond is evaluated (the pipeline does that at guidance_scale <= 1) and the second result is None.
        scheduler: the scheduler whose timesteps t comes from, after set_timesteps (default self.scheduler).
        guidance: unused (guidance combines the two predictions outside, in the fused step).

        One UNet call on cat([c_in x, c_in x]) ++ cat([z_u, z_c]) along channels, embeddings cat([uncond,
        cond]) and class labels cat([n_u, n_c]), as the pipeline batches classifier-free guidance.
        """
        b, c = x.shape[0], self.latent_shape[0]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"x must be (B, {c}, h, w), got {tuple(x.shape)}")
        branches = {"cond": cond} if uncond is None else {"uncond": uncond, "cond": cond}  # the pipeline's order
        embeds, images, levels = zip(*(self._branch(e, b, x.shape[2:], name) for name, e in branches.items()))
        k = len(branches)
        x_in, t = guidance_rows(x, t, k)
        x_in = scale_model_input(scheduler if scheduler is not None else self.scheduler, x_in, t)
        x_in = torch.cat([x_in, torch.cat(images)], dim=1)
        out = self.unet(x_in, t, encoder_hidden_states=torch.cat(embeds), class_labels=torch.cat(levels),
                        return_dict=False)[0]
        if k == 1:
            return out, None
        pred_uncond, pred_cond = out.chunk(2)
        return pred_cond, pred_uncond

    def _branch(self, conditioning, b, size, name):
        """One branch's (text_embeds, z, n), checked and expanded to b rows (views)."""
        if not (isinstance(conditioning, tuple) and len(conditioning) == 3):
            got = type(conditioning).__name__ if not isinstance(conditioning, tuple) else f"a {len(conditioning)}-tuple"
            raise TypeError(f"{name} must be the (text_embeds, noised image, noise level) tuple condition() makes, "
                            f"got {got}: call model.condition(model.encode_prompt(prompt, negative), image, seed)")
        embeds, z, n = conditioning
        embeds = batch_embeds(embeds, b, self.text_space.max_length, self.text_space.hidden_size)
        if z.dim() != 4 or z.shape[0] not in (1, b) or z.shape[1:] != (IMAGE_CHANNELS, *size):
            raise ValueError(f"the noised image must be (1 or {b}, {IMAGE_CHANNELS}, {size[0]}, {size[1]}) (the "
                             f"latent's size), got {tuple(z.shape)}")
        if n.dim() != 1 or n.shape[0] not in (1, b) or n.dtype != torch.long:
            raise ValueError(f"the noise level must be a (1 or {b},) int64 tensor, got {tuple(n.shape)} {n.dtype}")
        return embeds, z.expand(b, -1, -1, -1), n.expand(b)

    @torch.no_grad()
    def decode(self, latent, output_type="pil"):
        """latent (B, C, h, w) -> B images as the pipeline returns them: a list of PIL images ("pil"), a
        (B, 3, h*f, w*f) tensor in [0, 1] ("pt") or a (B, h*f, w*f, 3) array ("np"); f = scale_factor.

        As the pipeline: a float16 VAE with force_upcast decodes in float32 (cast back after), so float16
        models decode as the pipeline does too. The pipeline's watermarker and safety checker (absent from
        the tiny folders; the x4 upscaler ships neither) are not applied.
        """
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            latent = latent.to(device=self.device, dtype=self.vae.dtype)
            image = self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))

    @torch.no_grad()
    def upscale(self, image, prompt, negative_prompt="", *, seed, steps, guidance_scale, noise_level=None,
                scheduler=None, eta=0.0, generator_device=None):
        """x_0: the final (1, C, h, w) latent of StableDiffusionUpscalePipeline(prompt, image=...,
        negative_prompt=..., num_inference_steps=steps, guidance_scale=..., noise_level=..., eta=...,
        generator=Generator(generator_device).manual_seed(seed), output_type="latent"), stepped by FusedSampler.

        image: condition()'s (1, 3, h, w) in [-1, 1]. scheduler: None (the folder's), a diffusers scheduler
        class name, or an instance (reset with set_timesteps(steps)). One generator draws, in the pipeline's
        order, the image noise, x_T, then each step's noise for stochastic schedulers.
        """
        sched, sampler = self._schedule(scheduler, steps, eta)
        guided = guidance_scale > 1  # the pipeline's do_classifier_free_guidance
        n = self._noise_level(noise_level)
        image = self._check_image(image)
        size = tuple(image.shape[2:])
        generator = self._generator(seed, generator_device)
        levels = torch.tensor([n], dtype=torch.long, device=self.device)
        z = self.low_res_scheduler.add_noise(image, self._image_noise(generator, size), levels)
        text_cond, text_uncond = self.encode_prompt(prompt, negative_prompt)
        cond = (text_cond, z, levels)
        uncond = (text_uncond, z, levels) if guided else None
        x = self._latent_noise(generator, 1, size) * sched.init_noise_sigma
        return self._denoise(sampler, x, cond, uncond, guidance_scale, lambda: self._latent_noise(generator, 1, size))


def _load_scheduler(path, subfolder):
    with open(os.path.join(path, subfolder, SCHEDULER_CONFIG)) as f:
        cls = scheduler_class_named(json.load(f)["_class_name"])
    return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True)


def _check_components(text_encoder, unet, vae, max_noise_level):
    """That the folder's pieces make one upscaler, each failure naming what differs."""
    cfg, c = unet.config, vae.config.latent_channels
    if cfg.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"the UNet's cross_attention_dim {cfg.cross_attention_dim} differs from the text "
                         f"encoder's hidden_size {text_encoder.config.hidden_size}: not one model's components")
    if cfg.in_channels != c + IMAGE_CHANNELS:
        raise ValueError(f"the UNet takes {cfg.in_channels} input channels, but an upscaler's reads the VAE's "
                         f"{c} latent channels + the {IMAGE_CHANNELS} of the low-res image = {c + IMAGE_CHANNELS}: "
                         "not an upscaler's UNet (a text-to-image UNet loads as StableDiffusionPipeline)")
    if cfg.out_channels != c:
        raise ValueError(f"the UNet predicts {cfg.out_channels} channels but the VAE's latents have {c}")
    if cfg.time_cond_proj_dim is not None:
        raise ValueError(f"this UNet takes a guidance embedding (time_cond_proj_dim {cfg.time_cond_proj_dim}: a "
                         "guidance-distilled model); predict() supplies none")
    if not isinstance(max_noise_level, int) or isinstance(max_noise_level, bool) or max_noise_level < 0:
        raise ValueError(f"model_index.json's max_noise_level must be an int >= 0, got {max_noise_level!r}")
    if unet.class_embedding is None:
        raise ValueError("the UNet has no class embedding (num_class_embeds): an upscaler's UNet reads the noise "
                         "level as its class label")


def _level_limits(unet, low_res_scheduler):
    """[(highest noise level, what sets it)] beyond max_noise_level: the level indexes the low-res schedule's
    alphas_cumprod and (class_embed_type None) the UNet's nn.Embedding. Checked per level, not at load: the
    pipeline loads folders whose max_noise_level exceeds these (diffusers' own dummy upscaler) and fails
    only on such a level, with an IndexError."""
    limits = [(low_res_scheduler.config.num_train_timesteps - 1, "the low_res_scheduler's last timestep")]
    if unet.config.class_embed_type is None and unet.config.num_class_embeds is not None:
        limits.append((unet.config.num_class_embeds - 1, "the UNet's num_class_embeds - 1"))
    return limits
