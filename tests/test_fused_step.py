"""The fused step against diffusers itself: every scheduler, prediction type and configuration variant.

Each step is checked from the same input x_t (diffusers' own trajectory), with random model outputs
and classifier-free guidance, against scheduler.step(eps_u + g (eps_c - eps_u), t, x).prev_sample:
max |ours - theirs| / max |theirs| <= 1e-5 in float32. Stochastic schedulers get the same noise.
DDIM is covered in every configuration its step has, clip_sample=True (its default) included; the
CPU paths are also held to ``fused_step_ref`` on random coefficients, element by element.
"""
import importlib
import zlib

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

from latentwire.kernels import FusedSampler, SolverState, UnsupportedScheduler, fused_step, fused_step_ref
from latentwire.kernels.step_table import AE, AN, NCOEF, PM, PX

RTOL = 1e-5
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there; interpreted here (conftest.py)
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
    # clip_sample=True, DDIMScheduler's default: x_0 clamped to [-clip_sample_range, clip_sample_range]
    ("ddim-eps-clip-default", DDIMScheduler, dict(SD), {}, {}),
    ("ddim-eps-clip-leading-eta", DDIMScheduler, dict(SD, set_alpha_to_one=False, steps_offset=1), {"eta": 0.5},
     {"eta": 0.5}),
    ("ddim-v-clip-trailing", DDIMScheduler, dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
     {}, {}),
    ("ddim-v-clip-eta-clipped-output", DDIMScheduler, dict(SD, prediction_type="v_prediction"),
     {"eta": 0.3, "use_clipped_model_output": True}, {"eta": 0.3, "use_clipped_model_output": True}),
    ("ddim-sample-clip-eta", DDIMScheduler, dict(SD, prediction_type="sample"), {"eta": 0.8}, {"eta": 0.8}),
    ("ddim-sample-clip-clipped-output", DDIMScheduler, dict(SD, prediction_type="sample"),
     {"use_clipped_model_output": True}, {"use_clipped_model_output": True}),
    ("ddim-eps-clip-range2-clipped-output", DDIMScheduler, dict(SD, clip_sample_range=2.0),
     {"use_clipped_model_output": True}, {"use_clipped_model_output": True}),
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


def _run(cls, config, step_kwargs, options, shape, steps, backend, seed=0, clamped=None):
    """Worst per-step relative error over the whole loop of set_timesteps(steps). clamped, a list, gets
    the share of x_0 values diffusers clamped at each step (for schedulers that clip)."""
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
        out = theirs.step(u + G * (c - u), t, x, **kwargs)
        expected = out.prev_sample
        if clamped is not None and sampler.table.clip is not None:
            clamped.append((out.pred_original_sample.abs() == sampler.table.clip).double().mean().item())
        ours, state = sampler.step(x, i, cond=c, uncond=u, guidance_scale=G, state=state,
                                   noise=noise if sampler.stochastic else None)
        worst = max(worst, _relative_error(ours, expected))
        x = expected
    return worst


@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
@pytest.mark.parametrize("case_id, cls, config, step_kwargs, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_every_step_matches_diffusers(case_id, cls, config, step_kwargs, options, shape, backend):
    clamped = []
    assert _run(cls, config, step_kwargs, options, shape, steps=10, backend=backend, clamped=clamped) <= RTOL
    if cls(**config).config.get("clip_sample", False):  # the clamp was exercised: part of some step's x_0, not all
        assert any(0 < share < 1 for share in clamped), f"shares of x_0 clamped per step: {clamped}"


@pytest.mark.parametrize("shape", [(1, 4, 13, 11), (2, 3, 7, 9)])
@pytest.mark.parametrize("options", [{}, {"eta": 0.6}, {"eta": 1.0, "use_clipped_model_output": True}],
                         ids=["eta0", "eta0.6", "eta1-clipped-output"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_default_clipping_loop_matches_diffusers_loop(prediction_type, options, shape):
    """DDIMScheduler as it comes (clip_sample=True), the whole loop from x_T: latentwire's trajectory
    against diffusers' own, through a deterministic stand-in model, errors free to accumulate."""
    s = DDIMScheduler(**SD, prediction_type=prediction_type)
    assert s.config.clip_sample and s.config.clip_sample_range == 1.0  # what the test is about
    s.set_timesteps(12)
    sampler = FusedSampler(s, **options)
    g = torch.Generator().manual_seed(11)
    x_T, cond_dir = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def model(x, t):  # eps_u, eps_c: smooth in x and t, as a UNet's are
        u = torch.tanh(x) * (1 - t / 2000)
        return u, u + 0.3 * cond_dir

    theirs = ours = x_T
    for i, t in enumerate(s.timesteps):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        u, c = model(theirs, int(t))
        theirs = s.step(u + G * (c - u), t, theirs, variance_noise=noise if options else None, **options).prev_sample
        u, c = model(ours, int(t))
        ours, _ = sampler.step(ours, i, cond=c, uncond=u, guidance_scale=G,
                               noise=noise if sampler.stochastic else None)
    assert _relative_error(ours, theirs) <= 10 * RTOL  # 12 steps of float32 rounding, each amplified


@pytest.mark.parametrize("backend", ["cpu", "ref"])
@pytest.mark.parametrize("prediction_type, options", [("epsilon", {}), ("v_prediction", {"eta": 0.5}),
                                                      ("sample", {"eta": 1.0, "use_clipped_model_output": True})],
                         ids=["eps", "v-eta", "sample-eta-clipped-output"])
def test_clipped_ddim_per_row_batch_matches_diffusers_row_by_row(prediction_type, options, backend):
    """A batch whose rows are at different steps with different guidance scales (the cloud's step-level
    batching): each row equals diffusers' DDIMScheduler.step (clip_sample=True) on that row alone."""
    s = DDIMScheduler(**SD, prediction_type=prediction_type, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(20)
    sampler = FusedSampler(s, backend=backend, **options)
    g = torch.Generator().manual_seed(8)
    shape = (4, 4, 9, 7)
    x, u, c, z = (torch.randn(shape, generator=g) for _ in range(4))
    steps = torch.tensor([0, 7, 13, 19])
    scales = torch.tensor([1.0, 3.0, 7.5, 12.0])
    ours, _ = sampler.step(x, steps, cond=c, uncond=u, guidance_scale=scales,
                           noise=z if sampler.stochastic else None)
    for b in range(4):
        t, gb = s.timesteps[int(steps[b])], float(scales[b])
        row = slice(b, b + 1)
        mo = u[row] + gb * (c[row] - u[row])
        theirs = s.step(mo, t, x[row], variance_noise=z[row] if options.get("eta") else None, **options).prev_sample
        assert _relative_error(ours[row], theirs) <= RTOL


SHAPES_ODD = [(3, 5, 7), (2, 3, 5, 7), (1, 4, 3, 2, 5)]


def _coef_table(g):
    """Random rows, and rows with the zeros real tables have: PX = 0 (sample prediction), PM = 0 (no
    model output reaches x_0), AE = 0 and AN = 0 (DDPM's last step)."""
    coef = torch.randn(5, NCOEF, generator=g)
    coef[1, PX] = 0.0
    coef[2, PM] = 0.0
    coef[3, AE] = 0.0
    coef[4, AN] = 0.0
    return coef


def _magnitude(x, models, weights, coef, step, noise, hist):
    """Elementwise bound on the sum of |terms| that any order of the update's float32 operations
    rounds: the reference on absolute values, unclipped (clamping only shrinks |x_0|)."""
    a = [None if t is None else t.float().abs() for t in (x, *models, noise, hist)]
    return fused_step_ref(a[0], a[1:-2], weights.abs(), coef.abs(), step, a[-2], a[-1]).x_next.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES_ODD, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("flags", ["plain", "noise+hist", "x0+m", "noise+hist+x0+m"])
@pytest.mark.parametrize("clip", [None, 0.8], ids=["no-clip", "clip"])
@pytest.mark.parametrize("rows", ["shared", "per-row"])
def test_cpu_paths_match_the_reference(rows, clip, flags, k, shape, dtype):
    """Both CPU paths (shared step: Python-float coefficients; per row: (B,) tensors), with and without
    clipping, every optional operand and output, on every kind of coefficient row, element by element
    within the float32 rounding of the terms they sum (plus one rounding to dtype)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((rows, clip, flags, k, shape)).encode()))
    b = shape[0]
    x = torch.randn(shape, generator=g).to(dtype)
    models = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    coef = _coef_table(g)
    noise = hist = None
    if "noise" in flags:
        noise, hist = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    want = "x0" in flags
    clamped = 0
    for step_index in range(coef.shape[0]):
        if rows == "shared":
            w_list = torch.randn(k, generator=g).tolist()
            weights, step = w_list, step_index
            w_rows, step_rows = torch.tensor([w_list]).expand(b, k), torch.full((b,), step_index)
        else:
            w_rows = weights = torch.randn(b, k, generator=g)
            step_rows = step = (torch.arange(b) + step_index) % coef.shape[0]
        ours = fused_step(x, models, weights, coef, step, noise, hist, clip, want_x0=want, want_m=want, backend="cpu")
        ref = fused_step_ref(x, models, w_rows, coef, step_rows, noise, hist, clip)
        bound = _magnitude(x, models, w_rows, coef, step_rows, noise, hist)
        unclipped = fused_step_ref(x, models, w_rows, coef, step_rows, noise, hist).x0.float()
        clamped += int((unclipped.abs() > (clip or float("inf"))).sum())
        assert ours.x_next.dtype == dtype and ours.x_next.shape == x.shape
        _assert_within_rounding(ours.x_next, ref.x_next, bound, dtype)
        if want:
            _assert_within_rounding(ours.x0, ref.x0, _x0_bound(x, models, w_rows, coef, step_rows), dtype)
            _assert_within_rounding(ours.m, ref.m, _m_bound(models, w_rows), dtype)
        else:
            assert ours.x0 is None and ours.m is None
    if clip is not None:
        assert clamped > 0  # the clamp was exercised


def _x0_bound(x, models, w, coef, step):
    a = fused_step_ref(x.float().abs(), [m.float().abs() for m in models], w.abs(), coef.abs(), step)
    return a.x0.float()


def _m_bound(models, w):
    view = (len(models), w.shape[0]) + (1,) * (models[0].dim() - 1)
    return sum(wk.abs() * m.float().abs() for wk, m in zip(w.t().reshape(view), models))


def _assert_within_rounding(got, want, bound, dtype):
    """|got - want| <= 16 eps32 (sum of |terms|) + one ulp of dtype at |want| (both are rounded to it)."""
    err = (got.float() - want.float()).abs()
    tol = 16 * torch.finfo(torch.float32).eps * bound + torch.finfo(dtype).eps * want.float().abs()
    worst = (err - tol).max().item()
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e} (max error {err.max().item():.3e})"


@pytest.mark.parametrize("rows", ["shared", "per-row"])
def test_clipped_cpu_path_with_zero_weights_falls_back_exactly(rows):
    """No model output reaching x_0 (every weight 0, e.g. guidance that cancels) takes the general path."""
    g = torch.Generator().manual_seed(21)
    x, u, c = (torch.randn(2, 3, 5, generator=g) for _ in range(3))
    coef = torch.randn(3, NCOEF, generator=g)
    w_rows = torch.zeros(2, 2)
    weights, step = ([0.0, 0.0], 1) if rows == "shared" else (w_rows, torch.tensor([1, 1]))
    ours = fused_step(x, [u, c], weights, coef, step, clip=0.3, want_x0=True, want_m=True, backend="cpu")
    ref = fused_step_ref(x, [u, c], w_rows, coef, torch.tensor([1, 1]), clip=0.3)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_schedule_lengths(steps):
    for cls, config in [(DPMSolverMultistepScheduler, dict(SD)), (DDIMScheduler, dict(SD, clip_sample=False)),
                        (EulerDiscreteScheduler, dict(SD))]:
        assert _run(cls, config, {}, {}, (1, 4, 5, 6), steps, "cpu") <= RTOL


@pytest.mark.parametrize("backend", ["cpu", "ref", "triton"])
@pytest.mark.parametrize("make", [lambda: DPMSolverMultistepScheduler(**SD), lambda: DDIMScheduler(**SD)],
                         ids=["dpmpp2m", "ddim-clip"])
def test_per_row_batch_equals_rows_stepped_one_at_a_time(make, backend):
    s = make()
    s.set_timesteps(12)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    sampler = FusedSampler(s, device=device, backend=backend)
    g = torch.Generator().manual_seed(5)
    x, u, c, h = (torch.randn(3, 4, 9, 10, generator=g).to(device) for _ in range(4))
    steps = torch.tensor([0, 5, 11], device=device)
    scales = torch.tensor([1.0, 4.0, 9.5], device=device)
    batched, _ = sampler.step(x, steps, cond=c, uncond=u, guidance_scale=scales, state=SolverState(h))
    for b in range(3):  # a row alone: a shared step, the other CPU path
        one, _ = sampler.step(x[b:b + 1], int(steps[b]), cond=c[b:b + 1], uncond=u[b:b + 1],
                              guidance_scale=float(scales[b]), state=SolverState(h[b:b + 1]))
        torch.testing.assert_close(batched[b:b + 1], one, rtol=1e-6, atol=1e-6 * one.abs().max().item())


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


def test_shared_step_rereads_a_coefficient_table_edited_in_place():
    """The shared-step CPU path keeps a host copy of each table; editing the table in place, or a new
    table in its place, must be seen at the next step."""
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for clip in (None, 0.7):
        coef = torch.randn(4, NCOEF, generator=g)
        for _ in range(2):  # the first call fills the copy, the second reads it
            first = fused_step(x, [u], [1.5], coef, 2, clip=clip, backend="cpu").x_next
        coef[2] *= 2.0
        ours = fused_step(x, [u], [1.5], coef, 2, clip=clip, backend="cpu").x_next
        ref = fused_step_ref(x, [u], torch.full((2, 1), 1.5), coef, torch.tensor([2, 2]), clip=clip).x_next
        assert not torch.allclose(ours, first)
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
        other = coef.clone()  # another table: its own copy
        other[2] = -other[2]
        ref = fused_step_ref(x, [u], torch.full((2, 1), 1.5), other, torch.tensor([2, 2]), clip=clip).x_next
        torch.testing.assert_close(fused_step(x, [u], [1.5], other, 2, clip=clip, backend="cpu").x_next, ref,
                                   rtol=2e-6, atol=2e-6 * ref.abs().max().item())


def test_shared_step_on_a_table_made_in_inference_mode():
    """Inference tensors keep no version counter: the host row is read each step, edits are seen."""
    g = torch.Generator().manual_seed(4)
    x, u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    with torch.inference_mode():
        coef = torch.randn(4, NCOEF, generator=g)
        for clip in (None, 0.7):
            for scale in (1.0, -3.0):
                coef[1] *= scale
                ours = fused_step(x, [u], [1.5], coef, 1, clip=clip, backend="cpu").x_next
                ref = fused_step_ref(x, [u], torch.full((2, 1), 1.5), coef, torch.tensor([1, 1]), clip=clip).x_next
                torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


def test_host_copies_of_freed_tables_are_dropped():
    memo = importlib.import_module("latentwire.kernels.fused_step")._HOST_ROWS
    x = torch.randn(1, 2, 3)
    coef = torch.randn(3, NCOEF)
    fused_step(x, [x], [1.0], coef, 1, backend="cpu")
    key = id(coef)
    assert key in memo
    del coef
    assert key not in memo  # a long-lived cloud daemon builds a table per session: none may pile up
