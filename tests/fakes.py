"""Model stand-ins the serving tests share: the real tiny model, with a twist."""
import time


class Slow:
    """The cloud model, taking ``delay`` seconds more per step: a slow cloud, or a long session."""

    def __init__(self, model, delay):
        self.model, self.delay = model, delay
        self.latent_space, self.text_space, self.latent_shape = model.latent_space, model.text_space, model.latent_shape

    def encode_prompt(self, prompt, negative=""):
        return self.model.encode_prompt(prompt, negative)

    def predict(self, x, t, cond, uncond, scheduler=None, guidance=None):
        time.sleep(self.delay)
        return self.model.predict(x, t, cond, uncond, scheduler=scheduler, guidance=guidance)

    def initial_noise(self, *args, **kwargs):
        return self.model.initial_noise(*args, **kwargs)
