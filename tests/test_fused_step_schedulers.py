"""The fused step against diffusers' LCMScheduler and CogVideoXDDIMScheduler, step by step and whole loops.

Each step starts from diffusers' own trajectory x_t with random model outputs under classifier-free
guidance, m = u + g (c - u), and the same noise (LCM draws it from the generator it is handed; we draw
the same stream). Every element must agree with diffusers' float32 step within the float32 rounding of
the terms the update sums (16 eps32 times the update evaluated on absolute values), plus one rounding
to the latent's dtype: bfloat16 latents are compared with diffusers' float32 step on the same
bfloat16-representable inputs, so the only extra error is the final rounding.
"""
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, LCMScheduler

from latentwire.kernels import FusedSampler, UnsupportedScheduler, fused_step_ref, table_for
from latentwire.kernels.step_table import A0, AE, AN, AX, E0, EM, EX, PM, PX

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there; interpreted here (conftest.py)
EPS32 = torch.finfo(torch.float32).eps
G = 7.5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas

LCM_CASES = [
    # (id, config, set_timesteps kwargs besides the step count)
    ("lcm-eps", dict(), {}),  # LCMScheduler's defaults: SD betas, original_inference_steps=50
    ("lcm-v", dict(prediction_type="v_prediction"), {}),
    ("lcm-sample-clip", dict(prediction_type="sample", clip_sample=True), {}),
    ("lcm-eps-clip2", dict(clip_sample=True, clip_sample_range=2.0), {}),
    ("lcm-eps-strength", dict(), dict(strength=0.6)),
    ("lcm-v-orig100-scaling5", dict(prediction_type="v_prediction", timestep_scaling=5.0),
     dict(original_inference_steps=100)),
    ("lcm-v-zero-snr", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True), {}),
    ("lcm-sample-linear-no-alpha-one", dict(prediction_type="sample", beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, set_alpha_to_one=False), {}),
]
COG_CASES = [
    # CogVideoX-5b's scheduler config, then 2b's (snr_shift_scale 3), then the class defaults
    ("cog-v-5b", dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                      clip_sample=False, snr_shift_scale=1.0), {}),
    ("cog-v-2b", dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                      clip_sample=False, snr_shift_scale=3.0), {}),
    ("cog-eps-default", dict(), {}),  # clip_sample=True, which diffusers' step never applies
    ("cog-sample-leading-offset", dict(prediction_type="sample", steps_offset=1, set_alpha_to_one=False), {}),
    ("cog-eps-linspace", dict(timestep_spacing="linspace", snr_shift_scale=2.0), {}),
    ("cog-v-linear", dict(prediction_type="v_prediction", beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
     {}),
]
CASES = ([(cid, LCMScheduler, cfg, kw) for cid, cfg, kw in LCM_CASES]
         + [(cid, CogVideoXDDIMScheduler, cfg, kw) for cid, cfg, kw in COG_CASES])
SHAPES = [(2, 4, 5, 7), (1, 16, 3, 6, 10)]  # an odd image batch and a 5-D video latent (B, C, F, H, W)
DTYPES = [torch.float32, torch.bfloat16]


def _scheduler(cls, config, steps, set_kwargs):
    s = cls(**config)
    s.set_timesteps(steps, **set_kwargs)
    return s


def _bound(sampler, x, models, weights, step, noise):
    """Elementwise sum of |terms| of the update: the reference on absolute values and coefficients,
    unclipped (clamping only shrinks |x_0|)."""
    b = x.shape[0]
    w = torch.tensor([weights], dtype=torch.float32).expand(b, len(weights)).abs()
    steps = torch.full((b,), step, dtype=torch.int64)
    return fused_step_ref(x.float().abs(), [m.float().abs() for m in models], w, sampler.coef.cpu().abs(), steps,
                          None if noise is None else noise.float().abs()).x_next.float()


def _excess(got, want, bound, dtype):
    """max(|got - want| - tol) for tol = 16 eps32 (sum of |terms|) + one ulp of dtype at |want|: <= 0 passes."""
    err = (got.float().cpu() - want.float()).abs()
    tol = 16 * EPS32 * bound + torch.finfo(dtype).eps * want.float().abs()
    return (err - tol).max().item()


def _draw(shape, seed):
    """What diffusers' randn_tensor(shape, generator=torch.Generator().manual_seed(seed)) draws on the CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run(cls, config, set_kwargs, steps, shape, dtype, backend="cpu", device="cpu", seed=0):
    """Every step of set_timesteps(steps) from diffusers' trajectory: the worst excess over the rounding
    bound, and per step the share of x_0 values beyond the clip (our x_0, unclamped)."""
    theirs = _scheduler(cls, config, steps, set_kwargs)
    sampler = FusedSampler(theirs, device=device, backend=backend)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    worst, beyond = -float("inf"), []
    for i, t in enumerate(theirs.timesteps):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x, u, c = (v.to(dtype).float() for v in (x, u, c))  # inputs both sides can hold exactly
        kwargs = {"generator": torch.Generator().manual_seed(1000 + i)} if cls is LCMScheduler else {}
        expected = theirs.step(u + G * (c - u), t, x, **kwargs).prev_sample
        noise = _draw(shape, 1000 + i) if sampler.stochastic else None  # diffusers' draw (unused at AN = 0)
        ours, _ = sampler.step(x.to(device, dtype), i, cond=c.to(device, dtype), uncond=u.to(device, dtype),
                               guidance_scale=G, noise=None if noise is None else noise.to(device))
        assert ours.dtype == dtype and ours.shape == x.shape
        worst = max(worst, _excess(ours, expected, _bound(sampler, x, [u, c], [1 - G, G], i, noise), dtype))
        if sampler.table.clip is not None:
            x0 = fused_step_ref(x, [u, c], torch.tensor([[1 - G, G]]).expand(shape[0], 2), sampler.coef.cpu(),
                                torch.full((shape[0],), i)).x0
            beyond.append((x0.abs() > sampler.table.clip).double().mean().item())
        x = expected
    return worst, beyond


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
@pytest.mark.parametrize("steps", [1, 4, 7, 25])
@pytest.mark.parametrize("case_id, cls, config, set_kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_every_step_matches_diffusers(case_id, cls, config, set_kwargs, steps, shape, dtype, backend):
    worst, beyond = _run(cls, config, set_kwargs, steps, shape, dtype, backend)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"
    if beyond:  # the clamp was exercised: part of some step's x_0, not all
        assert any(0 < share < 1 for share in beyond), f"shares of x_0 beyond the clip per step: {beyond}"


def test_lcm_rows_follow_its_own_timesteps_and_end_without_noise():
    """abar_prev is read at the next entry of scheduler.timesteps (LCM's spacing, not t - stride), and
    the last step adds no noise: there x_next is diffusers' ``denoised``, the pipeline's final latent."""
    s = _scheduler(LCMScheduler, {}, 4, {})
    assert s.timesteps.tolist() == [999, 759, 499, 259]  # not DDIM's 750, 500, 250 spacing
    sampler = FusedSampler(s)
    abar = s.alphas_cumprod.double()
    assert torch.allclose(sampler.table.coef[:-1, AN], (1 - abar[[759, 499, 259]]).sqrt(), rtol=1e-12, atol=0)
    assert sampler.table.coef[-1, AN] == 0
    g = torch.Generator().manual_seed(4)
    x, u, c = (torch.randn(2, 4, 5, 7, generator=g) for _ in range(3))
    for i in range(3):
        s.step(u, s.timesteps[i], x, generator=torch.Generator().manual_seed(i))  # advance diffusers' step index
    out = s.step(u + G * (c - u), s.timesteps[3], x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out.prev_sample, out.denoised)
    ours, _ = sampler.step(x, 3, cond=c, uncond=u, guidance_scale=G, noise=torch.zeros_like(x))
    assert _excess(ours, out.denoised, _bound(sampler, x, [u, c], [1 - G, G], 3, None), torch.float32) <= 0


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_lcm_custom_timesteps_match_diffusers(strength):
    """Custom timesteps (and a partial schedule of them, diffusers' img2img): rows from the scheduler's
    own timesteps. With strength < 1 diffusers' step index never reaches num_inference_steps - 1, so its
    every step adds noise (the last with abar_prev = abar_t): the table does the same."""
    cfg = dict(prediction_type="v_prediction")
    theirs = LCMScheduler(**cfg)
    theirs.set_timesteps(timesteps=[999, 759, 499, 259, 19], strength=strength)
    sampler = FusedSampler(theirs)
    g = torch.Generator().manual_seed(6)
    shape = (2, 4, 5, 7)
    x = torch.randn(shape, generator=g)
    for i, t in enumerate(theirs.timesteps):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        expected = theirs.step(u + G * (c - u), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = _draw(shape, i)
        ours, _ = sampler.step(x, i, cond=c, uncond=u, guidance_scale=G, noise=noise)
        assert _excess(ours, expected, _bound(sampler, x, [u, c], [1 - G, G], i, noise), torch.float32) <= 0
        x = expected
    assert (sampler.table.coef[-1, AN] != 0) == (strength < 1)


def _stand_in_model(cond_dir):
    def model(x, t):  # eps_u, eps_c: smooth in x and t, as a UNet's are
        u = torch.tanh(x) * (1 - t / 2000)
        return u, u + 0.3 * cond_dir
    return model


LOOP_CASES = [c for c in CASES if c[0] in ("lcm-eps", "lcm-sample-clip", "lcm-v-zero-snr", "cog-v-5b",
                                            "cog-eps-default", "cog-sample-leading-offset")]


@pytest.mark.parametrize("steps", [4, 7, 25])
@pytest.mark.parametrize("case_id, cls, config, set_kwargs", LOOP_CASES, ids=[c[0] for c in LOOP_CASES])
def test_whole_loop_matches_diffusers_loop(case_id, cls, config, set_kwargs, steps):
    """The whole loop from x_T, each trajectory fed back into itself through a deterministic stand-in
    model, errors free to accumulate; LCM's noise from one generator across the loop, as a pipeline
    passes it (we draw from a twin, at the steps that add noise)."""
    s = _scheduler(cls, config, steps, set_kwargs)
    sampler = FusedSampler(s)
    shape = (1, 16, 3, 6, 10) if cls is CogVideoXDDIMScheduler else (2, 4, 5, 7)
    g = torch.Generator().manual_seed(11)
    x_T, cond_dir = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    model = _stand_in_model(cond_dir)
    gen, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    theirs = ours = x_T
    for i, t in enumerate(s.timesteps):
        u, c = model(theirs, int(t))
        kwargs = {"generator": gen} if cls is LCMScheduler else {}
        theirs = s.step(u + G * (c - u), t, theirs, **kwargs).prev_sample
        noise = None
        if sampler.stochastic:
            noise = torch.randn(shape, generator=twin) if sampler.coef[i, AN] != 0 else torch.zeros(shape)
        u, c = model(ours, int(t))
        ours, _ = sampler.step(ours, i, cond=c, uncond=u, guidance_scale=G, noise=noise)
    err = ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()
    # each step rounds a few float32 operations (within 16 eps32 of the output, as each step's bound);
    # the updates contract, so the loop at most adds them up
    assert err <= steps * 16 * EPS32, err


@pytest.mark.parametrize("backend", ["cpu", "ref"])
@pytest.mark.parametrize("cls, config", [(LCMScheduler, dict(clip_sample=True)),
                                         (CogVideoXDDIMScheduler, dict(prediction_type="v_prediction"))],
                         ids=["lcm-clip", "cog-v"])
def test_per_row_batch_matches_diffusers_row_by_row(cls, config, backend):
    """Rows at different steps with different guidance scales (step-level batching): each row equals
    diffusers' step on that row alone, at its timestep (LCM: a fresh scheduler finds its step index
    from the timestep; its noise drawn from that row's generator)."""
    steps = 8
    sampler = FusedSampler(_scheduler(cls, config, steps, {}), backend=backend)
    g = torch.Generator().manual_seed(8)
    shape = (4, 4, 9, 7)
    x, u, c = (torch.randn(shape, generator=g) for _ in range(3))
    rows = torch.tensor([0, 3, 6, 7])
    scales = torch.tensor([1.0, 3.0, 7.5, 12.0])
    z = torch.cat([_draw((1,) + shape[1:], 100 + b) for b in range(4)])
    ours, _ = sampler.step(x, rows, cond=c, uncond=u, guidance_scale=scales, noise=z if sampler.stochastic else None)
    for b in range(4):
        s = _scheduler(cls, config, steps, {})
        i, gb, r = int(rows[b]), float(scales[b]), slice(b, b + 1)
        kwargs = {"generator": torch.Generator().manual_seed(100 + b)} if cls is LCMScheduler else {}
        theirs = s.step(u[r] + gb * (c[r] - u[r]), s.timesteps[i], x[r], **kwargs).prev_sample
        bound = _bound(sampler, x[r], [u[r], c[r]], [1 - gb, gb], i, z[r] if sampler.stochastic else None)
        assert _excess(ours[r], theirs, bound, torch.float32) <= 0


@pytest.mark.parametrize("case_id, cls, config, set_kwargs, shape",
                         [("lcm-eps-clip", LCMScheduler, dict(clip_sample=True), {}, (1, 4, 3, 5)),
                          ("cog-v-5b", CogVideoXDDIMScheduler, COG_CASES[0][1], {}, (1, 4, 2, 3, 5))],
                         ids=["lcm-eps-clip", "cog-v-5b-video"])
def test_triton_kernel_matches_diffusers(case_id, cls, config, set_kwargs, shape):
    """The new tables through the Triton kernel (compiled on CUDA, interpreted on the CPU)."""
    worst, beyond = _run(cls, config, set_kwargs, 4, shape, torch.float32, backend="triton", device=TRITON_DEVICE)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"
    if beyond:
        assert any(0 < share < 1 for share in beyond), beyond


def test_cogvideox_never_clips_whatever_clip_sample_says():
    """clip_sample=True (the class default) is not read by diffusers' step: neither is it by the table."""
    s = _scheduler(CogVideoXDDIMScheduler, {}, 5, {})
    assert s.config.clip_sample
    assert FusedSampler(s).table.clip is None
    g = torch.Generator().manual_seed(2)
    x, m = (torch.randn(1, 4, 5, 7, generator=g) for _ in range(2))
    out = s.step(m, s.timesteps[0], x)
    assert out.pred_original_sample.abs().max() > s.config.clip_sample_range  # clipping would have mattered
    ours, _ = FusedSampler(s).step(x, 0, model_output=m)
    assert _excess(ours, out.prev_sample, _bound(FusedSampler(s), x, [m], [1.0], 0, None), torch.float32) <= 0


def test_cogvideox_is_ddim_at_eta_0_without_clipping():
    """a_t x_t + b_t x_0 is DDIM's sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps with eps from x_0: the
    rows fold to the same update as DDIMScheduler's on the same (shifted) schedule, to float64 rounding."""
    cog = _scheduler(CogVideoXDDIMScheduler, dict(prediction_type="v_prediction", snr_shift_scale=2.0), 9, {})
    ddim = DDIMScheduler(**SD, prediction_type="v_prediction", clip_sample=False)
    ddim.alphas_cumprod = cog.alphas_cumprod  # the shifted schedule
    ddim.set_timesteps(9)
    assert ddim.timesteps.tolist() == cog.timesteps.tolist()
    ours, ref = table_for(cog).coef, table_for(ddim).coef

    def fold(k):  # x_next = CX x + CM m
        return (k[:, AX] + k[:, A0] * k[:, PX] + k[:, AE] * (k[:, EX] + k[:, E0] * k[:, PX]),
                k[:, A0] * k[:, PM] + k[:, AE] * (k[:, EM] + k[:, E0] * k[:, PM]))

    for a, b in zip(fold(ours), fold(ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, options, match", [
    (lambda: LCMScheduler(thresholding=True), {}, "thresholding"),
    (lambda: LCMScheduler(prediction_type="flow_prediction"), {}, "prediction_type"),
    (lambda: LCMScheduler(rescale_betas_zero_snr=True), {}, "alphas_cumprod is 0"),
    (lambda: CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"), {},
     "alphas_cumprod is 0"),
    (lambda: CogVideoXDDIMScheduler(prediction_type="flow_prediction"), {}, "prediction_type"),
    (lambda: CogVideoXDDIMScheduler(), {"eta": 1e-3}, "eta=0.001"),
    (lambda: CogVideoXDDIMScheduler(), {"use_clipped_model_output": True}, "use_clipped_model_output"),
])
def test_unsupported_configurations_say_so(make, options, match):
    s = make()
    s.set_timesteps(4)
    with pytest.raises(UnsupportedScheduler, match=match):
        table_for(s, **options)


def test_cogvideox_options_at_their_edge():
    """eta = 0 and use_clipped_model_output=False (what diffusers' step does anyway) are accepted; through
    FusedSampler, which passes such options to DDIMScheduler only, any other value is refused."""
    s = _scheduler(CogVideoXDDIMScheduler, {}, 4, {})
    assert torch.equal(table_for(s, eta=0.0, use_clipped_model_output=False).coef, table_for(s).coef)
    with pytest.raises(ValueError, match="DDIM options"):
        FusedSampler(s, eta=1e-3)


def test_lcm_single_step_needs_no_noise():
    s = _scheduler(LCMScheduler, {}, 1, {})
    sampler = FusedSampler(s)
    assert not sampler.stochastic  # the only step is the last: x_next = denoised
    assert FusedSampler(_scheduler(LCMScheduler, {}, 2, {})).stochastic
