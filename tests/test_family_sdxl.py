"""The SDXL family (StableDiffusionXLModel) on a tiny random SDXL-Base-like cloud and a narrower, SSD-1B/Vega-like
edge sharing its two text encoders, tokenizers, VAE and Euler scheduler (pipelines/models/tiny_sdxl.py): the
folder loads with the real from_pretrained; its pieces equal StableDiffusionXLPipeline's; a real `latentwire
cloud` daemon serves it to an EdgeClient (cloud-only: equal to the pipeline; hybrid-sd: equal to one process
bit for bit) and to `latentwire edge`; an SD edge is refused by name; a real-size handoff's bytes are counted."""
import json
import shutil

import daemons
import pytest
from runcli import run_cli
import torch
from diffusers import StableDiffusionXLPipeline

from latentwire.pipelines.models import load_model
from latentwire.pipelines.models.sdxl import StableDiffusionXLModel, TextSpace
from latentwire.pipelines.models.tiny import save_tiny_pipeline
from latentwire.pipelines.models.tiny_sdxl import (MAX_LENGTH, POOLED, TEXT_HIDDEN, TEXT_HIDDEN_2,
                                                   save_tiny_sdxl_pair)
from latentwire.scheduler import SessionSpec, make, run_plan, wire
from latentwire.scheduler.engine import CloudEngine
from latentwire.scheduler.serving.edge import CloudError, EdgeClient
from latentwire.scheduler.wire import Codecs

REPLY_TIMEOUT_S = 60
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
PROMPT, NEGATIVE = "a red circle on a blue square", "green"
# FusedSampler folds guidance and the Euler update into one float32 pass, so its rounding differs from the
# pipeline's scheduler.step by a few ulps (2^-23) a step: 1e-5 of the largest entry leaves room for 8 steps
LATENT_RTOL = 1e-5
SDXL_LATENT = (1, 4, 128, 128)  # SDXL-Base, SSD-1B, Vega at 1024 x 1024: 4 channels at 1/8 of the image size


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cloud_path, edge_path = save_tiny_sdxl_pair(str(tmp_path_factory.mktemp("sdxl")), seed=0)
    return cloud_path, edge_path


@pytest.fixture(scope="module")
def models(pair):
    return {"cloud": load_model(pair[0]), "edge": load_model(pair[1])}


@pytest.fixture(scope="module")
def pipe(pair):
    p = StableDiffusionXLPipeline.from_pretrained(pair[0], local_files_only=True)  # its own Euler scheduler
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def cloud(pair, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/sdxl.sock"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind)
    yield bind
    assert daemons.stop(proc) == 0, "SIGTERM should let the cloud finish and exit cleanly"


def _spec(model, plan, steps=8, negative_prompt=NEGATIVE, **kw):
    """A session of the folder's own scheduler (SDXL's EulerDiscreteScheduler), as `latentwire edge` builds it."""
    return SessionSpec.for_model(model, PROMPT, plan=plan, steps=steps, negative_prompt=negative_prompt,
                                 guidance_scale=6.0, seed=11, **kw)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- one process ----------------------------------------------------------------------------------------

def test_the_folder_loads_with_from_pretrained_and_the_pair_shares_its_spaces(pair, models):
    cloud, edge = models["cloud"], models["edge"]
    assert type(cloud) is StableDiffusionXLModel and cloud.family == "sdxl"
    assert [type(e).__name__ for e in cloud.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert cloud.text_space == TextSpace(TEXT_HIDDEN, TEXT_HIDDEN_2, POOLED, MAX_LENGTH, 184, 184)
    assert cloud.latent_space == edge.latent_space == (4, 8, 0.13025) and cloud.latent_shape == (4, 8, 8)
    assert cloud.text_space == edge.text_space and cloud.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    assert type(cloud.scheduler).__name__ == "EulerDiscreteScheduler"
    assert cloud.scheduler.config.timestep_spacing == "leading" and cloud.scheduler.config.steps_offset == 1
    # the edge's UNet is the distilled, narrower one; everything else is the cloud's, bit for bit
    assert list(edge.unet.config.block_out_channels) == [16, 32] != list(cloud.unet.config.block_out_channels)
    for a, b in zip((*cloud.text_encoders, cloud.vae), (*edge.text_encoders, edge.vae)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_folder_without_its_second_text_encoder_is_a_clear_error(pair, tmp_path):
    folder = shutil.copytree(pair[1], tmp_path / "no-te2")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="lacks text_encoder_2"):
        StableDiffusionXLModel.from_pretrained(str(folder))


@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_encode_prompt_equals_the_pipeline(models, pipe, negative):
    """An empty negative prompt is the pipeline's default (None): force_zeros_for_empty_prompt makes it zeros."""
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negative or None)
    (c, cp), (u, up) = models["cloud"].encode_prompt(PROMPT, negative)
    assert c.shape == (1, MAX_LENGTH, TEXT_HIDDEN + TEXT_HIDDEN_2) and cp.shape == (1, POOLED)
    assert torch.equal(c, embeds) and torch.equal(cp, pooled)
    assert torch.equal(u, negative_embeds) and torch.equal(up, negative_pooled)
    assert (u.abs().max() == 0) == (negative == "")


def test_batched_sessions_in_one_forward_end_as_they_would_alone(models):
    """The engine stacks the (embeds, pooled) tuples row by row and t as a (B,) tensor; predict expands the
    time ids to the batch. Two sessions of one schedule (other prompts, seeds, guidance; one negative prompt zeros,
    one encoded) share each forward."""
    cloud = models["cloud"]
    specs = [SessionSpec.for_model(cloud, p, plan="cloud-only", steps=6, guidance_scale=g, seed=s, negative_prompt=n)
             for p, g, s, n in (("a red circle", 6.0, 1, ""), ("a blue square", 3.0, 2, NEGATIVE))]
    engine, events = CloudEngine(cloud, max_batch=2), {0: [], 1: []}
    for r, spec in enumerate(specs):
        engine.submit(wire.Run(spec, (0, 1), session_id=str(r)), emit=events[r].append)
    while engine.turn():
        pass
    assert max(engine.batch_sizes) == 2
    for r, spec in enumerate(specs):
        (handoff,) = events[r]
        assert _rel(handoff.latent, run_plan(spec, {"cloud": cloud})[0]) <= LATENT_RTOL


def test_a_float16_vae_decodes_in_float32_as_the_pipeline_upcasts_it(pair):
    """SDXL's VAE overflows in float16: with force_upcast the pipeline decodes in float32, then casts back."""
    import copy

    half = StableDiffusionXLModel.from_pretrained(pair[1], dtype=torch.float16)
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).half()
    vae32 = copy.deepcopy(half.vae).float()
    image = half.decode(latent, "pt")
    expected = half.image_processor.postprocess(vae32.decode(latent.float() / 0.13025).sample, output_type="pt")
    assert half.vae.dtype == torch.float16 and image.dtype == torch.float32 and torch.equal(image, expected)


# -- two processes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_cloud_only_over_the_network_equals_the_sdxl_pipeline(cloud, models, pipe, negative):
    spec = _spec(models["edge"], "cloud-only", negative_prompt=negative)
    assert spec.scheduler == "EulerDiscreteScheduler"  # the folder's own, deterministic
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S).generate(spec)
    expected = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=8, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert _rel(latent, expected) <= LATENT_RTOL
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (8, 0)


@pytest.mark.parametrize("name, params", [("hybrid-sd", {"k": 3}), ("ec-diff", {"p": 2, "k": 1, "s": 6})])
def test_a_split_over_the_network_equals_one_process_bit_for_bit(cloud, models, name, params):
    spec = _spec(models["edge"], name, 9, plan_params=params)
    expected, expected_summary = run_plan(spec, models)
    client = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=REPLY_TIMEOUT_S)
    latent, summary = client.generate(spec)
    assert torch.equal(latent, expected)
    assert (summary.cloud_model_calls, summary.edge_model_calls, summary.forecast_steps) == (
        expected_summary.cloud_model_calls, expected_summary.edge_model_calls, expected_summary.forecast_steps)
    assert summary.edge_model_calls > 0 and summary.cloud_model_calls > 0


def test_an_sd_edge_is_refused_by_the_sdxl_cloud_naming_the_space(cloud, models, tmp_path):
    from latentwire.pipelines.models.sd import StableDiffusionModel

    sd = StableDiffusionModel.from_pretrained(save_tiny_pipeline(str(tmp_path / "sd"), seed=0, edge=True))
    spec = SessionSpec.for_model(sd, PROMPT, plan="hybrid-sd", steps=6, plan_params={"k": 2})
    with pytest.raises(CloudError, match="latent_space.*latent space"):  # SD's VAE scales by 0.18215, SDXL's 0.13025
        EdgeClient(cloud, sd, timeout_s=REPLY_TIMEOUT_S).generate(spec)
    sd.latent_space = models["cloud"].latent_space  # as if its VAE were SDXL's: the text encoders still differ
    with pytest.raises(CloudError, match="text_space.*text space"):
        EdgeClient(cloud, sd, timeout_s=REPLY_TIMEOUT_S).generate(spec)
    with pytest.raises(ValueError, match="text space"):  # one process refuses the pair as well
        run_plan(spec, {"cloud": models["cloud"], "edge": sd})


def test_the_edge_command_against_the_sdxl_cloud_writes_an_image_and_a_json_summary(cloud, pair, tmp_path):
    out = tmp_path / "sdxl.png"
    run = run_cli("edge", "--connect", cloud, "--model", pair[1], "--prompt", PROMPT, "--steps", "4", "--k", "2",
                  "--seed", "3", "--json", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert (summary["plan"], summary["steps"], summary["cloud_model_calls"], summary["edge_model_calls"]) == (
        "hybrid-sd", 4, 2, 2)
    from PIL import Image

    assert Image.open(out).size == (64, 64)


# -- the wire at SDXL's real size -----------------------------------------------------------------------

def test_a_handoff_of_sdxl_s_real_latent_and_its_bytes():
    """A (1, 4, 128, 128) latent (SDXL-Base / SSD-1B / Vega at 1024 x 1024) with the default codecs: int8 is one
    byte an element, 65536 bytes before zstd; zstd never makes a frame larger than its compress bound
    (n + n/256 + (128 KiB - n)/2048 for n < 128 KiB: 65824 bytes here). The header frame holds the meta and the
    per-channel lo/step (8 bytes a channel)."""
    n = 4 * 128 * 128
    zstd_bound = n + (n >> 8) + ((128 * 1024 - n) >> 11)
    x = torch.randn(SDXL_LATENT, generator=torch.Generator().manual_seed(0)) * 7
    frames = wire.Handoff(x, 12, 521.0, 11, model_calls=12, worker=1).to_frames(Codecs())
    back = wire.parse_reply(frames)
    header, payload = (len(memoryview(f).cast("B")) for f in frames)
    assert back.latent.shape == SDXL_LATENT and back.latent.dtype == torch.float32
    # int8: within half a step per channel, plus the float32 rounding of x_hat = lo + q step (a few ulps of |x|)
    step = (x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))) / 255
    ulps = 4 * torch.finfo(torch.float32).eps * x.abs().max()
    assert ((back.latent - x).abs().amax(dim=(0, 2, 3)) <= step / 2 + ulps).all()
    assert 0.8 * n < payload <= zstd_bound and header <= 300  # measured: 58230 + 258 bytes (zstd 3 on N(0, 49))
    raw = wire.Handoff(x, 12, 521.0, 11).to_frames(Codecs(latent=("int8", 0)))
    assert len(memoryview(raw[1]).cast("B")) == n  # int8 without zstd: exactly one byte an element
    # the edge's request up, with the same latent (an EC-Diff handoff to the cloud): same codec, same bound
    spec = SessionSpec(prompt=PROMPT, plan=make("ec-diff", 8, p=2, k=1, s=6), scheduler="EulerDiscreteScheduler")
    up = wire.Run(spec, (1, 2), latent=x).to_frames()
    request = wire.parse_request(up)
    assert request.latent.shape == SDXL_LATENT and request.latent.dtype == torch.float32
    assert 0.8 * n < len(memoryview(up[1]).cast("B")) <= zstd_bound and len(up[0]) <= 1024  # measured: 532
