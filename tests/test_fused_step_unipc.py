"""The fused step against diffusers' UniPCMultistepScheduler (its defaults: solver_order 2, bh2,
predict_x0, lower_order_final), step by step and whole loops; UniPC's state (SolverState ets, the kept
x_0 outputs, and sample, the corrected sample) across a handoff and after a restart.

The reference is diffusers' own step evaluated in float64 (the scheduler's float32 sigmas, widened):
diffusers' float32 step computes its coefficients in float32 from differences of lambda = log(alpha /
sigma), and these alone move its result by up to ~26 eps32 of max |x| at 25 steps (measured), more than
the rounding of the update; our coefficients are computed in float64 and rounded once. The float32
loop of diffusers is compared in the whole-loop test, through that deviation.

Each step starts from diffusers' trajectory x_t and diffusers' own state (model_outputs, last_sample),
both sides given the same values in the latent's dtype, with random model outputs under classifier-free
guidance m = u + g (c - u). x_next, the kept x_0,i and the kept corrected sample x^c_i must each agree
element by element within 16 eps32 times the terms the stage sums (its rows on absolute values), plus
eps of dtype at the output (its rounding) and, for x_next, at the terms of the stage-1 outputs the
predictor reads back (x_0,i and x^c_i, rounded to dtype in between).
"""
import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from latentwire.kernels import ECDiff, FusedSampler, SolverState, UnsupportedScheduler, run_steps
from latentwire.kernels.step_table import A0, AH, AN, AX, PM, PX
from latentwire.kernels.table_unipc import orders

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there; interpreted here (conftest.py)
EPS32 = torch.finfo(torch.float32).eps
G = 7.5
# Stable Diffusion v1.5's scheduler_config.json as UniPCMultistepScheduler.from_config reads it
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
CONFIGS = [
    ("sd", SD),
    ("sd-v", dict(SD, prediction_type="v_prediction")),
    ("default", dict()),
    ("default-v", dict(prediction_type="v_prediction")),
]
OTHER_CONFIGS = [
    ("sd-leading", dict(SD, timestep_spacing="leading")),
    ("sd-v-trailing", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("bh1-sigma-min", dict(SD, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("order1", dict(SD, solver_order=1)),
    ("no-lower-order-final", dict(SD, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("disable-corrector", dict(SD, disable_corrector=[0, 3])),
    ("karras-v", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
    ("sample", dict(SD, prediction_type="sample")),
    ("flow-shift3", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("zero-snr-v-trailing", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                 prediction_type="v_prediction")),
]
SHAPES = [(2, 4, 5, 7), (1, 4, 3, 6, 5)]  # an odd image batch and a 5-D video latent (B, C, F, H, W)
DTYPES = [torch.float32, torch.bfloat16]


def _scheduler(config, steps, exact=False):
    """UniPCMultistepScheduler after set_timesteps(steps); exact: its step evaluated in float64."""
    s = UniPCMultistepScheduler(**config)
    s.set_timesteps(steps)
    if exact:
        s.sigmas = s.sigmas.double()  # the same schedule values: every coefficient follows in float64
    return s


def _held(v, dtype):
    """v rounded to dtype, as float64: a value both sides hold exactly."""
    return v.to(dtype).double()


def _stage_bounds(table, i, p, q, x, m_abs, last, ets):
    """Elementwise sums of |terms| of x_0,i, x^c_i and x_next as the fused stages sum them (each stage's
    row on absolute values), and the predictor's coefficients on x^c_i and x_0,i (0, 0 in one stage)."""
    a = lambda t: t.abs().double()
    conv = table.coef[i].abs()
    x0 = conv[PX] * a(x) + conv[PM] * m_abs
    e = [a(t) for t in ets]
    if p == 0:
        r = table.plain[q - 1][i].abs()
        out = r[AX] * a(x) + r[A0] * x0 + (r[AH] * e[-1] if q == 2 else 0)
        return x0, a(x), out, (0.0, 0.0)
    c = table.corrector[p - 1][i].abs()
    xc = c[AX] * a(last) + c[A0] * x0 + (c[AH] * e[-1] if p == 1 else c[AN] * e[-1] + c[AH] * e[-2])
    r = table.predictor[q - 1][i].abs()
    out = r[AX] * xc + r[A0] * x0 + (r[AH] * e[-1] if q == 2 else 0)
    return x0, xc, out, (float(r[AX]), float(r[A0]))


def _excess(got, want, bound, dtype, rounded=0.0):
    """max(|got - want| - tol), tol = 16 eps32 (sum of |terms|) + eps of dtype at |want| and at ``rounded``
    (terms read back after a rounding to dtype): <= 0 passes."""
    err = (got.double().cpu() - want).abs()
    tol = 16 * EPS32 * bound + torch.finfo(dtype).eps * (want.abs() + rounded)
    return (err - tol).max().item()


def _run(config, steps, shape, dtype, backend="cpu", device="cpu", seed=0, start=0, per_row_scale=False,
         want_m=False):
    """Steps [start, N) of set_timesteps(steps), each from diffusers' trajectory and state (start > 0: a
    fresh diffusers scheduler begun there, and an empty SolverState) -> the worst excess over the bounds.
    Also checks the orders diffusers used against ``orders`` and the state's bookkeeping; want_m: steps
    through step_combined(want_m=True) and holds the m it returns to u + g (c - u)."""
    sampler = FusedSampler(_scheduler(config, steps), device=device, backend=backend)
    theirs = _scheduler(config, steps, exact=True)
    assert sampler.num_steps == len(theirs.timesteps) == steps
    theirs.set_begin_index(start)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).double()
    scale = torch.linspace(1.0, 12.0, shape[0]) if per_row_scale else G
    gv = scale.reshape((-1,) + (1,) * (len(shape) - 1)).double() if per_row_scale else scale
    worst = -float("inf")
    for i in range(start, steps):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x, u, c = (_held(v, dtype) for v in (x, u, c))
        theirs.model_outputs = [None if v is None else _held(v, dtype) for v in theirs.model_outputs]
        last = None if theirs.last_sample is None else _held(theirs.last_sample, dtype)
        theirs.last_sample = last
        ets = tuple(v for v in theirs.model_outputs if v is not None)
        state = None if last is None else SolverState(ets=tuple(v.to(device, dtype) for v in ets),
                                                      sample=last.to(device, dtype))
        p = theirs.this_order if (i > 0 and i - 1 not in theirs.disable_corrector and last is not None) else 0
        expected = theirs.step(u + gv * (c - u), theirs.timesteps[i], x).prev_sample
        q = theirs.this_order
        assert orders(sampler.table, i, len(ets), last is not None) == (p, q), f"step {i}"
        args = dict(cond=c.to(device, dtype), uncond=u.to(device, dtype),
                    guidance_scale=scale.to(device) if per_row_scale else G)
        if want_m:
            ours, new, m = sampler.step_combined(x.to(device, dtype), i, [args["uncond"], args["cond"]],
                                                 [1 - G, G], state=state, want_m=True)
        else:
            ours, new = sampler.step(x.to(device, dtype), i, state=state, **args)
        assert ours.dtype == dtype and ours.shape == x.shape
        kept = [v for v in theirs.model_outputs if v is not None]
        assert sorted(new.tensors()) == [f"ets.{j}" for j in range(len(kept))] + ["sample"]
        if state is not None:  # the older outputs are carried over, not copied
            assert all(a is b for a, b in zip(new.ets[:-1], state.ets[len(state.ets) + 1 - len(new.ets):]))
        m_abs = (u.abs() * (1 - gv).abs() + c.abs() * abs(gv) if per_row_scale else u.abs() * abs(1 - G) + c.abs() * G)
        x0_b, xc_b, out_b, (kx, k0) = _stage_bounds(sampler.table, i, p, q, x, m_abs, last, ets)
        rounded = kx * theirs.last_sample.abs() + k0 * kept[-1].abs()
        worst = max(worst, _excess(ours, expected, out_b, dtype, rounded),
                    _excess(new.ets[-1], kept[-1], x0_b, dtype), _excess(new.sample, theirs.last_sample, xc_b, dtype))
        if want_m:
            assert m.dtype == dtype
            worst = max(worst, _excess(m, u + gv * (c - u), m_abs, dtype))
        x = expected
    return worst


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 25])
@pytest.mark.parametrize("case_id, config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_every_step_matches_diffusers(case_id, config, steps, shape, dtype, backend):
    worst = _run(config, steps, shape, dtype, backend)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"


@pytest.mark.parametrize("steps", [2, 7])
@pytest.mark.parametrize("case_id, config", OTHER_CONFIGS, ids=[c[0] for c in OTHER_CONFIGS])
def test_other_configurations_match_diffusers(case_id, config, steps):
    """Other spacings, sigma schedules and options: bh1, solver_order 1, lower_order_final=False,
    disable_corrector, Karras and flow sigmas, sample prediction, zero terminal SNR."""
    assert _run(config, steps, SHAPES[0], torch.float32) <= 0


@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_per_row_guidance_scales_match_diffusers(backend):
    """One guidance scale per row (weights (B, 2), x_i appended as a third column in the corrector pass)."""
    assert _run(SD, 7, (3, 4, 5, 7), torch.float32, backend, per_row_scale=True) <= 0


def test_triton_kernel_matches_diffusers():
    """Both fused stages through the Triton kernel (compiled on CUDA, interpreted on the CPU): 4 steps
    take every corrector order (0, 1, 2) and predictor order (1, 2)."""
    worst = _run(SD, 4, (1, 4, 3, 5), torch.float32, backend="triton", device=TRITON_DEVICE)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"


def test_orders_follow_diffusers_warm_up_and_lower_order_final():
    """(corrector, predictor) orders of an unbroken run, and of a solver restarted at step 2."""
    table = FusedSampler(_scheduler(SD, 5)).table
    run = [orders(table, i, min(i, 2), i > 0) for i in range(5)]
    assert run == [(0, 1), (1, 2), (2, 2), (2, 2), (2, 1)]
    restarted = [orders(table, i, min(i - 2, 2), i > 2) for i in range(2, 5)]
    assert restarted == [(0, 1), (1, 2), (2, 1)]
    first = FusedSampler(_scheduler(dict(SD, solver_order=1), 5)).table
    assert [orders(first, i, min(i, 1), i > 0) for i in range(5)] == [(0, 1)] + [(1, 1)] * 4
    late = FusedSampler(_scheduler(dict(SD, disable_corrector=[1]), 5)).table
    assert orders(late, 2, 2, True) == (0, 2) and orders(late, 3, 2, True) == (2, 2)


def _model(cond_dir):
    def guided(x, i, t):  # [eps_u, eps_c], [1 - g, g]: smooth in x and t, as a UNet's are
        u = torch.tanh(x) * (1 - t / 2000)
        return [u, u + 0.3 * cond_dir.to(x.dtype)], [1 - G, G]
    return guided


def _diffusers_loop(s, x, guided):
    for i, t in enumerate(s.timesteps):
        (u, c), _ = guided(x, i, int(t))
        x = s.step(u + G * (c - u), t, x).prev_sample
    return x


def _relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("steps", [1, 5, 25])
@pytest.mark.parametrize("case_id, config", CONFIGS[:2], ids=[c[0] for c in CONFIGS[:2]])
def test_whole_loop_matches_diffusers_loop(case_id, config, steps):
    """run_steps (the Stepper every runner drives) from x_T against diffusers' own loops, each trajectory
    fed back into itself through a deterministic stand-in model, errors free to accumulate: within N
    steps of 16 eps32 of diffusers' loop in float64, and of diffusers' float32 loop within that plus
    the float32 loop's own distance from float64 (its coefficients' rounding)."""
    s = _scheduler(config, steps)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(11)
    x_T, cond_dir = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    exact = _diffusers_loop(_scheduler(config, steps, exact=True), x_T.double(), _model(cond_dir))
    theirs = _diffusers_loop(_scheduler(config, steps), x_T, _model(cond_dir))
    ours, state, calls = run_steps(sampler, x_T, _model(cond_dir))
    assert calls == steps and len(state.ets) == min(steps, 2)
    allowed = steps * 16 * EPS32
    assert _relative(ours, exact) <= allowed, _relative(ours, exact)
    assert _relative(ours, theirs) <= allowed + _relative(theirs, exact), (_relative(ours, theirs),
                                                                            _relative(theirs, exact))


def test_state_holds_what_diffusers_keeps():
    """After step 0: ets = [x_0,0] and sample = a copy of x_0's input; then the last two x_0 outputs,
    oldest first, and the corrected sample; want_m returns the guided model output as given."""
    s = _scheduler(SD, 6)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(3)
    x, cond_dir = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    guided = _model(cond_dir)
    state, outputs = None, []
    for i in range(sampler.num_steps):
        models, weights = guided(x, i, int(s.timesteps[i]))
        x_in = x
        x, state, m = sampler.step_combined(x, i, models, weights, state=state, want_m=True)
        torch.testing.assert_close(m, models[0] + G * (models[1] - models[0]), rtol=0, atol=32 * EPS32 * G)
        outputs.append(state.ets[-1])
        names = sorted(state.tensors())
        assert names == [f"ets.{j}" for j in range(min(i + 1, 2))] + ["sample"]
        assert all(a is b for a, b in zip(state.ets, outputs[-2:]))
        if i == 0:
            assert torch.equal(state.sample, x_in) and state.sample is not x_in


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_want_m_steps_match_diffusers(dtype):
    """With want_m (a forecaster's loop) the model output is combined first, in float32, its own pass:
    the same bounds hold, and m is the guided output as given."""
    assert _run(SD, 5, SHAPES[0], dtype, want_m=True) <= 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_handoff_round_trip_is_bit_for_bit(dtype):
    """Steps [0, k), the state through tensors() / from_tensors() as clones (what a handoff carries),
    then [k, N): the same latent, bit for bit, as steps [0, N), at every k."""
    s = _scheduler(SD, 7)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(5)
    x_T, cond_dir = (torch.randn(1, 4, 3, 5, 6, generator=g).to(dtype) for _ in range(2))
    guided = _model(cond_dir)
    whole, _, _ = run_steps(sampler, x_T, guided)
    for k in range(sampler.num_steps + 1):
        x, state, _ = run_steps(sampler, x_T, guided, stop=k)
        sent = None if state is None else SolverState.from_tensors({n: t.clone() for n, t in state.tensors().items()})
        assert (sent is None) == (k == 0)
        if sent is not None:
            assert sorted(sent.tensors()) == [f"ets.{j}" for j in range(min(k, 2))] + ["sample"]
        rest, _, _ = run_steps(sampler, x, guided, start=k, state=sent)
        assert torch.equal(rest, whole), f"handoff at step {k}"


@pytest.mark.parametrize("start", [1, 2, 5])
def test_restarted_solver_warms_up_as_diffusers_does(start):
    """An empty state at step i > 0 (a receiver restarting the solver): diffusers' first step there (no
    corrector, first order), then its warm-up: equal, step by step, to a fresh diffusers scheduler begun
    at that step (set_begin_index)."""
    assert _run(SD, 10, (2, 4, 5, 7), torch.float32, start=start) <= 0
    assert _run(dict(SD, prediction_type="v_prediction"), 10, (2, 4, 5, 7), torch.bfloat16, start=start) <= 0


def test_restart_differs_from_the_carried_state():
    """The restart is not a silent no-op: from the same latent, an empty state and a carried one give
    different steps (the carried one corrects and is second order)."""
    s = _scheduler(SD, 6)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(6)
    x_T, cond_dir = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    x, state, _ = run_steps(sampler, x_T, _model(cond_dir), stop=3)
    carried, _, _ = run_steps(sampler, x, _model(cond_dir), start=3, stop=4, state=state)
    restarted, fresh, _ = run_steps(sampler, x, _model(cond_dir), start=3, stop=4)
    assert _relative(carried, restarted) > 1e-3 and len(fresh.ets) == 1


def _ecdiff_loop(s, x, guided, fc):
    """EC-Diff's public loop: a forecast eps from the cached real ones, handed to diffusers' step."""
    cache, grad = [], None
    for i, t in enumerate(s.timesteps):
        if fc.is_real(i):
            (u, c), _ = guided(x, i, int(t))
            eps = u + G * (c - u)
            cache.append(eps)
            if i == fc.p - 1:
                grad = cache[-1] - cache[-2]
            elif i > fc.p:
                grad = fc.a * (cache[-1] - cache[-2])
        else:
            eps = cache[-1] + grad
            cache.append(eps)
        x = s.step(eps, t, x).prev_sample
    return x


def test_ecdiff_forecasts_feed_unipc_as_its_public_loop_does():
    """A forecaster with UniPC: the forecast stands in for the model output (converted and kept like a
    real one), as EC-Diff's public loop hands it to diffusers' step; held to the loop in float64 and in
    float32 as test_whole_loop_matches_diffusers_loop holds them."""
    steps = 12
    g = torch.Generator().manual_seed(1)
    x, cond_dir = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    guided = _model(cond_dir)
    fc = ECDiff(3, 1, 1.0)
    exact = _ecdiff_loop(_scheduler(SD, steps, exact=True), x.double(), guided, fc)
    theirs = _ecdiff_loop(_scheduler(SD, steps), x, guided, fc)
    ours, _, calls = run_steps(FusedSampler(_scheduler(SD, steps)), x, guided, fc)
    assert calls == sum(fc.is_real(i) for i in range(steps)) < steps
    allowed = steps * 16 * EPS32
    assert _relative(ours, exact) <= allowed, _relative(ours, exact)
    assert _relative(ours, theirs) <= allowed + _relative(theirs, exact)


@pytest.mark.parametrize("config, match", [
    (dict(SD, solver_order=3), "solver_order 3"),
    (dict(SD, predict_x0=False), "predict_x0=False"),
    (dict(SD, thresholding=True), "dynamic thresholding"),
    (dict(SD, solver_p=DDIMScheduler()), "solver_p"),
    (dict(SD, solver_type="bh1"), "'bh1' with a final sigma of 0"),
    (dict(SD, lower_order_final=False), "lower_order_final=False with a final sigma of 0"),
])
def test_unsupported_configurations_say_so(config, match):
    with pytest.raises(UnsupportedScheduler, match=match):
        FusedSampler(_scheduler(config, 5))


def test_refused_configurations_are_nan_in_diffusers():
    """bh1 and lower_order_final=False are refused only where diffusers' own last step is NaN; with
    final_sigmas_type='sigma_min' both are supported (test_other_configurations_match_diffusers)."""
    for config in [dict(SD, solver_type="bh1"), dict(SD, lower_order_final=False)]:
        s = _scheduler(config, 5)
        x = torch.ones(1, 4, 2, 2)
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x).prev_sample
        assert not torch.isfinite(x).all()
    FusedSampler(_scheduler(dict(SD, lower_order_final=False), 1))  # one step: first order, finite


def test_bad_steps_and_states_are_named():
    sampler = FusedSampler(_scheduler(SD, 4))
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(UnsupportedScheduler, match="per-row step_index"):
        sampler.step(x, torch.tensor([2, 2]), model_output=x)
    with pytest.raises(ValueError, match="outside 0..3"):
        sampler.step(x, 4, model_output=x)
    sampler.step(x, 3, model_output=x)  # the last step
    with pytest.raises(ValueError, match="not x0_prev"):
        sampler.step(x, 2, model_output=x, state=SolverState(x0_prev=x))
    with pytest.raises(ValueError, match="ets and sample together"):
        sampler.step(x, 2, model_output=x, state=SolverState(ets=(x,)))
    with pytest.raises(ValueError, match="ets and sample together"):
        sampler.step(x, 2, model_output=x, state=SolverState(sample=x))
    with pytest.raises(ValueError, match=r"state.ets\[0\] has shape"):
        sampler.step(x, 2, model_output=x, state=SolverState(ets=(x[:1],), sample=x))
    with pytest.raises(ValueError, match="state.sample has shape"):
        sampler.step(x, 2, model_output=x, state=SolverState(ets=(x,), sample=x[:1]))
    with pytest.raises(ValueError, match="must match"):
        sampler.step(x, 2, model_output=x[:1])
    with pytest.raises(ValueError, match="1 to 4 model outputs"):
        sampler.step_combined(x, 2, [x] * 5, [0.2] * 5)
    # the most outputs a step follows: min(solver_order, step index), at the edge and one past it
    _, after = sampler.step(x, 2, model_output=x, state=SolverState(ets=(x, x), sample=x))
    assert len(after.ets) == 2
    with pytest.raises(ValueError, match="at most 2 kept outputs, the state holds 3"):
        sampler.step(x, 2, model_output=x, state=SolverState(ets=(x, x, x), sample=x))
    sampler.step(x, 1, model_output=x, state=SolverState(ets=(x,), sample=x))
    with pytest.raises(ValueError, match="at most 1 kept outputs, the state holds 2"):
        sampler.step(x, 1, model_output=x, state=SolverState(ets=(x, x), sample=x))
    with pytest.raises(ValueError, match="at most 0 kept outputs"):
        sampler.step(x, 0, model_output=x, state=SolverState(ets=(x,), sample=x))
    # four models leave no room for x_i beside them: combined first (m = M_0 exactly here), the same step
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    _, state = sampler.step(y, 0, model_output=y)
    four, after4 = sampler.step_combined(y, 1, [y] + [torch.ones_like(y)] * 3, [1.0, 0.0, 0.0, 0.0], state=state)
    one, after1 = sampler.step(y, 1, model_output=y, state=state)
    assert torch.equal(four, one) and torch.equal(after4.sample, after1.sample)
