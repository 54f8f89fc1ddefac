"""The cloud engine without sockets, as a serving stack drives it from Python: sessions submitted, events
(previews, the handoff, errors) received; a group of one equals the one-process run bit for bit; a batched
group equals its solo runs; a session whose inputs or model call fail ends alone while those batched with it
finish; and, over the daemon, a cloud whose steps outlast the edge's heartbeat timeout is slow, not dead."""
import threading
import time

import pytest
import torch

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import Plan, Segment, SessionSpec, make, run_plan, wire
from latentwire.scheduler.serving.cloud import CloudServer
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.engine import CloudEngine, Refused
from latentwire.scheduler.limits import ServingLimits
from fakes import Slow

EXACT = wire.Codecs(latent=("fp32", 0), state=("fp32", 0))
WAIT_S = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("m"), seed=0)
    return {"cloud": StableDiffusionModel.from_pretrained(cloud_path),
            "edge": StableDiffusionModel.from_pretrained(edge_path)}


def _spec(model, plan, prompt="a red circle", seed=1, scheduler="DPMSolverMultistepScheduler"):
    s = model.make_scheduler(scheduler)
    return SessionSpec(prompt=prompt, plan=plan, scheduler=type(s).__name__, scheduler_config=dict(s.config),
                       guidance_scale=5.0, seed=seed)


def _forecasting(n):
    """A cloud-only plan with EC-Diff's forecasting throughout (real calls at steps 0, 1, 3, 5, ...)."""
    return Plan("ec-diff-cloud", n, (Segment("cloud", 0, n, ("ecdiff", 2, 1, 0.5)),))


def _run(model, spec, **kw):
    return wire.Run(spec, (0, 1), latent_space=wire.plain(model.latent_space), text_space=wire.plain(model.text_space),
                    **kw)


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def _drain(engine):
    for _ in range(10_000):
        if not engine.turn():
            return
    raise AssertionError("the engine did not finish its sessions")


def test_the_engine_serves_sessions_from_python_and_a_group_of_one_equals_one_process(models):
    cloud = models["cloud"]
    engine = CloudEngine(cloud, preview_every=2)
    specs = [_spec(cloud, make("cloud-only", 6), seed=1), _spec(cloud, _forecasting(8), seed=2)]
    events = [[] for _ in specs]
    for spec, out in zip(specs, events):
        engine.submit(_run(cloud, spec), out.append)
    _drain(engine)
    for spec, out in zip(specs, events):
        *previews, handoff = out
        assert all(isinstance(p, wire.Preview) for p in previews)
        assert [p.step for p in previews] == list(range(1, spec.plan.num_steps, 2))  # every second step
        assert isinstance(handoff, wire.Handoff) and handoff.step_index == spec.plan.num_steps
        expected, summary = run_plan(spec, models)
        assert torch.equal(handoff.latent, expected)  # max_batch 1: each session alone, the plain case
        assert (handoff.model_calls, handoff.forecast_steps) == (summary.cloud_model_calls, summary.forecast_steps)
    assert engine.health().jobs == 0


def test_the_engine_reports_its_queue_and_utilisation_with_each_handoff_and_in_health(models):
    cloud = models["cloud"]
    engine = CloudEngine(cloud, max_batch=1)
    idle = engine.health()
    assert (idle.queued, idle.running, idle.utilisation) == (0, 0, 0.0)
    events = [[] for _ in range(3)]
    for k, out in enumerate(events):
        engine.submit(_run(cloud, _spec(cloud, make("cloud-only", 4), seed=k)), out.append)
    assert engine.load() == wire.Load(queued=3, running=0, utilisation=0.0)  # admitted, none stepped yet
    engine.turn()  # the first session's first step: it runs, the other two wait (max_batch 1)
    load = engine.load()
    assert (load.queued, load.running) == (2, 1) and 0 < load.utilisation <= 1
    assert engine.health().jobs == 3 and engine.health().load.queued == 2
    _drain(engine)
    handoffs = [out[-1] for out in events]
    assert [h.load.queued for h in handoffs] == [2, 1, 0]  # each saw those still behind it
    assert all(h.load.running == 1 and 0 < h.load.utilisation <= 1 for h in handoffs)
    assert wire.parse_reply(handoffs[0].to_frames(EXACT)).load == handoffs[0].load  # it travels
    assert engine.metrics.registry.get_sample_value("latentwire_sessions_queued") == 0
    assert 0 < engine.metrics.registry.get_sample_value("latentwire_utilisation") <= 1


def test_batched_sessions_with_forecasts_and_restarts_equal_their_solo_runs(models):
    cloud = models["cloud"]
    specs = [_spec(cloud, make("cloud-only", 8), "a red circle", 1),
             _spec(cloud, _forecasting(8), "a blue square", 2),  # forecasting: batched too
             _spec(cloud, make("cloud-only", 8), "a green circle", 3, "EulerAncestralDiscreteScheduler"),
             _spec(cloud, make("cloud-only", 8), "a red square", 4)]
    engine = CloudEngine(cloud, max_batch=4)
    events = [[] for _ in specs]
    for spec, out in zip(specs, events):
        engine.submit(_run(cloud, spec), out.append)
    _drain(engine)
    assert max(engine.batch_sizes) == 3  # the DPM sessions, one of them forecasting, shared their forwards
    for spec, out in zip(specs, events):
        expected, _ = run_plan(spec, models)
        assert ((out[-1].latent - expected).abs().max() / expected.abs().max()).item() <= 1e-5


class _Poisoned:
    """The cloud model, failing any forward that holds the poisoned prompt's row (as a model can on bad
    input): in a batch, the whole forward fails."""

    def __init__(self, model, poison):
        self.model, self.poison = model, model.encode_prompt(poison)[0]
        self.latent_space, self.text_space, self.latent_shape = model.latent_space, model.text_space, model.latent_shape
        self.forwards = 0

    def encode_prompt(self, prompt, negative=""):
        return self.model.encode_prompt(prompt, negative)

    def predict(self, x, t, cond, uncond, scheduler=None, guidance=None):
        self.forwards += 1
        if any(torch.equal(row, self.poison[0]) for row in cond):
            raise RuntimeError("the model met a row it cannot take")
        return self.model.predict(x, t, cond, uncond, scheduler=scheduler, guidance=guidance)

    def initial_noise(self, *args, **kwargs):
        return self.model.initial_noise(*args, **kwargs)


def test_a_failing_session_in_a_batch_ends_alone_and_the_others_equal_their_solo_runs(models):
    cloud = models["cloud"]
    poisoned = _Poisoned(cloud, "a poison star")
    engine = CloudEngine(poisoned, max_batch=4)
    good = [_spec(cloud, make("cloud-only", 6), "a red circle", 1), _spec(cloud, make("cloud-only", 6), "a blue square", 2)]
    bad = _spec(cloud, make("cloud-only", 6), "a poison star", 3)
    nan_latent = _spec(cloud, make("cloud-only", 6), "a green circle", 4)
    events = {name: [] for name in ("good0", "bad", "good1", "nan")}
    engine.submit(_run(cloud, good[0]), events["good0"].append)
    engine.submit(_run(cloud, bad), events["bad"].append)
    engine.submit(_run(cloud, good[1]), events["good1"].append)
    engine.submit(_run(cloud, nan_latent, latent=torch.full((1, *cloud.latent_shape), float("nan"))),
                  events["nan"].append)
    _drain(engine)
    assert isinstance(events["bad"][-1], wire.Error) and events["bad"][-1].code == "model"
    assert "cannot take" in events["bad"][-1].message
    nan = events["nan"][-1]
    assert isinstance(nan, wire.Error) and (nan.code, nan.field) == ("refused", "tensors.latent")
    for spec, name in zip(good, ("good0", "good1")):
        expected, _ = run_plan(spec, models)
        assert ((events[name][-1].latent - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert 2 in engine.batch_sizes  # after the bad one left, the good ones batched again
    assert engine.health().jobs == 0 and not engine.admission.clients()  # every admission was given back


def test_a_session_that_diverges_ends_alone_with_an_error_and_the_others_finish(models):
    cloud = models["cloud"]
    engine = CloudEngine(cloud, max_batch=4)
    # EC-Diff's slope scaled by a million: finite inputs, a latent that overflows within its steps
    diverging = _spec(cloud, Plan("boom", 40, (Segment("cloud", 0, 40, ("ecdiff", 2, 3, 1e6)),)), seed=5)
    good = _spec(cloud, make("cloud-only", 6), "a blue square", 6)
    events = {"boom": [], "good": []}
    engine.submit(_run(cloud, diverging), events["boom"].append)
    engine.submit(_run(cloud, good), events["good"].append)
    _drain(engine)
    boom = events["boom"][-1]
    assert isinstance(boom, wire.Error) and boom.code == "model" and "no longer finite" in boom.message
    expected, _ = run_plan(good, models)
    assert ((events["good"][-1].latent - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert engine.health().jobs == 0


def test_an_event_that_cannot_be_sent_ends_its_session_alone(models):
    cloud = models["cloud"]
    engine = CloudEngine(cloud)
    sent = []

    def unsendable(event):  # as the daemon's emitter fails on a latent no codec can encode
        if isinstance(event, wire.Handoff):
            raise ValueError("cannot encode this latent")
        sent.append(event)

    engine.submit(_run(cloud, _spec(cloud, make("cloud-only", 3))), unsendable)
    other = []
    engine.submit(_run(cloud, _spec(cloud, make("cloud-only", 3), seed=9)), other.append)
    _drain(engine)
    assert isinstance(sent[-1], wire.Error) and "could not send its handoff" in sent[-1].message
    assert isinstance(other[-1], wire.Handoff) and engine.health().jobs == 0


def test_the_engine_refuses_what_its_limits_forbid(models):
    cloud = models["cloud"]
    engine = CloudEngine(cloud, limits=ServingLimits(max_sessions=2, max_sessions_per_client=1))
    spec = _spec(cloud, make("cloud-only", 2))
    engine.submit(_run(cloud, spec), lambda e: None, client=b"a")
    with pytest.raises(Refused) as e:
        engine.submit(_run(cloud, spec), lambda e: None, client=b"a")
    assert e.value.error.code == "limit"
    engine.submit(_run(cloud, spec), lambda e: None, client=b"b")
    with pytest.raises(Refused) as e:
        engine.submit(_run(cloud, spec), lambda e: None, client=b"c")
    assert e.value.error.code == "busy"
    engine.stop()
    with pytest.raises(Refused) as e:
        engine.submit(_run(cloud, spec), lambda e: None, client=b"d")
    assert e.value.error.code == "unavailable"
    engine.run_forever()  # finishes the two admitted, then returns
    assert engine.health().jobs == 0


def test_a_cloud_whose_steps_outlast_the_heartbeat_timeout_is_slow_not_dead(models, tmp_path):
    bind = f"ipc://{tmp_path}/slow.sock"
    server = CloudServer(Slow(models["cloud"], 2.0), bind, heartbeat_s=0.1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    try:
        spec = _spec(models["cloud"], make("hybrid-sd", 4, k=2), scheduler="DDIMScheduler")
        slow = []
        client = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S, heartbeat_timeout_s=0.5,
                            on_slow=lambda step, s: slow.append((step, s)))
        latent, summary = client.generate(spec)  # each 2 s step is four heartbeat timeouts long
    finally:
        server.stop()
        thread.join(timeout=WAIT_S)
    assert client.attempts == 1 and not summary.degraded  # never taken for dead, never retried
    assert client.stalls >= 2 and all(s > 0.5 for _, s in slow)  # but reported slow, once a step
    assert torch.equal(latent, run_plan(spec, models)[0])


def test_an_edge_busy_longer_than_its_heartbeat_timeout_reads_what_waited_before_it_judges_silence(models, tmp_path):
    bind = f"ipc://{tmp_path}/busy.sock"
    server = CloudServer(models["cloud"], bind, preview_every=1, heartbeat_s=0.1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    try:
        spec = _spec(models["cloud"], make("cloud-only", 6), scheduler="DDIMScheduler")
        naps = []

        def busy_at_first_preview(step, x):  # the edge's own callback outlasts its heartbeat timeout
            if not naps:
                naps.append(step)
                time.sleep(1.5)

        client = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S, heartbeat_timeout_s=0.5, retries=0,
                            on_preview=busy_at_first_preview)
        latent, summary = client.generate(spec)  # the handoff waited in the socket: read, not "went silent"
    finally:
        server.stop()
        thread.join(timeout=WAIT_S)
    assert naps and client.attempts == 1 and torch.equal(latent, run_plan(spec, models)[0])


def test_retries_spent_on_a_busy_cloud_end_in_a_public_error_that_says_so(models, tmp_path):
    from latentwire.scheduler.serving.edge import CloudUnavailable

    bind = f"ipc://{tmp_path}/full.sock"
    server = CloudServer(Slow(models["cloud"], 0.05), bind, limits=ServingLimits(max_sessions=1))
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    try:
        long = EdgeClient(bind, models["edge"], timeout_s=WAIT_S)
        outcome = []
        runner = threading.Thread(target=lambda: outcome.append(_catch(long.generate,
                                                                        _spec(models["cloud"], make("cloud-only", 200)))))
        runner.start()
        deadline = time.monotonic() + WAIT_S
        while EdgeClient(bind, None, timeout_s=WAIT_S).health()["jobs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        other = EdgeClient(bind, models["edge"], timeout_s=WAIT_S, retries=1, sleep=lambda s: None)
        with pytest.raises(CloudUnavailable, match=r"--max-sessions.*\(2 requests sent\)") as e:
            other.generate(_spec(models["cloud"], make("cloud-only", 2)))
        assert type(e.value) is CloudUnavailable and other.attempts == 2
        long.cancel()
        runner.join(timeout=WAIT_S)
        assert type(outcome[0]).__name__ == "Cancelled"
    finally:
        server.stop()
        thread.join(timeout=WAIT_S)
