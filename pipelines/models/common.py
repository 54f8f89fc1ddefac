"""What every family shares: x_T drawn as the diffusers pipelines' prepare_latents draw it, and the
one-process loop that reproduces a pipeline's call (the reference the split runs are held to)."""
import os

import torch

from ...kernels import FusedSampler


def require_subfolders(path, subfolders, family, pipeline, hint=""):
    """A FileNotFoundError naming what a family's folder lacks, unless it has every subfolder."""
    missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"{path!r} is not a {family} folder: it lacks {', '.join(missing)}{hint}; give a "
                                f"local folder written by {pipeline}.save_pretrained")


def guidance_rows(x, t, k):
    """x (B, ...) and a per-row t (B,) repeated for k conditionings, as the pipelines batch classifier-free
    guidance ([uncond, cond]) -> (x_in, t_in); a shared t stays as it is."""
    b = x.shape[0]
    x_in = torch.cat([x] * k) if k > 1 else x
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        if t.shape != (b,):
            raise ValueError(f"a per-row t must have shape ({b},), got {tuple(t.shape)}")
        t = torch.cat([t] * k)
    return x_in, t


def batch_embeds(e, b, length, width, what="text embeddings"):
    """One conditioning tensor of (1 or b, length, width), checked, expanded to b rows (a view)."""
    if e.dim() != 3 or e.shape[0] not in (1, b) or e.shape[1:] != (length, width):
        raise ValueError(f"{what} must be (1 or {b}, {length}, {width}), got {tuple(e.shape)}")
    return e.expand(b, -1, -1)


def check_unet(unet, vae):
    """The checks every UNet family makes of its folder's components: the UNet reads the VAE's latents, and
    takes no guidance embedding (a guidance-distilled model: predict() supplies none)."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"the UNet takes {unet.config.in_channels} channels but the VAE's latents have "
                         f"{vae.config.latent_channels}: not one model's components")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"this UNet takes a guidance embedding (time_cond_proj_dim "
                         f"{unet.config.time_cond_proj_dim}: a guidance-distilled model); predict() supplies none")


class PipelineModel:
    """initial_noise and generate for a model with ``latent_shape``, ``device``, ``dtype``, ``scheduler``,
    ``make_scheduler``, ``encode_prompt`` and ``predict``."""

    def initial_noise(self, seed, batch=1, *, scheduler=None, generator_device=None):
        """x_T: (batch, *latent_shape) in self.dtype, drawn as the pipeline's prepare_latents draws it given
        generator=torch.Generator(generator_device).manual_seed(seed), times the scheduler's init_noise_sigma
        where it has one (Euler's depends on the schedule: call set_timesteps first; flow matching starts at
        sigma = 1, unscaled). generator_device defaults to self.device; "cpu" gives the same x_T on every
        device."""
        sched = self.scheduler if scheduler is None else scheduler
        x = self._noise(self._generator(seed, generator_device), batch)
        sigma = getattr(sched, "init_noise_sigma", None)
        return x if sigma is None else x * sigma

    def _generator(self, seed, generator_device):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator(generator_device or self.device).manual_seed(seed)

    def _noise(self, generator, batch):
        from diffusers.utils.torch_utils import randn_tensor

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        return randn_tensor((batch, *self.latent_shape), generator=generator, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def generate(self, prompt, negative_prompt="", *, seed, steps, guidance_scale, scheduler=None, eta=0.0,
                 batch=1, generator_device=None):
        """x_0: the final (batch, *latent_shape) latent of the family's pipeline(prompt, negative_prompt=...,
        num_inference_steps=steps, guidance_scale=..., eta=..., generator=Generator(generator_device)
        .manual_seed(seed), num_images_per_prompt=batch, output_type="latent"), stepped by FusedSampler.

        scheduler: None (the folder's), a diffusers scheduler class name, or an instance (its schedule is
        reset with set_timesteps(steps)). eta: DDIM's. Stochastic schedulers draw their per-step noise from
        the same generator after x_T, as the pipeline's scheduler.step does.
        """
        sched, sampler = self._schedule(scheduler, steps, eta)
        cond, uncond = self.encode_prompt(prompt, negative_prompt)
        generator = self._generator(seed, generator_device)
        x = self._noise(generator, batch) * sched.init_noise_sigma
        return self._denoise(sampler, x, cond, uncond if guidance_scale > 1 else None, guidance_scale,
                             lambda: self._noise(generator, batch))

    def _schedule(self, scheduler, steps, eta):
        """(scheduler set to ``steps``, its FusedSampler): the folder's, a class name's or an instance."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        sched = self.make_scheduler(scheduler) if scheduler is None or isinstance(scheduler, str) else scheduler
        sched.set_timesteps(steps, device=self.device)
        return sched, FusedSampler(sched, device=self.device, eta=eta)

    def _denoise(self, sampler, x, cond, uncond, guidance_scale, next_noise):
        """The reference loop: predict, then the fused step, every step; uncond None: unguided (the
        pipeline's guidance_scale <= 1). next_noise() draws a stochastic scheduler's per-step noise."""
        sched, state = sampler.scheduler, None
        for i, t in enumerate(sampler.timesteps):
            pred_c, pred_u = self.predict(x, t, cond, uncond, scheduler=sched)
            noise = next_noise() if sampler.stochastic else None
            if uncond is not None:
                x, state = sampler.step(x, i, cond=pred_c, uncond=pred_u, guidance_scale=guidance_scale, state=state,
                                        noise=noise)
            else:
                x, state = sampler.step(x, i, pred_c, state=state, noise=noise)
        return x
