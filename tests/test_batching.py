"""Step-level batching: sessions at different steps, with different prompts, seeds, guidance and plans,
share model forwards and per-row fused steps, and each ends as it would alone (to 1e-5)."""
import threading
import time

import pytest
import torch

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make
from latentwire.scheduler.serving.cloud import CloudServer
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.wire import Codecs

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("m"), seed=0)
    return StableDiffusionModel.from_pretrained(cloud_path), StableDiffusionModel.from_pretrained(edge_path)


def _spec(model, plan, scheduler, prompt, seed, g):
    s = model.make_scheduler(scheduler)
    return SessionSpec(prompt=prompt, plan=plan, scheduler=type(s).__name__, scheduler_config=dict(s.config),
                       guidance_scale=g, seed=seed)


def _sessions(cloud):
    dpm = "DPMSolverMultistepScheduler"
    return [  # (spec, segments the cloud runs)
        (_spec(cloud, make("cloud-only", 8), dpm, "a red circle", 1, 7.5), (0, 1)),
        (_spec(cloud, make("cloud-only", 8), dpm, "a blue square", 2, 3.0), (0, 1)),
        (_spec(cloud, make("hybrid-sd", 8, k=5), dpm, "a green circle", 3, 5.0), (0, 1)),
        (_spec(cloud, make("ec-diff", 8, p=2, k=1, s=6), dpm, "a red square", 4, 6.0), (0, 1)),  # forecasts: alone
        (_spec(cloud, make("cloud-only", 8), "EulerAncestralDiscreteScheduler", "a blue circle", 5, 7.5), (0, 1)),
    ]


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    return thread


def test_batched_sessions_end_as_they_would_alone(models, tmp_path):
    cloud, edge = models
    sessions = _sessions(cloud)
    # alone: one request at a time
    alone_server = CloudServer(cloud, f"ipc://{tmp_path}/alone.sock")
    thread = _serve(alone_server)
    try:
        alone = [EdgeClient(f"ipc://{tmp_path}/alone.sock", edge, codecs=EXACT, timeout_s=60).run_remote(spec, a, b)
                 for spec, (a, b) in sessions]
    finally:
        alone_server.stop()
        thread.join(timeout=30)
    # batched: every request is queued before the server's loop starts, so they share its first turns
    server = CloudServer(cloud, f"ipc://{tmp_path}/batch.sock", max_batch=4, preview_every=3)
    clients = [EdgeClient(f"ipc://{tmp_path}/batch.sock", edge, codecs=EXACT, timeout_s=60) for _ in sessions]
    batched = [None] * len(sessions)

    def run(r):
        spec, (a, b) = sessions[r]
        batched[r] = clients[r].run_remote(spec, a, b)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(sessions))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(c.attempts for c in clients) < len(sessions) and time.monotonic() < deadline:
        time.sleep(0.01)
    thread = _serve(server)
    try:
        for t in threads:
            t.join(timeout=60)
    finally:
        server.stop()
        thread.join(timeout=30)
    assert max(server.batch_sizes) >= 3  # the three DPM sessions without forecasting stepped together
    for (x_alone, st_alone, calls_alone, fc_alone), (x_b, st_b, calls_b, fc_b) in zip(alone, batched):
        assert ((x_b - x_alone).abs().max() / x_alone.abs().max()).item() <= 1e-5
        assert (calls_b, fc_b) == (calls_alone, fc_alone)
        assert (st_b is None) == (st_alone is None)
        if st_b is not None:
            for name, t in st_alone.tensors().items():
                assert ((st_b.tensors()[name] - t).abs().max() / t.abs().max()).item() <= 1e-5


def test_max_batch_is_checked(models, tmp_path):
    with pytest.raises(ValueError, match="max_batch"):
        CloudServer(models[0], f"ipc://{tmp_path}/x.sock", max_batch=0)


class _FailsOn:
    """The cloud model, except that it raises for one prompt (as a model can on bad input)."""

    def __init__(self, model, prompt):
        self.model, self.prompt = model, prompt
        self.latent_space, self.text_space = model.latent_space, model.text_space

    def encode_prompt(self, prompt, negative=""):
        cond, uncond = self.model.encode_prompt(prompt, negative)
        return (cond * float("nan"), uncond) if prompt == self.prompt else (cond, uncond)

    def predict(self, x, t, cond, uncond, scheduler=None, guidance=None):
        if torch.isnan(cond).any():
            raise RuntimeError("the model met NaN embeddings")
        return self.model.predict(x, t, cond, uncond, scheduler=scheduler, guidance=guidance)

    def initial_noise(self, *args, **kwargs):
        return self.model.initial_noise(*args, **kwargs)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_failing_model_call_ends_that_session_and_the_cloud_serves_on(models, tmp_path, max_batch):
    from latentwire.scheduler.serving.edge import CloudError

    cloud, edge = models
    server = CloudServer(_FailsOn(cloud, "poison"), f"ipc://{tmp_path}/f.sock", max_batch=max_batch)
    thread = _serve(server)
    try:
        bad = _spec(cloud, make("cloud-only", 4), "DDIMScheduler", "poison", 1, 7.5)
        with pytest.raises(CloudError, match="the cloud's model failed: RuntimeError"):
            EdgeClient(f"ipc://{tmp_path}/f.sock", edge, timeout_s=60).generate(bad)
        good = _spec(cloud, make("cloud-only", 4), "DDIMScheduler", "a red circle", 1, 7.5)
        latent, summary = EdgeClient(f"ipc://{tmp_path}/f.sock", edge, timeout_s=60).generate(good)
        assert summary.cloud_model_calls == 4 and torch.isfinite(latent).all()
    finally:
        server.stop()
        thread.join(timeout=30)
