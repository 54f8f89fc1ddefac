"""The fused step against diffusers itself: every scheduler, prediction type and configuration variant.

Each step is checked from the same input x_t (diffusers' own trajectory), with random model outputs
and classifier-free guidance, against scheduler.step(eps_u + g (eps_c - eps_u), t, x).prev_sample:
max |ours - theirs| / max |theirs| <= 1e-5 in float32. Stochastic schedulers get the same noise.
"""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

from latentwire.kernels import FusedSampler, UnsupportedScheduler

RTOL = 1e-5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas
G = 7.5

CASES = [
    # (id, scheduler class, config, extra step kwargs for diffusers, sampler options)
    ("ddim-eps-leading", DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}, {}),
    ("ddim-v-trailing", DDIMScheduler, dict(SD, prediction_type="v_prediction", timestep_spacing="trailing",
                                            clip_sample=False, set_alpha_to_one=False), {}, {}),
    ("ddim-sample-linspace-clip", DDIMScheduler, dict(prediction_type="sample", timestep_spacing="linspace",
                                                      clip_sample=True, set_alpha_to_one=True), {}, {}),
    ("ddim-eps-eta", DDIMScheduler, dict(SD, clip_sample=False), {"eta": 0.7}, {"eta": 0.7}),
    ("ddim-eps-eta1-clipped-output", DDIMScheduler, dict(clip_sample=True), {"eta": 1.0, "use_clipped_model_output": True},
     {"eta": 1.0, "use_clipped_model_output": True}),
    ("ddpm-eps-default", DDPMScheduler, dict(), {}, {}),
    ("ddpm-v-small-log-noclip", DDPMScheduler, dict(SD, prediction_type="v_prediction", variance_type="fixed_small_log",
                                                    clip_sample=False, timestep_spacing="trailing"), {}, {}),
    ("ddpm-sample-large-leading", DDPMScheduler, dict(prediction_type="sample", variance_type="fixed_large",
                                                      steps_offset=1), {}, {}),
    ("euler-eps-leading", EulerDiscreteScheduler, dict(SD, steps_offset=1), {}, {}),
    ("euler-v-trailing", EulerDiscreteScheduler, dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
     {}, {}),
    ("euler-sample-karras", EulerDiscreteScheduler, dict(SD, prediction_type="sample", use_karras_sigmas=True), {}, {}),
    ("euler-eps-linspace-sigma-min", EulerDiscreteScheduler, dict(SD, timestep_spacing="linspace",
                                                                  final_sigmas_type="sigma_min"), {}, {}),
    ("euler-ancestral-eps", EulerAncestralDiscreteScheduler, dict(SD, steps_offset=1), {}, {}),
    ("euler-ancestral-v-trailing", EulerAncestralDiscreteScheduler, dict(SD, prediction_type="v_prediction",
                                                                         timestep_spacing="trailing"), {}, {}),
    ("dpmpp2m-eps", DPMSolverMultistepScheduler, dict(SD), {}, {}),
    ("dpmpp2m-v-karras", DPMSolverMultistepScheduler, dict(SD, prediction_type="v_prediction", use_karras_sigmas=True),
     {}, {}),
    ("dpmpp2m-sample-heun", DPMSolverMultistepScheduler, dict(SD, prediction_type="sample", solver_type="heun"), {}, {}),
    ("dpmpp2m-eps-sigma-min-no-lower-final", DPMSolverMultistepScheduler,
     dict(SD, final_sigmas_type="sigma_min", lower_order_final=False, timestep_spacing="trailing"), {}, {}),
    ("dpmpp2m-eps-euler-at-final", DPMSolverMultistepScheduler,
     dict(SD, final_sigmas_type="sigma_min", euler_at_final=True, timestep_spacing="leading", steps_offset=1), {}, {}),
    ("dpmpp1-eps", DPMSolverMultistepScheduler, dict(SD, solver_order=1), {}, {}),
    ("flow-euler-sd3", FlowMatchEulerDiscreteScheduler, dict(shift=3.0), {}, {}),
    ("flow-euler-shift1", FlowMatchEulerDiscreteScheduler, dict(shift=1.0), {}, {}),
    ("flow-euler-stochastic", FlowMatchEulerDiscreteScheduler, dict(shift=3.0, stochastic_sampling=True), {}, {}),
]
SHAPES = [(3, 4, 17, 23), (1, 4, 3, 6, 7)]  # an odd image batch and a 5-D video latent


def _relative_error(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def _run(cls, config, step_kwargs, options, shape, steps, backend, seed=0):
    """Worst per-step relative error over the whole loop of set_timesteps(steps)."""
    theirs = cls(**config)
    theirs.set_timesteps(steps)
    sampler = FusedSampler(theirs, backend=backend, **options)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * float(getattr(theirs, "init_noise_sigma", 1.0))
    state, worst = None, 0.0
    for i, t in enumerate(theirs.timesteps):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        noise_seed = 1000 + i
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
        kwargs = dict(step_kwargs)
        if sampler.stochastic:
            if cls is DDIMScheduler:
                kwargs["variance_noise"] = noise
            else:  # these draw randn_tensor(shape, generator) themselves: hand them the same stream
                kwargs["generator"] = torch.Generator().manual_seed(noise_seed)
        expected = theirs.step(u + G * (c - u), t, x, **kwargs).prev_sample
        ours, state = sampler.step(x, i, cond=c, uncond=u, guidance_scale=G, state=state,
                                   noise=noise if sampler.stochastic else None)
        worst = max(worst, _relative_error(ours, expected))
        x = expected
    return worst


@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
@pytest.mark.parametrize("case_id, cls, config, step_kwargs, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_every_step_matches_diffusers(case_id, cls, config, step_kwargs, options, shape, backend):
    assert _run(cls, config, step_kwargs, options, shape, steps=10, backend=backend) <= RTOL


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_schedule_lengths(steps):
    for cls, config in [(DPMSolverMultistepScheduler, dict(SD)), (DDIMScheduler, dict(SD, clip_sample=False)),
                        (EulerDiscreteScheduler, dict(SD))]:
        assert _run(cls, config, {}, {}, (1, 4, 5, 6), steps, "cpu") <= RTOL


@pytest.mark.parametrize("backend", ["cpu", "ref", "triton"])
def test_per_row_batch_equals_rows_stepped_one_at_a_time(backend):
    s = DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(12)
    sampler = FusedSampler(s, backend=backend)
    g = torch.Generator().manual_seed(5)
    x, u, c, h = (torch.randn(3, 4, 9, 10, generator=g) for _ in range(4))
    steps = torch.tensor([0, 5, 11])
    scales = torch.tensor([1.0, 4.0, 9.5])
    from latentwire.kernels import SolverState
    batched, _ = sampler.step(x, steps, cond=c, uncond=u, guidance_scale=scales, state=SolverState(h))
    for b in range(3):
        one, _ = sampler.step(x[b:b + 1], int(steps[b]), cond=c[b:b + 1], uncond=u[b:b + 1],
                              guidance_scale=float(scales[b]), state=SolverState(h[b:b + 1]))
        torch.testing.assert_close(batched[b:b + 1], one, rtol=1e-6, atol=1e-6)


def test_half_precision_latents_are_computed_in_float32():
    s = EulerDiscreteScheduler(**SD)
    s.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    x, u, c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    full, _ = FusedSampler(s).step(x, 3, cond=c, uncond=u, guidance_scale=G)
    for dtype in (torch.float16, torch.bfloat16):
        half, _ = FusedSampler(s).step(x.to(dtype), 3, cond=c.to(dtype), uncond=u.to(dtype), guidance_scale=G)
        assert half.dtype == dtype
        eps = torch.finfo(dtype).eps
        # inputs rounded to dtype (a relative eps/2 each, amplified by the step's coefficients ~ G), output rounded once
        assert _relative_error(half, full) <= 8 * G * eps


@pytest.mark.parametrize("make, match", [
    (lambda: DDIMScheduler(thresholding=True), "thresholding"),
    (lambda: DDPMScheduler(variance_type="learned_range"), "variance_type"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (lambda: DPMSolverMultistepScheduler(solver_order=3), "solver_order"),
    (lambda: EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type"),
])
def test_unsupported_configurations_say_so(make, match):
    s = make()
    s.set_timesteps(5)
    with pytest.raises(UnsupportedScheduler, match=match):
        FusedSampler(s)


def test_a_scheduler_without_a_schedule_is_refused():
    with pytest.raises(UnsupportedScheduler, match="set_timesteps"):
        FusedSampler(DDIMScheduler())


def test_stochastic_schedulers_need_noise():
    s = EulerAncestralDiscreteScheduler(**SD)
    s.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="pass noise"):
        FusedSampler(s).step(x, 0, model_output=x)


def test_bad_arguments_are_named():
    s = DDIMScheduler(**SD)
    s.set_timesteps(4)
    sampler = FusedSampler(s)
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match="outside 0..3"):
        sampler.step(x, 4, model_output=x)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        sampler.step(x, torch.tensor([0, 1, 2]), model_output=x)
    with pytest.raises(ValueError, match="not both"):
        sampler.step(x, 0, model_output=x, cond=x)
    with pytest.raises(ValueError, match="needs cond, uncond and guidance_scale"):
        sampler.step(x, 0, cond=x)
    with pytest.raises(ValueError, match="must match"):
        sampler.step(x, 0, model_output=torch.zeros(2, 4, 3, 4))
    with pytest.raises(ValueError, match="DDIM options"):
        e = EulerDiscreteScheduler()
        e.set_timesteps(3)
        FusedSampler(e, eta=0.5)
