"""A multi-round prompt session, DiffusionX's shape: every round a preview from the edge model, at once;
when the prompt is final, the cloud refines the last preview.

    session = PromptSession(edge_model, cloud=EdgeClient("tcp://cloud:5555", edge_model), seed=7)
    session.preview("a red circle")            # -> Round: the edge's preview (its clean x_0), in ~a second
    session.preview("a red circle at the top") # a new round (fresh noise, or the previous preview re-noised)
    final = session.finalize(strength=0.5)     # -> Round: the cloud re-noises the last preview and finishes

What crosses the network at the end is the preview's clean x_0 and the seed, not x_t: the final request is
the `preview-refine` plan's cloud segment (scheduler/plan.py), which re-noises what it receives to the
noise level of its first step with noise drawn from the seed (scheduler/session.py's renoise_noise), on the
cloud, and denoises to the end with the final prompt. ``cloud`` is an EdgeClient (the cloud is another
process) or a model (both in this process, as evaluations run; the same arithmetic).

A preview starts from fresh noise (``from_previous=False``), or, from the second round on, from the
previous preview re-noised to ``preview_strength`` and denoised with the new prompt by the edge
(image-to-image on the edge: fewer edge steps, and the picture keeps what the prompt did not change).
"""
import time
from dataclasses import dataclass

from latentwire.kernels import FusedSampler
from latentwire.scheduler import Plan, Segment, SegmentRun, SessionSpec, drive, make
from latentwire.scheduler.executor import initial_noise, model_device, on_model

DEFAULT_STEPS = 20          # the final image's schedule
DEFAULT_PREVIEW_STEPS = 8   # a preview's: few, so that it comes at once
DEFAULT_STRENGTH = 0.5      # the share of the final schedule the cloud redoes, without a predictor
DEFAULT_PREVIEW_STRENGTH = 0.6


class SessionError(ValueError):
    """A round that cannot run as asked: the text says what to do."""


@dataclass
class Round:
    """One round: its prompt, the latent it ended with (a clean x_0), and what it cost."""

    kind: str            # "preview" or "final"
    prompt: str
    latent: object
    wall_s: float
    edge_calls: int = 0
    cloud_calls: int = 0
    strength: float = None  # the final's refine strength, or an image-to-image preview's
    start: str = "fresh"    # a preview: "fresh" noise or the "previous" preview; the final: "preview"
    bytes_up: int = 0
    bytes_down: int = 0
    load: dict = None       # the cloud's load as its last reply reported it (wire.Load), for the final
    choice: dict = None     # the final's strength as the predictor chose it, and why (predictor.Choice)

    def to_plain(self):
        """The round without its latent: what `latentwire session --json` prints."""
        return {k: v for k, v in self.__dict__.items() if k != "latent"}


class PromptSession:
    """Rounds of previews on ``edge_model``, then a final on ``cloud`` (an EdgeClient, or a model in this
    process). steps: the final schedule's length; preview_steps: a preview's; seed: the session's noise
    (every round's, so a round that changes nothing draws the same picture); scheduler: the diffusers
    scheduler class both use (the edge model's configuration of it)."""

    def __init__(self, edge_model, cloud=None, *, steps=DEFAULT_STEPS, preview_steps=DEFAULT_PREVIEW_STEPS, seed=0,
                 guidance_scale=7.5, scheduler="DDIMScheduler", from_previous=False,
                 preview_strength=DEFAULT_PREVIEW_STRENGTH, predictor=None):
        for name, value in (("steps", steps), ("preview_steps", preview_steps)):
            if type(value) is not int or value < 2:
                raise SessionError(f"{name} {value!r}: an int >= 2")
        if type(seed) is not int or seed < 0:
            raise SessionError(f"seed {seed!r}: an int >= 0")
        if not 0 < preview_strength <= 1:
            raise SessionError(f"preview_strength {preview_strength!r}: a share of the preview schedule in (0, 1]")
        self.edge, self.cloud = edge_model, cloud
        self.steps, self.preview_steps, self.seed = steps, preview_steps, seed
        self.guidance_scale, self.scheduler = guidance_scale, scheduler
        self.from_previous, self.preview_strength = from_previous, preview_strength
        self.predictor = predictor  # a predictor.NoisePredictor: finalize()'s strength when none is given
        self.rounds = []

    @property
    def last_preview(self):
        return next((r for r in reversed(self.rounds) if r.kind == "preview"), None)

    def spec(self, prompt, plan):
        s = self.edge.make_scheduler(self.scheduler)
        return SessionSpec(prompt=prompt, plan=plan, scheduler=type(s).__name__, scheduler_config=dict(s.config),
                           guidance_scale=self.guidance_scale, seed=self.seed)

    def preview(self, prompt):
        """The edge's preview of ``prompt`` -> Round (also kept in ``rounds``)."""
        _check_prompt(prompt)
        start = time.perf_counter()
        previous = self.last_preview
        n = self.preview_steps
        if self.from_previous and previous is not None:  # image-to-image on the edge: redo the last steps only
            plan = _refine_plan(n, self.preview_strength, "edge")
            x, calls = self._run_here(self.edge, self.spec(prompt, plan), plan.segments[1:], previous.latent)
            r = Round("preview", prompt, x, 0.0, edge_calls=calls, strength=self.preview_strength, start="previous")
        else:
            plan = make("edge-only", n)
            x, calls = self._run_here(self.edge, self.spec(prompt, plan), plan.segments, None)
            r = Round("preview", prompt, x, 0.0, edge_calls=calls)
        r.wall_s = round(time.perf_counter() - start, 4)
        self.rounds.append(r)
        return r

    def finalize(self, prompt=None, strength=None, load=None):
        """The cloud refines the last preview with ``prompt`` (default: the last preview's) from ``strength``
        (the share of the final schedule redone: 1 starts from pure noise of the seed, x_0 ignored but for
        its shape; None: the predictor's choice, else DEFAULT_STRENGTH) -> Round. load: the cloud's
        utilisation the predictor weighs (None: what the cloud's health says now; 0 for a cloud in this
        process)."""
        previous = self.last_preview
        if previous is None:
            raise SessionError("finalize() needs a preview first: call preview(prompt)")
        if self.cloud is None:
            raise SessionError("this session has no cloud: give PromptSession(..., cloud=EdgeClient(...) or a model)")
        prompt = previous.prompt if prompt is None else prompt
        _check_prompt(prompt)
        start = time.perf_counter()  # the choice (a health request, two text encodings) is the final's time too
        choice = None
        if strength is None and self.predictor is not None:
            if load is None:
                load = self.cloud.health()["utilisation"] if hasattr(self.cloud, "health") else 0.0
            choice = self.predictor.choose_for(self.edge, previous.prompt, prompt, load)
            strength = choice.strength
        strength = DEFAULT_STRENGTH if strength is None else strength
        if not 0 < strength <= 1:
            raise SessionError(f"strength {strength!r}: the share of the final schedule the cloud redoes, in (0, 1]")
        plan = make("preview-refine", self.steps, strength=strength)
        spec = self.spec(prompt, plan)
        r = Round("final", prompt, None, 0.0, strength=strength, start="preview",
                  choice=None if choice is None else choice.to_plain())
        if hasattr(self.cloud, "run_remote"):  # an EdgeClient: the cloud is another process
            up, down = self.cloud.bytes_up, self.cloud.bytes_down
            x, _, calls, _ = self.cloud.run_remote(spec, 1, 2, x=previous.latent)
            r.bytes_up, r.bytes_down = self.cloud.bytes_up - up, self.cloud.bytes_down - down
            r.load = None if self.cloud.load is None else self.cloud.load.to_plain()
        else:
            x, calls = self._run_here(self.cloud, spec, plan.segments[1:], previous.latent)
        r.latent, r.cloud_calls = on_model(self.edge, x), calls
        r.wall_s = round(time.perf_counter() - start, 4)
        self.rounds.append(r)
        return r

    def _run_here(self, model, spec, segments, x0):
        """Segments of spec's plan with ``model`` in this process, from x_T (x0 None) or from the clean x0 a
        re-noising segment takes -> (latent, model calls)."""
        scheduler = spec.make_scheduler()
        sampler = FusedSampler(scheduler, device=model_device(model))
        x = initial_noise(model, spec.seed, scheduler) if x0 is None else on_model(model, x0)
        run = drive(SegmentRun(spec, segments, sampler, model.encode_prompt(spec.prompt, spec.negative_prompt), x),
                    model)
        return run.x, run.calls


def _refine_plan(num_steps, strength, side):
    """A full run on the edge, then ``side`` re-noising its result to ``strength`` and finishing: the
    preview-refine plan, or with side "edge" image-to-image on the edge."""
    start = num_steps - max(1, round(strength * num_steps))
    return Plan(f"preview-refine-{side}", num_steps, (Segment("edge", 0, num_steps),
                                                      Segment(side, start, num_steps, renoise=True)),
                {"strength": strength})


def _check_prompt(prompt):
    if type(prompt) is not str or not prompt.strip():
        raise SessionError(f"prompt {prompt!r}: a non-empty string")
