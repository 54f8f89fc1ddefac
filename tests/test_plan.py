"""Split plans as plain data, and the one-process executor on stand-in models."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from latentwire.kernels import FusedSampler
from latentwire.scheduler import Plan, PlanError, Segment, SessionSpec, make, run_plan
from latentwire.scheduler.fields import FieldError

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class StandIn:
    """A deterministic stand-in for a text-to-image model: eps depends on x, t and the prompt."""

    def __init__(self, scale, latent_space=("4x6x6", 8), text_space=(16, 8)):
        self.scale, self.latent_space, self.text_space = scale, latent_space, text_space
        self.calls = 0

    def encode_prompt(self, prompt, negative=""):
        code = lambda s: torch.tensor([float(sum(map(ord, s)) % 17)]).reshape(1, 1, 1)  # noqa: E731
        return code(prompt), code(negative)

    def predict(self, x, t, cond, uncond, scheduler=None, guidance=None):
        self.calls += 1
        base = torch.tanh(self.scale * x) * (1 + t / 1000)
        return base + 0.01 * cond.reshape(1, 1, 1, 1), base + 0.01 * uncond.reshape(1, 1, 1, 1)

    def initial_noise(self, seed, scheduler=None, generator_device="cpu"):
        return torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def spec(plan, scheduler=DPMSolverMultistepScheduler, **kw):
    return SessionSpec(prompt="a red circle", plan=plan, scheduler=scheduler.__name__,
                       scheduler_config=dict(scheduler(**SD).config), seed=3, **kw)


def test_built_in_plans_and_their_labels():
    assert str(make("hybrid-sd", 8, k=3)) == "hybrid-sd {'k': 3} [CCC | EEEEE]"
    assert str(make("ec-diff", 10, p=2, k=1, s=6)).endswith("[CCfCfC | EEEE]")
    assert str(make("preview-refine", 8, strength=0.5)).endswith("[EEEEEEEE | ~CCCC]")
    assert [label for _, label in make("ec-diff", 10, p=2, k=1, s=6).labels()].count("forecast") == 2
    assert make("hybrid-sd", 8, k=3).crossings() == [1]


@pytest.mark.parametrize("name, params", [("cloud-only", {}), ("ec-diff", {"p": 3, "k": 2, "a": 0.4, "s": 9}),
                                          ("ec-diff", {"p": 2, "k": (0, 2, 1), "a": 0.3, "s": 10}),
                                          ("preview-refine", {"strength": 0.3})])
def test_plans_round_trip_through_msgpack(name, params):
    plan = make(name, 12, **params)
    assert Plan.from_msgpack(plan.to_msgpack()) == plan
    s = spec(plan)
    assert SessionSpec.from_msgpack(s.to_msgpack()) == s


def test_uneven_spacing_is_a_plan_of_its_own_with_its_gaps_checked_field_by_field():
    plan = make("ec-diff", 12, p=2, k=(0, 2, 1), a=0.3, s=10)
    assert str(plan).endswith("[CCCffCfCfC | EE]") and plan.params["k"] == "0,2,1"
    plain = plan.to_plain()
    assert plain["segments"][0][3] == ["ecdiff", 2, [0, 2, 1], 0.3]  # msgpack- and JSON-native
    assert Plan.from_plain(plain) == plan
    for gaps, field in (([0, "2"], "forecast.2.1"), ([0, -1], "forecast.2.1"), ([], "forecast.2"),
                        ([0] * 65, "forecast.2"), ([0, [1]], "forecast.2.1"), ([0, 2.5], "forecast.2.1")):
        bad = {**plain, "segments": [["cloud", 0, 10, ["ecdiff", 2, gaps, 0.3], False], plain["segments"][1]]}
        with pytest.raises(FieldError, match=field.replace(".", r"\.")):
            Plan.from_plain(bad)
    assert plain["segments"][0][3][2] == [0, 2, 1]  # checking a plain plan does not change it


@pytest.mark.parametrize("build, match", [
    (lambda: make("hybrid-sd", 8, k=8), "outside 1..7"),
    (lambda: make("ec-diff", 8, s=9), "outside"),
    (lambda: make("ec-diff", 8, p=1), "p >= 2"),
    (lambda: make("preview-refine", 8, strength=0), "strength"),
    (lambda: make("teleport", 8), "unknown plan"),
    (lambda: make("hybrid-sd", 8, j=2), "unexpected keyword"),
    (lambda: Plan("x", 4, (Segment("cloud", 0, 2), Segment("edge", 3, 4))), "starts at step 3"),
    (lambda: Plan("x", 4, (Segment("cloud", 0, 3),)), "ends at step 3 of 4"),
    (lambda: Plan("x", 4, (Segment("gpu", 0, 4),)), "side must be"),
    (lambda: Plan("x", 4, (Segment("cloud", 0, 4, ("magic", 1)),)), "forecast must be"),
    (lambda: Plan.from_msgpack(b"\x93garbage"), "not a serialized plan"),
])
def test_bad_plans_get_clear_errors(build, match):
    with pytest.raises(PlanError, match=match):
        build()


def test_models_must_share_latent_and_text_spaces():
    with pytest.raises(PlanError, match="latent space"):
        run_plan(spec(make("hybrid-sd", 6)), {"cloud": StandIn(1.0), "edge": StandIn(0.5, latent_space=("4x8x8", 8))})
    with pytest.raises(PlanError, match="needs a edge model"):
        run_plan(spec(make("hybrid-sd", 6)), {"cloud": StandIn(1.0)})


def _by_hand(s, models, plan):
    """The same generation written out: one FusedSampler, each step with the model the plan names."""
    scheduler = s.make_scheduler()
    sampler = FusedSampler(scheduler)
    x, state = models[plan.segments[0].side].initial_noise(s.seed, scheduler=scheduler), None
    for i, side in plan.labels():
        cond, uncond = models[side].encode_prompt(s.prompt, s.negative_prompt)
        eps_c, eps_u = models[side].predict(x, int(scheduler.timesteps[i]), cond, uncond)
        x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=s.guidance_scale, state=state)
    return x


@pytest.mark.parametrize("name, params", [("cloud-only", {}), ("edge-only", {}), ("hybrid-sd", {"k": 4})])
def test_one_process_run_equals_the_plan_written_out(name, params):
    models = {"cloud": StandIn(1.0), "edge": StandIn(0.7)}
    plan = make(name, 10, **params)
    x, summary = run_plan(spec(plan), models)
    torch.testing.assert_close(x, _by_hand(spec(plan), {"cloud": StandIn(1.0), "edge": StandIn(0.7)}, plan))
    assert summary.cloud_model_calls + summary.edge_model_calls == 10 and summary.forecast_steps == 0
    assert summary.handoffs == (name == "hybrid-sd")


def test_ec_diff_skips_model_calls_and_preview_refine_calls_both():
    models = {"cloud": StandIn(1.0), "edge": StandIn(0.7)}
    _, summary = run_plan(spec(make("ec-diff", 12, p=3, k=2, a=0.4, s=9)), models)
    assert (summary.cloud_model_calls, summary.forecast_steps, summary.edge_model_calls) == (5, 4, 3)
    _, summary = run_plan(spec(make("preview-refine", 10, strength=0.4), scheduler=DDIMScheduler), models)
    assert (summary.edge_model_calls, summary.cloud_model_calls, summary.handoffs) == (10, 4, 1)


def test_stochastic_samplers_draw_the_same_noise_whoever_runs_the_step():
    models = {"cloud": StandIn(1.0), "edge": StandIn(1.0)}  # the same model on both sides
    a, _ = run_plan(spec(make("cloud-only", 8), scheduler=EulerAncestralDiscreteScheduler), models)
    b, _ = run_plan(spec(make("hybrid-sd", 8, k=3), scheduler=EulerAncestralDiscreteScheduler), models)
    torch.testing.assert_close(a, b)


def test_restarting_the_solver_at_a_handoff_changes_the_result_a_little():
    models = {"cloud": StandIn(1.0), "edge": StandIn(0.7)}
    carried, _ = run_plan(spec(make("hybrid-sd", 12, k=5)), models)
    restarted, _ = run_plan(spec(make("hybrid-sd", 12, k=5), restart_solver=True), models)
    diff = ((carried - restarted).abs().max() / carried.abs().max()).item()
    assert 0 < diff < 0.1


def test_a_scheduler_the_session_cannot_build_is_a_plan_error():
    plan = make("cloud-only", 4)
    with pytest.raises(PlanError, match="unknown scheduler"):
        SessionSpec(prompt="a", plan=plan, scheduler="NoSuchScheduler").make_scheduler()
    bad = SessionSpec(prompt="a", plan=plan, scheduler="DDIMScheduler", scheduler_config={"beta_schedule": "sceled"})
    with pytest.raises(PlanError, match="cannot build a DDIMScheduler.*NotImplementedError"):
        bad.make_scheduler()
