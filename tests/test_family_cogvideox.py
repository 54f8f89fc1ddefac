"""The CogVideoX family (text-to-video): tiny random CogVideoXPipeline folders loaded with the real
from_pretrained, each piece checked against CogVideoXPipeline itself, and split generations of a cloud /
edge pair (CogVideoX-5B / 2B in miniature) over a real `latentwire cloud` daemon on ipc://."""
import json
import time

import daemons
import pytest
from runcli import run_cli
import torch
from diffusers import CogVideoXPipeline
from PIL import Image

from latentwire.kernels import UnsupportedScheduler
from latentwire.pipelines.models import load_model
from latentwire.pipelines.models.cogvideox import CogVideoXModel, video_latent_shape
from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pipeline
from latentwire.pipelines.models.tiny_cogvideox import SCHEDULER, save_tiny_cogvideox, save_tiny_cogvideox_pair
from latentwire.protocol import wire_bytes
from latentwire.scheduler import PlanError, SessionSpec, run_plan, wire
from latentwire.scheduler.limits import DEFAULT_SERVING_LIMITS
from latentwire.scheduler.serving.edge import CloudError, EdgeClient
from latentwire.scheduler.wire import Codecs

REPLY_TIMEOUT_S = 60
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
PROMPT, NEGATIVE = "a red circle on a blue square", "green"
# CogVideoX-2b's and -5b's transformer configs: 49 frames at 60 x 90 latent pixels (480 x 720), 16 channels
REAL_LATENT = (1, 13, 16, 60, 90)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cloud_path, edge_path = save_tiny_cogvideox_pair(tmp_path_factory.mktemp("cogvideox"), seed=0)
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def models(pair):
    return {"cloud": CogVideoXModel.from_pretrained(pair[0]), "edge": CogVideoXModel.from_pretrained(pair[1])}


@pytest.fixture(scope="module")
def cloud(pair, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/cogvideox.sock"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind, "--preview-every", "2")
    yield bind
    assert daemons.stop(proc) == 0, "SIGTERM should let the cloud finish and exit cleanly"


def _pipeline(path):
    pipe = CogVideoXPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_folders_load_by_family_and_share_their_spaces(pair):
    cloud, edge = (load_model(p) for p in pair)
    assert isinstance(cloud, CogVideoXModel) and (cloud.family, edge.family) == ("cogvideox", "cogvideox")
    assert cloud.latent_shape == edge.latent_shape == (3, 16, 8, 8)  # 9 frames -> 3 latent frames, 64 px -> 8
    assert tuple(cloud.latent_space) == (16, 8, 4, 1.15258426)
    assert tuple(cloud.text_space) == ("t5", 32, 226, cloud.tokenizer.vocab_size)
    assert (cloud.latent_space, cloud.text_space) == (edge.latent_space, edge.text_space)
    # 5B / 2B in miniature: the edge has fewer layers and sinusoidal positions, the cloud rotary ones
    tc, te = cloud.transformer.config, edge.transformer.config
    assert (tc.num_layers, te.num_layers) == (2, 1)
    assert (tc.use_rotary_positional_embeddings, te.use_rotary_positional_embeddings) == (True, False)
    sched = cloud.make_scheduler()
    assert type(sched).__name__ == "CogVideoXDDIMScheduler"
    assert {k: sched.config[k] for k in SCHEDULER} == SCHEDULER  # CogVideoX-2b's scheduler config
    # the pipeline's prepare_latents for the real models and for CogVideoX 1.5's padding
    vae = dict(channels=16, scale_factor=8, temporal_scale_factor=4)
    assert video_latent_shape(49, 480, 720, **vae) == (REAL_LATENT[1:], 0)
    assert video_latent_shape(81, 768, 1360, **vae, patch_size_t=2) == ((22, 16, 96, 170), 1)


@pytest.mark.parametrize("which", ["cloud", "edge", "cogvideox-1.5"])
@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_one_process_generation_equals_the_diffusers_pipeline(pair, tmp_path_factory, which, guidance):
    """predict + FusedSampler (generate) against CogVideoXPipeline, rotary (cloud), sinusoidal (edge) and
    CogVideoX 1.5's frame patches with padding; fp32 with a v-prediction zero-terminal-SNR DDIM schedule."""
    if which == "cogvideox-1.5":
        path = save_tiny_cogvideox(str(tmp_path_factory.mktemp("v15")), seed=1, patch_size_t=2)
    else:
        path = pair[0] if which == "cloud" else pair[1]
    model, pipe = CogVideoXModel.from_pretrained(path), _pipeline(path)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(3), output_type="latent").frames
    latent = model.generate(PROMPT, NEGATIVE, seed=3, steps=5, guidance_scale=guidance)
    assert latent.shape == expected.shape == (1, *model.latent_shape)
    assert _rel(latent, expected) <= 1e-5


def test_decode_is_the_pipelines_video(pair, models):
    model, pipe = models["cloud"], _pipeline(pair[0])
    latent = model.initial_noise(5, generator_device="cpu")
    frames = model.decode(latent)
    assert len(frames) == 1 and len(frames[0]) == 9 and frames[0][0].size == (64, 64)  # (3 - 1) * 4 + 1 frames
    with torch.no_grad():  # the pipeline's __call__ decodes under no_grad
        expected = pipe.video_processor.postprocess_video(pipe.decode_latents(latent), output_type="np")
    assert torch.equal(torch.from_numpy(model.decode(latent, output_type="np")), torch.from_numpy(expected))


def test_a_batch_of_rows_at_their_own_timesteps_is_each_row_alone(models):
    """The cloud engine stacks sessions: x (B, F, C, H, W), t (B,), embeddings cat along the batch."""
    model = models["cloud"]
    sched = model.make_scheduler()
    sched.set_timesteps(6)
    ts = sched.timesteps[[0, 3]]
    x = torch.cat([model.initial_noise(s) for s in (1, 2)])
    (c1, u1), (c2, u2) = (model.encode_prompt(p, NEGATIVE) for p in (PROMPT, "a cat"))
    pc, pu = model.predict(x, ts, torch.cat([c1, c2]), torch.cat([u1, u2]), scheduler=sched)
    for r, (c, u) in enumerate(((c1, u1), (c2, u2))):
        alone_c, alone_u = model.predict(x[r:r + 1], ts[r], c, u, scheduler=sched)
        assert _rel(pc[r:r + 1], alone_c) <= 1e-5 and _rel(pu[r:r + 1], alone_u) <= 1e-5


def test_cloud_only_over_the_network_equals_the_diffusers_pipeline(cloud, pair, models):
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan="cloud-only", steps=6, negative_prompt=NEGATIVE,
                                 guidance_scale=6.0, seed=11)
    assert spec.scheduler == "CogVideoXDDIMScheduler"  # the folder's own
    previews = []
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S,
                                 on_preview=lambda step, x: previews.append((step, tuple(x.shape)))).generate(spec)
    expected = _pipeline(pair[0])(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0,
                                  generator=torch.Generator().manual_seed(11), output_type="latent").frames
    assert latent.shape == expected.shape == REAL_LATENT[:1] + models["cloud"].latent_shape
    assert _rel(latent, expected) <= 1e-5
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (6, 0)
    assert previews == [(1, latent.shape), (3, latent.shape), (5, latent.shape)]  # 5-D latents stream too


@pytest.mark.parametrize("name, params", [("hybrid-sd", {"k": 3}), ("ec-diff", {"p": 2, "k": 1, "s": 5})])
def test_a_split_over_two_processes_equals_one_process_bit_for_bit(cloud, models, name, params):
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan=name, steps=7, plan_params=params,
                                 negative_prompt=NEGATIVE, guidance_scale=6.0, seed=4)
    expected, expected_summary = run_plan(spec, models)
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S).generate(spec)
    assert torch.equal(latent, expected)
    assert (summary.cloud_model_calls, summary.edge_model_calls, summary.forecast_steps) == (
        expected_summary.cloud_model_calls, expected_summary.edge_model_calls, expected_summary.forecast_steps)
    assert summary.cloud_model_calls > 0 and summary.edge_model_calls > 0


def test_the_real_latent_crosses_the_wire_at_one_byte_an_element(models):
    """CogVideoX-2b/5b's latent, (1, 13, 16, 60, 90) = 1,123,200 values, as a handoff and as a run request.
    int8 is one byte a value before zstd (per-"channel" scales: dim 1, here the 13 latent frames), fp32 four."""
    n = 13 * 16 * 60 * 90
    x = torch.randn(REAL_LATENT, generator=torch.Generator().manual_seed(0))
    handoff = wire.Handoff(x, step_index=10, timestep=799.0, seed=4, model_calls=10)

    raw = handoff.to_frames(Codecs(latent=("int8", 0)))
    assert len(raw) == 2 and len(raw[1]) == n == 1_123_200  # the payload: one byte a value, exactly
    # the header: lo and step per latent frame (8 * 13 bytes), the handoff's fields, the cloud's load (44 bytes)
    assert len(raw[0]) == 331
    assert wire_bytes(raw) == 1_123_531
    frames = handoff.to_frames(Codecs())  # the defaults: int8 + zstd 3
    got = wire.parse_reply(frames, DEFAULT_SERVING_LIMITS.protocol())
    assert got.latent.shape == REAL_LATENT and got.latent.dtype == torch.float32
    step = (x.amax((0, 2, 3, 4)) - x.amin((0, 2, 3, 4))) / 254  # int8's 255 levels per latent frame
    assert ((got.latent - x).abs().amax((0, 2, 3, 4)) <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert len(frames[1]) < n and wire_bytes(frames) < wire_bytes(raw)  # zstd earns a little on int8 noise

    spec = SessionSpec.for_model(models["edge"], PROMPT, plan="hybrid-sd", steps=7, plan_params={"k": 3})
    for codecs, payload in ((Codecs(), n), (EXACT, 4 * n)):  # an edge's request up, with the latent in it
        run = wire.Run(spec, (1, 2), latent=x, codecs=codecs, latent_space=wire.plain(models["edge"].latent_space))
        up = run.to_frames()
        assert len(up[-1]) <= payload and wire_bytes(up) <= DEFAULT_SERVING_LIMITS.max_message_bytes
        assert wire.parse_request(up, DEFAULT_SERVING_LIMITS.protocol()).latent.shape == REAL_LATENT


def test_a_stable_diffusion_edge_is_refused_naming_the_latent_space(cloud, pair, models, tmp_path):
    sd_edge = StableDiffusionModel.from_pretrained(save_tiny_pipeline(str(tmp_path / "sd"), edge=True))
    spec = SessionSpec.for_model(sd_edge, PROMPT, plan="hybrid-sd", steps=4, plan_params={"k": 2})
    start = time.monotonic()
    with pytest.raises(CloudError, match="latent_space.*latent space"):
        EdgeClient(cloud, sd_edge, timeout_s=REPLY_TIMEOUT_S).generate(spec)
    assert time.monotonic() - start < 10  # refused at once, not at a deadline
    with pytest.raises(PlanError, match="latent space"):  # and in one process
        run_plan(spec, {"cloud": models["cloud"], "edge": sd_edge})
    edge = CogVideoXModel.from_pretrained(pair[1])
    edge.text_space = edge.text_space._replace(vocab_size=999)  # as if its T5 had another vocabulary
    with pytest.raises(CloudError, match="text_space.*text space"):
        EdgeClient(cloud, edge, timeout_s=REPLY_TIMEOUT_S).generate(
            SessionSpec.for_model(edge, PROMPT, plan="cloud-only", steps=3))


def test_a_scheduler_the_fused_step_cannot_run_is_named_before_anything_is_sent(models):
    with pytest.raises(UnsupportedScheduler, match="CogVideoXDPMScheduler is not supported.*CogVideoXDDIMScheduler"):
        SessionSpec.for_model(models["edge"], PROMPT, scheduler="CogVideoXDPMScheduler")


def test_the_edge_command_writes_every_frame_of_the_video(cloud, pair, tmp_path):
    out = tmp_path / "video.gif"
    run = run_cli("edge", "--connect", cloud, "--model", pair[1], "--prompt", PROMPT, "--plan", "hybrid-sd", "--k", "2",
                  "--steps", "4", "--seed", "3", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert (summary["plan"], summary["cloud_model_calls"], summary["edge_model_calls"]) == ("hybrid-sd", 2, 2)
    with Image.open(out) as gif:
        assert gif.n_frames == 9 and gif.size == (64, 64)
