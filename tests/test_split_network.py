"""Two real processes: `latentwire cloud` serving the tiny cloud model, and an edge in this process (and
once as `latentwire edge`), over ipc:// and tcp://127.0.0.1 with bounded waits. The split run must
equal what one process computes with the same models, seed and plan."""
import json
import time

import daemons
import pytest
from runcli import run_cli
import torch
from diffusers import StableDiffusionPipeline

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make, run_plan
from latentwire.scheduler.serving.edge import CloudError, CloudUnavailable, EdgeClient
from latentwire.scheduler.wire import Codecs

REPLY_TIMEOUT_S = 60
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
PROMPT, NEGATIVE = "a red circle on a blue square", "green"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cloud_path, edge_path = save_tiny_pair(root, seed=0)
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def cloud(pair, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/cloud.sock"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind, "--preview-every", "2")
    yield bind
    assert daemons.stop(proc) == 0, "SIGTERM should let the cloud finish and exit cleanly"


@pytest.fixture(scope="module")
def models(pair):
    return {"cloud": StableDiffusionModel.from_pretrained(pair[0]), "edge": StableDiffusionModel.from_pretrained(pair[1])}


def _spec(model, plan, scheduler=None, **kw):
    s = model.make_scheduler(scheduler)
    return SessionSpec(prompt=PROMPT, negative_prompt=NEGATIVE, plan=plan, scheduler=type(s).__name__,
                       scheduler_config=dict(s.config), guidance_scale=6.0, seed=11, **kw)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_cloud_only_over_the_network_equals_diffusers_pipeline(cloud, pair, models, scheduler):
    spec = _spec(models["cloud"], make("cloud-only", 8), scheduler)
    previews = []
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S,
                                 on_preview=lambda step, x: previews.append(step)).generate(spec)
    pipe = StableDiffusionPipeline.from_pretrained(pair[0], safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = spec.make_scheduler()
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert _rel(latent, expected) <= 1e-5
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (8, 0)
    assert previews == [1, 3, 5, 7]  # every second step, streamed while the cloud works


@pytest.mark.parametrize("name, params", [("hybrid-sd", {"k": 3}), ("ec-diff", {"p": 2, "k": 1, "s": 6}),
                                          ("preview-refine", {"strength": 0.5}), ("edge-only", {})])
def test_every_plan_split_over_the_network_equals_one_process(cloud, models, name, params):
    spec = _spec(models["cloud"], make(name, 9, **params))
    expected, expected_summary = run_plan(spec, models)
    client = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S)
    latent, summary = client.generate(spec)
    assert torch.equal(latent, expected)
    assert (summary.cloud_model_calls, summary.edge_model_calls, summary.forecast_steps) == (
        expected_summary.cloud_model_calls, expected_summary.edge_model_calls, expected_summary.forecast_steps)
    assert (client.bytes_down > 0) == (name != "edge-only")  # edge-only never calls the cloud


def test_int8_handoffs_stay_within_their_bound(cloud, models):
    """int8 + zstd puts each handed-off latent within half a quantization step per channel (1/510 of
    its range); the steps after the handoff carry that error to the end. Measured here: below 1e-2."""
    spec = _spec(models["cloud"], make("hybrid-sd", 9, k=4))
    expected, _ = run_plan(spec, models)
    client = EdgeClient(cloud, models["edge"], timeout_s=REPLY_TIMEOUT_S)  # default codecs: int8 + zstd, fp16
    latent, _ = client.generate(spec)
    assert 0 < _rel(latent, expected) <= 2e-2
    exact = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S)
    exact.generate(spec)
    # a 4x8x8 latent is 256 values: headers weigh more than on a real latent (protocol's bench has those)
    assert client.bytes_down < exact.bytes_down


def test_carrying_the_solver_state_against_restarting_it(cloud, models):
    """DPM-Solver++(2M)'s history crosses with the latent (the default), or the edge restarts its solver
    at first order; both equal their one-process runs, and they differ from each other a little."""
    plan, dpm = make("hybrid-sd", 9, k=4), "DPMSolverMultistepScheduler"
    carried, _ = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S).generate(
        _spec(models["cloud"], plan, dpm))
    restarted, _ = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S).generate(
        _spec(models["cloud"], plan, dpm, restart_solver=True))
    assert torch.equal(carried, run_plan(_spec(models["cloud"], plan, dpm), models)[0])
    assert torch.equal(restarted, run_plan(_spec(models["cloud"], plan, dpm, restart_solver=True), models)[0])
    assert 0 < _rel(restarted, carried) < 0.2


def test_the_cloud_refuses_segments_that_are_not_its_own(cloud, models):
    spec = _spec(models["cloud"], make("edge-only", 4))
    client = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S)
    with pytest.raises(CloudError, match="field 'segments'.*all the cloud's"):  # a request generate() would never make
        client.run_remote(spec, 0, 1)


def test_models_that_do_not_share_a_text_space_are_refused(cloud, pair):
    edge = StableDiffusionModel.from_pretrained(pair[1])
    edge.text_space = tuple(edge.text_space)[:-1] + (999,)  # as if its text encoder had another vocabulary
    spec = _spec(edge, make("hybrid-sd", 6, k=2))
    with pytest.raises(CloudError, match="text space"):
        EdgeClient(cloud, edge, timeout_s=REPLY_TIMEOUT_S).generate(spec)


def test_an_unknown_model_folder_is_a_clear_error(tmp_path):
    run = run_cli("cloud", "--bind", f"ipc://{tmp_path}/x.sock", "--model", str(tmp_path / "nothing"))
    assert run.returncode != 0 and "has no model_index.json" in run.stderr and "Traceback" not in run.stderr


def test_a_cloud_that_is_not_there_is_reported_after_a_bounded_wait(models, tmp_path):
    spec = _spec(models["cloud"], make("cloud-only", 4))
    start = time.monotonic()
    with pytest.raises(CloudUnavailable, match="no answer from the cloud"):
        EdgeClient(f"ipc://{tmp_path}/nobody.sock", models["edge"], timeout_s=1.0).generate(spec)
    assert time.monotonic() - start < 10


def test_a_cloud_that_dies_mid_session_is_noticed_by_its_heartbeats_and_used_again_when_back(pair, models, tmp_path):
    bind = f"ipc://{tmp_path}/dying.sock"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind, "--preview-every", "1", "--heartbeat", "0.2")
    spec = _spec(models["cloud"], make("cloud-only", 30))
    try:
        client = EdgeClient(bind, models["edge"], timeout_s=REPLY_TIMEOUT_S, heartbeat_timeout_s=2.0, retries=0,
                            on_preview=lambda step, x: proc.kill() if step == 1 else None)
        start = time.monotonic()
        with pytest.raises(CloudUnavailable, match="went silent"):
            client.generate(spec)
        assert time.monotonic() - start < REPLY_TIMEOUT_S / 3  # the heartbeats, not the deadline, told
    finally:
        proc.kill()
        proc.wait(timeout=30)
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind)  # back, at the same address
    try:
        latent, summary = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S,
                                     fallback=True).generate(spec)
        assert not summary.degraded and summary.cloud_model_calls == 30
        assert torch.equal(latent, run_plan(spec, models)[0])
    finally:
        assert daemons.stop(proc) == 0


def test_with_fallback_the_edge_finishes_from_the_last_preview_and_says_so(pair, models, tmp_path):
    from latentwire.kernels import FusedSampler
    from latentwire.scheduler import Segment, SegmentRun, drive

    proc = daemons.start("cloud", "--model", pair[0], "--bind", f"ipc://{tmp_path}/dying.sock", "--preview-every", "1")
    previews = []

    def kill_at_first_preview(step, x):
        previews.append((step, x))
        proc.kill()  # previews already on their way may still arrive; the handoff, 30 steps later, cannot

    try:
        spec = _spec(models["cloud"], make("hybrid-sd", 36, k=32))
        client = EdgeClient(f"ipc://{tmp_path}/dying.sock", models["edge"], timeout_s=5.0, fallback=True,
                            on_preview=kill_at_first_preview)
        latent, summary = client.generate(spec)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    step, x = previews[-1]  # the last latent the edge held
    assert summary.degraded and step < 32
    # what it must be: the edge's model from the preview (the latent at the start of step 3) to the end
    sampler = FusedSampler(spec.make_scheduler())
    cond = models["edge"].encode_prompt(spec.prompt, spec.negative_prompt)
    run = drive(SegmentRun(spec, [Segment("edge", step, 36)], sampler, cond, x), models["edge"])
    assert torch.equal(latent, run.x) and summary.edge_model_calls == run.calls == 36 - step


def test_the_edge_command_over_tcp_writes_an_image_and_a_json_summary(pair, tmp_path):
    bind = f"tcp://127.0.0.1:{daemons.free_port()}"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind)
    try:
        out = tmp_path / "image.png"
        run = run_cli("edge", "--connect", bind, "--model", pair[1], "--prompt", PROMPT, "--plan", "ec-diff", "--p",
                      "2", "--k", "1", "--s", "4", "--steps", "6", "--seed", "3", "--out", str(out), "--json", "--link",
                      "100mbit-20ms", "--latent-codec", "auto")
        assert run.returncode == 0, run.stderr[-2000:]
        summary = json.loads(run.stdout)
        for key in ("plan", "steps", "cloud_model_calls", "edge_model_calls", "forecast_steps", "bytes_up",
                    "bytes_down", "wall_s", "degraded", "output"):
            assert key in summary
        assert (summary["plan"], summary["steps"], summary["edge_model_calls"]) == ("ec-diff", 6, 2)
        assert summary["link"] == "100mbit-20ms" and summary["latent_codec"][0] in ("fp32", "fp16", "bf16", "int8")
        assert summary["cloud_model_calls"] + summary["forecast_steps"] == 4 and summary["forecast_steps"] >= 1
        assert out.stat().st_size > 0
        shown = run_cli("edge", "--connect", bind, "--model", pair[1], "--prompt", PROMPT, "--plan", "hybrid-sd", "--k",
                        "2", "--steps", "4", "--out", str(out))
        assert shown.returncode == 0 and "step   4/4 edge" in shown.stderr and "hybrid-sd" in shown.stderr
        # a plan from a file (what `latentwire search --out` writes) runs across the two processes as the flags'
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(make("ec-diff", 6, p=2, k=1, s=4).to_plain()))
        filed = run_cli("edge", "--connect", bind, "--model", pair[1], "--prompt", PROMPT, "--plan-file",
                        str(plan_file), "--steps", "6", "--seed", "3", "--out", str(out), "--json")
        assert filed.returncode == 0, filed.stderr[-2000:]
        assert {k: json.loads(filed.stdout)[k] for k in ("plan", "cloud_model_calls", "forecast_steps",
                                                         "edge_model_calls")} == \
            {k: summary[k] for k in ("plan", "cloud_model_calls", "forecast_steps", "edge_model_calls")}
        wrong = run_cli("edge", "--connect", bind, "--model", pair[1], "--prompt", PROMPT, "--plan-file",
                        str(plan_file), "--steps", "5", "--out", str(out))
        assert wrong.returncode != 0 and "covers 6 steps" in wrong.stderr and "Traceback" not in wrong.stderr
    finally:
        assert daemons.stop(proc) == 0
