"""The one segment loop: a stretch of a plan's segments run by one side, one step at a time.

Every runner drives a ``SegmentRun``: the one-process executor, the cloud engine (which stacks the model
inputs of many runs into one forward), the edge and its fallback. The run holds the session's place
(segment, step, latent, solver state, forecaster history); the driver only supplies the model's raw
predictions at the real steps:

    run = SegmentRun(spec, segments, sampler, conditioning, x, state)
    while not run.done:
        if run.wants_model:
            x, t = run.model_input()
            run.advance(*model.predict(x, t, *run.conditioning, scheduler=sampler.scheduler,
                                       guidance=run.guidance))
        else:
            run.advance()
    x, state = run.x, run.state
"""
from latentwire.kernels import Stepper

from .plan import forecaster
from .session import renoise_noise, step_noise


class SegmentRun:
    """Segments ``segments`` (consecutive ones of one side, in plan order) of ``spec``'s plan, from latent x
    (at the first segment's start) and solver state. conditioning: (cond, uncond) text embeddings from
    this side's own text encoder. callback(i, t, x_t, m, real) after each step."""

    def __init__(self, spec, segments, sampler, conditioning, x, state=None, callback=None):
        if not segments:
            raise ValueError("a SegmentRun needs at least one segment")
        self.spec, self.segments, self.sampler = spec, list(segments), sampler
        self.conditioning, self.callback = conditioning, callback
        self.x, self.state = x, state
        self.calls = self.forecasts = 0
        self.guidance = self._g = float(spec.guidance_scale)
        self._seg = -1
        self._stepper = None
        self._next_segment()

    @property
    def done(self):
        return self._stepper is None

    @property
    def step(self):
        """The index of the next step (the last segment's stop once done)."""
        return self.segments[-1].stop if self.done else self._stepper.i

    @property
    def wants_model(self):
        """Whether the next step is a real model call (else a forecast, taken by advance() alone)."""
        return not self.done and self._stepper.real

    def model_input(self):
        """(x_t, t) for the model's call at the next step."""
        return self._stepper.x, self._stepper.t

    def advance(self, pred_cond=None, pred_uncond=None):
        """Take the next step: with the model's raw predictions under the prompt and the negative prompt at
        a real step (guided here, inside the fused pass), with nothing at a forecast step."""
        s = self._stepper
        if pred_cond is None:
            info = s.step()
        else:
            info = s.step([pred_uncond, pred_cond], [1.0 - self._g, self._g])
        self.x, self.state = s.x, s.state
        i, t, x_t, m, real = info
        if real:
            self.calls += 1
        else:
            self.forecasts += 1
        if self.callback is not None:
            self.callback(i, t, x_t, m, real)
        if s.done:
            self._next_segment()

    def _next_segment(self):
        self._seg += 1
        if self._seg == len(self.segments):
            self._stepper = None
            return
        seg = self.segments[self._seg]
        x, state = self.x, self.state
        if seg.renoise:  # preview-refine: the incoming latent is a clean preview, taken to step seg.start's level
            x = renoised(self.sampler, x, renoise_noise(self.spec.seed, x.shape, x.dtype).to(x.device), seg.start)
            state = None
        noise = None
        if self.sampler.stochastic:
            seed, shape, device = self.spec.seed, x.shape, x.device
            noise = lambda i: step_noise(seed, shape, i).to(device)  # noqa: E731
        self._stepper = Stepper(self.sampler, x, forecaster(seg), start=seg.start, stop=seg.stop, state=state,
                                noise=noise)
        self.x, self.state = x, state


def renoised(sampler, x0, noise, i):
    """x_0 taken to the noise level of step i: add_noise (diffusion schedulers: sqrt(abar) x_0 + sqrt(1 -
    abar) z) or, for flow matching, scale_noise (sigma z + (1 - sigma) x_0)."""
    scheduler = sampler.scheduler
    t = sampler.timesteps[i:i + 1]
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, t)
    return scheduler.scale_noise(x0, t.to(x0.device), noise)


def drive(run, model):
    """Run ``run`` to its end with ``model`` alone -> run. The loop of the executor and the edge."""
    cond, uncond = run.conditioning
    scheduler = run.sampler.scheduler
    while not run.done:
        if run.wants_model:
            x, t = run.model_input()
            run.advance(*model.predict(x, t, cond, uncond, scheduler=scheduler, guidance=run.guidance))
        else:
            run.advance()
    return run
