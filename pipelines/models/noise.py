"""x_T of every family, drawn as the diffusers pipelines' prepare_latents draw it."""
import torch


class SeededLatents:
    """initial_noise for a model with ``latent_shape``, ``device``, ``dtype`` and ``scheduler``."""

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
