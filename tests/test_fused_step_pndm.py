"""The fused step against diffusers' PNDMScheduler with skip_prk_steps=True (PLMS), step by step and
whole loops; the PLMS history (SolverState ets and sample) across a handoff and after a restart.

Each step starts from diffusers' own trajectory x_t with random model outputs under classifier-free
guidance, m = u + g (c - u); diffusers' scheduler is fresh (set_timesteps(N)) and stepped through all
its timesteps, keeping its own ets, while the sampler keeps its own in the SolverState. Every element
must agree with diffusers' float32 step within the float32 rounding of the terms the update sums (16
eps32 times the update evaluated on absolute values), plus, for bfloat16 latents, one rounding to the
dtype of the output and of each kept model output (compared with diffusers' float32 step on the same
bfloat16-representable inputs).
"""
import pytest
import torch
from diffusers import PNDMScheduler

from latentwire.kernels import ECDiff, FusedSampler, SolverState, UnsupportedScheduler, fused_step_ref, run_steps

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there; interpreted here (conftest.py)
EPS32 = torch.finfo(torch.float32).eps
G = 7.5
# Stable Diffusion v1.5's scheduler/scheduler_config.json (also v1.4's and BK-SDM's)
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, skip_prk_steps=True,
            set_alpha_to_one=False)
CONFIGS = [
    ("sd15", SD15),
    ("sd15-v", dict(SD15, prediction_type="v_prediction")),
    ("linear-trailing-alpha-one", dict(skip_prk_steps=True, timestep_spacing="trailing", set_alpha_to_one=True)),
    ("sd-linspace-v", dict(SD15, timestep_spacing="linspace", steps_offset=0, prediction_type="v_prediction")),
    ("cosine", dict(skip_prk_steps=True, beta_schedule="squaredcos_cap_v2")),
]
SHAPES = [(2, 4, 5, 7), (1, 4, 3, 6, 5)]  # an odd image batch and a 5-D video latent (B, C, F, H, W)
DTYPES = [torch.float32, torch.bfloat16]
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _scheduler(config, steps):
    s = PNDMScheduler(**config)
    s.set_timesteps(steps)
    return s


def _plms_terms(counter, kept, new):
    """diffusers' step_plms on any values (here: magnitudes): (the terms newest first, their weights, kept after)."""
    if counter == 1:
        return [new, kept[-1]], [0.5, 0.5], kept
    kept = kept[-3:] + [new]
    return kept[::-1], AB[len(kept)], kept


def _bound(sampler, i, src, terms, weights):
    """Elementwise sum of |terms| of the update (the reference on absolute values and coefficients)."""
    b = src.shape[0]
    w = torch.tensor([weights], dtype=torch.float32).expand(b, len(weights)).abs()
    return fused_step_ref(src.float().abs(), terms, w, sampler.coef.cpu().abs(),
                          torch.full((b,), i, dtype=torch.int64)).x_next.float()


def _excess(got, want, bound, model_bound, dtype):
    """max(|got - want| - tol), tol = 16 eps32 (sum of |terms|) + eps of dtype at |want| (the output's
    rounding) and at the model terms (each kept output rounded to dtype): <= 0 passes."""
    err = (got.float().cpu() - want.float()).abs()
    tol = 16 * EPS32 * bound + torch.finfo(dtype).eps * (want.float().abs() + model_bound)
    return (err - tol).max().item()


def _run(config, steps, shape, dtype, backend="cpu", device="cpu", seed=0, per_row_scale=False):
    """Every step of set_timesteps(steps) from diffusers' trajectory -> the worst excess over the bound."""
    theirs = _scheduler(config, steps)
    sampler = FusedSampler(theirs, device=device, backend=backend)
    assert sampler.num_steps == len(theirs.timesteps) == (steps + 1 if steps > 1 else 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    scale = torch.linspace(1.0, 12.0, shape[0]) if per_row_scale else G
    gv = scale.reshape((-1,) + (1,) * (len(shape) - 1)) if per_row_scale else scale
    state, worst, kept, first = None, -float("inf"), [], None
    for i, t in enumerate(theirs.timesteps):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x, u, c = (v.to(dtype).float() for v in (x, u, c))  # inputs both sides can hold exactly
        expected = theirs.step(u + gv * (c - u), t, x).prev_sample
        ours, state = sampler.step(x.to(device, dtype), i, cond=c.to(device, dtype), uncond=u.to(device, dtype),
                                   guidance_scale=scale.to(device) if per_row_scale else G, state=state)
        assert ours.dtype == dtype and ours.shape == x.shape
        terms, weights, kept = _plms_terms(i, kept, u.abs() * (1 + gv) + gv * c.abs())  # |u + g (c - u)| terms
        src = first if i == 1 else x
        first = x if i == 0 else first
        bound = _bound(sampler, i, src, terms, weights)
        model_bound = _bound(sampler, i, torch.zeros_like(src), terms, weights)
        worst = max(worst, _excess(ours, expected, bound, model_bound, dtype))
        x = expected
    return worst


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["image", "video"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 25])
@pytest.mark.parametrize("case_id, config", CONFIGS[:2], ids=[c[0] for c in CONFIGS[:2]])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_every_step_matches_diffusers(case_id, config, steps, shape, dtype, backend):
    worst = _run(config, steps, shape, dtype, backend)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"


@pytest.mark.parametrize("steps", [2, 7])
@pytest.mark.parametrize("case_id, config", CONFIGS[2:], ids=[c[0] for c in CONFIGS[2:]])
def test_other_configurations_match_diffusers(case_id, config, steps):
    """Other spacings (diffusers' step 1 interval is t_1 + T // N -> t_1 whatever the spacing), betas and
    set_alpha_to_one."""
    assert _run(config, steps, SHAPES[0], torch.float32) <= 0


@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_per_row_guidance_scales_match_diffusers(backend):
    """One guidance scale per row (weights (B, 2)): e_i is combined per row, the PLMS weights are shared."""
    assert _run(SD15, 7, (3, 4, 5, 7), torch.float32, backend, per_row_scale=True) <= 0


def test_triton_kernel_matches_diffusers():
    """The PLMS combination through the Triton kernel (compiled on CUDA, interpreted on the CPU)."""
    worst = _run(SD15, 4, (1, 4, 3, 5), torch.float32, backend="triton", device=TRITON_DEVICE)
    assert worst <= 0, f"exceeds the rounding bound by {worst:.3e}"


def test_schedule_length_and_rows():
    """N + 1 timesteps for N >= 2 (the second one repeated), 1 for N = 1; step 1's row re-takes step
    0's interval (t_1 + T // N -> t_1), so its row equals step 0's in the leading spacing."""
    for n, expected in [(1, [1]), (2, [501, 1, 1]), (4, [751, 501, 501, 251, 1])]:
        s = _scheduler(SD15, n)
        assert s.timesteps.tolist() == expected
        assert FusedSampler(s).num_steps == len(expected)
    s = _scheduler(SD15, 50)
    sampler = FusedSampler(s)
    assert sampler.num_steps == 51 and s.timesteps[:4].tolist() == [981, 961, 961, 941]
    assert torch.equal(sampler.table.coef[0], sampler.table.coef[1])
    assert not torch.equal(sampler.table.coef[1], sampler.table.coef[2])
    assert not sampler.stochastic and not sampler.table.multistep


def _model(cond_dir):
    def guided(x, i, t):  # [eps_u, eps_c], [1 - g, g]: smooth in x and t, as a UNet's are
        u = torch.tanh(x) * (1 - t / 2000)
        return [u, u + 0.3 * cond_dir], [1 - G, G]
    return guided


def _diffusers_loop(s, x, guided):
    for i, t in enumerate(s.timesteps):
        (u, c), _ = guided(x, i, int(t))
        x = s.step(u + G * (c - u), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 4, 7, 25])
@pytest.mark.parametrize("case_id, config", CONFIGS[:2], ids=[c[0] for c in CONFIGS[:2]])
def test_whole_loop_matches_diffusers_loop(case_id, config, steps):
    """run_steps (the Stepper every runner drives) from x_T against diffusers' own loop, each trajectory
    fed back into itself through a deterministic stand-in model, errors free to accumulate."""
    s = _scheduler(config, steps)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(11)
    x_T, cond_dir = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    theirs = _diffusers_loop(s, x_T, _model(cond_dir))
    ours, state, calls = run_steps(sampler, x_T, _model(cond_dir))
    assert calls == len(s.timesteps)
    err = ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()
    # each step rounds a few float32 operations (within 16 eps32 of the output, as each step's bound);
    # the loop at most adds them up (measured: about 2% of this)
    assert err <= len(s.timesteps) * 16 * EPS32, err


def _states(sampler, x, guided, start, stop, state):
    """(x, state) after each step of [start, stop), through run_steps one step at a time."""
    out = []
    for i in range(start, stop):
        x, state, _ = run_steps(sampler, x, guided, start=i, stop=i + 1, state=state)
        out.append((x, state))
    return out


def test_state_holds_what_diffusers_keeps():
    """After step 0: ets = [e_0] and sample = x_0's copy; after step 1: ets = [e_0], no sample; then up
    to three outputs, oldest first; the kept e_i is the guided model output (what want_m returns)."""
    s = _scheduler(SD15, 7)
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
        if i != 1:
            outputs.append(m)
            assert state.ets[-1] is m
        names = sorted(state.tensors())
        if i == 0:
            assert names == ["ets.0", "sample"] and torch.equal(state.sample, x_in) and state.sample is not x_in
        else:
            assert names == [f"ets.{j}" for j in range(min(len(outputs), 3))]
        assert all(a is b for a, b in zip(state.ets, outputs[-3:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_handoff_round_trip_is_bit_for_bit(dtype):
    """Steps [0, k), the state through tensors() / from_tensors() as clones (what a handoff carries),
    then [k, N): the same latent, bit for bit, as steps [0, N), at every k (k = 1: sample travels)."""
    s = _scheduler(SD15, 7)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(5)
    x_T, cond_dir = (torch.randn(1, 4, 3, 5, 6, generator=g).to(dtype) for _ in range(2))
    guided = _model(cond_dir)
    whole, _, _ = run_steps(sampler, x_T, guided)
    assert torch.equal(whole, _states(sampler, x_T, guided, 0, sampler.num_steps, None)[-1][0])
    for k in range(sampler.num_steps + 1):
        x, state, _ = run_steps(sampler, x_T, guided, stop=k)
        sent = None if state is None else SolverState.from_tensors({n: t.clone() for n, t in state.tensors().items()})
        assert (sent is None) == (k == 0)
        if k == 1:
            assert sorted(sent.tensors()) == ["ets.0", "sample"]
        rest, _, _ = run_steps(sampler, x, guided, start=k, state=sent)
        assert torch.equal(rest, whole), f"handoff at step {k}"


@pytest.mark.parametrize("start", [2, 3, 5])
def test_restarted_solver_warms_up_as_diffusers_does(start):
    """An empty state at step i >= 2 (a receiver restarting the solver): the first-order step e' = e_i,
    then the formulas for the outputs it has, as diffusers' own warm-up: equal to a fresh diffusers
    scheduler whose first step is taken at counter 0 and the following ones past counter 1."""
    s = _scheduler(SD15, 10)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(7)
    shape = (2, 4, 5, 7)
    x = torch.randn(shape, generator=g)
    theirs, state = _scheduler(SD15, 10), None
    kept = []
    for n, i in enumerate(range(start, sampler.num_steps)):
        u, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        theirs.counter = 0 if n == 0 else i  # never counter 1: that is step 1's restart from the sample
        expected = theirs.step(u + G * (c - u), s.timesteps[i], x).prev_sample
        ours, state = sampler.step(x, i, cond=c, uncond=u, guidance_scale=G, state=state)
        terms, weights, kept = _plms_terms(2, kept, u.abs() * (1 + G) + G * c.abs())
        assert weights == AB[min(n + 1, 4)]
        bound = _bound(sampler, i, x, terms, weights)
        assert _excess(ours, expected, bound, 0 * bound, torch.float32) <= 0, f"step {i}"
        assert len(state.ets) == min(n + 1, 3) and state.sample is None
        x = expected


def test_restarted_solver_at_step_1_keeps_the_latent():
    """At step 1 without a sample to restart from, x is already at timesteps[1] (step 0 took it there):
    the step returns x unchanged, keeps no output, and step 2 is first order."""
    s = _scheduler(SD15, 6)
    sampler = FusedSampler(s)
    g = torch.Generator().manual_seed(9)
    x, u, c = (torch.randn(2, 4, 5, 7, generator=g) for _ in range(3))
    x1, state, m = sampler.step_combined(x, 1, [u, c], [1 - G, G], want_m=True)
    assert torch.equal(x1, x) and x1 is not x and not state
    torch.testing.assert_close(m, u + G * (c - u), rtol=0, atol=32 * EPS32 * G)
    x2, state = sampler.step(x1, 2, cond=c, uncond=u, guidance_scale=G, state=state)
    theirs = _scheduler(SD15, 6)
    expected = theirs.step(u + G * (c - u), s.timesteps[2], x1).prev_sample  # counter 0: first order
    bound = _bound(sampler, 2, x1, [u.abs() * (1 + G) + G * c.abs()], [1.0])
    assert _excess(x2, expected, bound, 0 * bound, torch.float32) <= 0
    assert len(state.ets) == 1


def test_ecdiff_forecasts_feed_plms_as_its_public_loop_does():
    """A forecaster with PLMS: the forecast stands in for e_i (kept in ets like a real output), as
    EC-Diff's public loop hands it to diffusers' PNDMScheduler.step."""
    s = _scheduler(SD15, 12)
    g = torch.Generator().manual_seed(1)
    x, cond_dir = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    guided = _model(cond_dir)
    p, k, a = 3, 1, 1.0
    fc = ECDiff(p, k, a)
    cache, grad, theirs = [], None, x
    for i, t in enumerate(s.timesteps):
        if fc.is_real(i):
            (u, c), _ = guided(theirs, i, int(t))
            eps = u + G * (c - u)
            cache.append(eps)
            if i == p - 1:
                grad = cache[-1] - cache[-2]
            elif i > p:
                grad = a * (cache[-1] - cache[-2])
        else:
            eps = cache[-1] + grad
            cache.append(eps)
        theirs = s.step(eps, t, theirs).prev_sample
    ours, _, calls = run_steps(FusedSampler(s), x, guided, fc)
    assert calls == sum(fc.is_real(i) for i in range(len(s.timesteps))) < len(s.timesteps)
    err = ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()
    assert err <= len(s.timesteps) * 16 * EPS32, err


@pytest.mark.parametrize("config, match", [
    (dict(SD15, skip_prk_steps=False), "skip_prk_steps=True"),
    (dict(), "skip_prk_steps=True"),  # the class default: F-PNDM's Runge-Kutta steps first
    (dict(SD15, prediction_type="sample"), "prediction_type 'sample'"),
])
def test_unsupported_configurations_say_so(config, match):
    with pytest.raises(UnsupportedScheduler, match=match):
        FusedSampler(_scheduler(config, 5))


def test_bad_steps_and_states_are_named():
    sampler = FusedSampler(_scheduler(SD15, 4))
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(UnsupportedScheduler, match="per-row step_index"):
        sampler.step(x, torch.tensor([2, 2]), model_output=x)
    with pytest.raises(ValueError, match="outside 0..4"):
        sampler.step(x, 5, model_output=x)
    sampler.step(x, 4, model_output=x)  # the last of N + 1 steps
    with pytest.raises(ValueError, match="step 0 starts a PLMS solver"):
        sampler.step(x, 0, model_output=x, state=SolverState(ets=(x,)))
    with pytest.raises(ValueError, match="no ets.0"):
        sampler.step(x, 1, model_output=x, state=SolverState(sample=x))
    with pytest.raises(ValueError, match=r"state.ets\[0\] has shape"):
        sampler.step(x, 3, model_output=x, state=SolverState(ets=(x[:1],)))
    with pytest.raises(ValueError, match="must match"):
        sampler.step(x, 3, model_output=x[:1])
    with pytest.raises(ValueError, match="1 to 4 model outputs"):
        sampler.step_combined(x, 3, [x] * 5, [0.2] * 5)
    # the most a state holds: three outputs (a fourth-order step reads them and the current one)
    full = SolverState(ets=(x, x, x))
    _, after = sampler.step(x, 4, model_output=x, state=full)
    assert len(after.ets) == 3
