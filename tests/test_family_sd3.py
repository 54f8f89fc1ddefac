"""The SD3 / SD3.5 family (StableDiffusion3Pipeline folders): loaded with the real from_pretrained, equal to
diffusers' pipeline with and without T5, split across a real `latentwire cloud` daemon and an edge in this
process bit for bit equal to one process, its real latent's handoff bytes, and clear errors for a pair that
does not share a latent space or a scheduler that does not step a flow velocity."""
import copy
import json

import daemons
import pytest
from runcli import run_cli
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from latentwire.pipelines.models import load_model
from latentwire.pipelines.models.sd3 import MAX_SEQUENCE_LENGTH, LatentSpace, StableDiffusion3Model, TextSpace
from latentwire.pipelines.models.tiny import save_tiny_pipeline
from latentwire.pipelines.models.tiny_sd3 import CLIP_HIDDEN, JOINT, save_tiny_sd3, save_tiny_sd3_pair
from latentwire.scheduler import PlanError, SessionSpec, run_plan, wire
from latentwire.scheduler.serving.edge import CloudError, EdgeClient
from latentwire.scheduler.wire import Codecs

WAIT_S = 120
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
PROMPT, NEGATIVE = "a red circle on a blue square", "green"
GUIDANCE, SEED = 5.0, 11
CLIP_TOKENS = 16  # tiny.MAX_LENGTH, the tiny CLIP tokenizers' model_max_length (SD3: 77)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    cloud, edge = save_tiny_sd3_pair(root, seed=0)
    return {"cloud": str(cloud), "edge": str(edge),
            "edge_no_t5": str(save_tiny_sd3(root / "edge_no_t5", seed=0, edge=True, t5=False)),
            "sd": str(save_tiny_pipeline(root / "sd", seed=0, edge=True))}


@pytest.fixture(scope="module")
def models(folders):
    return {name: load_model(path) for name, path in folders.items()}


@pytest.fixture(scope="module")
def cloud(folders, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/sd3.sock"
    proc = daemons.start("cloud", "--model", folders["cloud"], "--bind", bind)
    yield bind
    assert daemons.stop(proc) == 0, "SIGTERM should let the cloud finish and exit cleanly"


def _pipeline(path, t5=True):
    # a folder saved without T5 loads the documented diffusers way: text_encoder_3=None, tokenizer_3=None
    kwargs = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **kwargs)


def _pipeline_latent(pipe, steps):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(SEED), output_type="latent").images


def _spec(model, plan, steps, **kw):
    return SessionSpec.for_model(model, PROMPT, plan=plan, steps=steps, negative_prompt=NEGATIVE,
                                 guidance_scale=GUIDANCE, seed=SEED, **kw)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_folders_load_by_their_family_with_the_spaces_they_share(models):
    cloud, edge, no_t5 = models["cloud"], models["edge"], models["edge_no_t5"]
    assert all(isinstance(m, StableDiffusion3Model) and m.family == "sd3" for m in (cloud, edge, no_t5))
    assert (cloud.has_t5, no_t5.has_t5) == (True, False)
    assert len(cloud.transformer.transformer_blocks) > len(edge.transformer.transformer_blocks)
    assert cloud.latent_shape == edge.latent_shape == (16, 8, 8)
    assert cloud.latent_space == edge.latent_space == LatentSpace(16, 8, 1.5305, 0.0609)
    vocab = cloud.text_encoders[0].config.vocab_size
    assert cloud.text_space == TextSpace(JOINT, CLIP_TOKENS, MAX_SEQUENCE_LENGTH, sum(CLIP_HIDDEN), sum(CLIP_HIDDEN),
                                         vocab, vocab)
    # no T5: zeros of T5's shape, so one text space (see sd3.py's module doc): the two may continue each other
    assert edge.text_space == no_t5.text_space == cloud.text_space
    assert cloud.timestep_kwargs() == {}  # SD3's folders: the fixed shift 3.0, no mu


@pytest.mark.parametrize("name", ["edge", "edge_no_t5"])
def test_encode_prompt_is_the_pipelines(folders, models, name):
    model = models[name]
    pipe = _pipeline(folders[name], t5=name == "edge")
    with torch.no_grad():  # as the pipeline's __call__ runs it
        expected = pipe.encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE)  # embeds, neg, pooled, neg pooled
    (c, pc), (u, pu) = model.encode_prompt(PROMPT, NEGATIVE)
    for got, want in zip((c, u, pc, pu), expected):
        assert got.shape == want.shape and torch.equal(got, want)
    assert c.shape == (1, CLIP_TOKENS + MAX_SEQUENCE_LENGTH, JOINT) and pc.shape == (1, sum(CLIP_HIDDEN))
    assert c[:, :CLIP_TOKENS, sum(CLIP_HIDDEN):].abs().max() == 0  # CLIP's rows padded to the joint width
    assert (c[:, CLIP_TOKENS:].abs().max() == 0) == (name == "edge_no_t5")  # T5's rows: zeros without T5


def test_cloud_only_over_the_network_equals_the_diffusers_pipeline(cloud, folders, models):
    spec = _spec(models["edge"], "cloud-only", 6)  # the folder's own scheduler
    assert spec.scheduler == "FlowMatchEulerDiscreteScheduler" and spec.scheduler_config["shift"] == 3.0
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    expected = _pipeline_latent(_pipeline(folders["cloud"]), 6)
    assert _rel(latent, expected) <= 1e-5
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (6, 0)


def test_a_folder_without_t5_equals_its_pipeline(folders, models):
    spec = _spec(models["edge_no_t5"], "edge-only", 5)
    latent, _ = run_plan(spec, {"edge": models["edge_no_t5"]})
    assert _rel(latent, _pipeline_latent(_pipeline(folders["edge_no_t5"], t5=False), 5)) <= 1e-5


@pytest.mark.parametrize("edge", ["edge", "edge_no_t5"])
def test_a_hybrid_split_over_the_network_equals_one_process(cloud, models, edge):
    """The cloud (SD3.5-like, with T5) takes the first steps, the edge (fewer layers; with T5, or without)
    the rest: bit for bit what one process computes with the same two models."""
    spec = _spec(models[edge], "hybrid-sd", 7, plan_params={"k": 3})
    expected, expected_summary = run_plan(spec, {"cloud": models["cloud"], "edge": models[edge]})
    latent, summary = EdgeClient(cloud, models[edge], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    assert torch.equal(latent, expected)
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (3, 4) == (
        expected_summary.cloud_model_calls, expected_summary.edge_model_calls)


def test_a_batch_of_rows_predicts_what_each_row_does(models):
    """The cloud engine stacks x, t (B,) and each conditioning tensor along the batch (scheduler/engine.py
    _stack); each row's velocities match its own call to float32 rounding."""
    model = models["cloud"]
    s = model.make_scheduler()
    s.set_timesteps(5)
    conds = [model.encode_prompt(p, NEGATIVE) for p in (PROMPT, "a cat")]
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[[1, 3]]
    stacked = [tuple(torch.cat(parts) for parts in zip(*(c[j] for c in conds))) for j in (0, 1)]
    vc, vu = model.predict(x, t, *stacked, scheduler=s, guidance=torch.tensor([GUIDANCE, 3.0]))
    for r in range(2):
        rc, ru = model.predict(x[r:r + 1], float(t[r]), *conds[r], scheduler=s)
        assert _rel(vc[r:r + 1], rc) <= 1e-5 and _rel(vu[r:r + 1], ru) <= 1e-5
    with pytest.raises(ValueError, match=r"tuple \(embeds, pooled\)"):
        model.predict(x, t, conds[0][0][0], conds[0][1][0])  # embeds alone, as SD's conditioning


def test_dynamic_shifting_sends_the_pipelines_mu(folders, models):
    """SD3's folders shift by a fixed 3.0; a folder with use_dynamic_shifting gets mu from the image sequence
    length as the pipeline computes it (calculate_shift), carried by SessionSpec.timestep_kwargs."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    model = copy.copy(models["edge"])
    model.scheduler_config = {**model.scheduler_config, "use_dynamic_shifting": True}
    c = model.scheduler_config
    mu = calculate_shift(16, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
    assert model.timestep_kwargs() == {"mu": pytest.approx(mu, rel=1e-12)}  # (8 / 2)^2 = 16 image tokens
    spec = _spec(model, "edge-only", 4)
    assert spec.timestep_kwargs == model.timestep_kwargs()
    latent, _ = run_plan(spec, {"edge": model})
    pipe = _pipeline(folders["edge"])
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(c)
    assert _rel(latent, _pipeline_latent(pipe, 4)) <= 1e-5


def test_a_scheduler_that_steps_no_flow_velocity_is_refused(models):
    with pytest.raises(ValueError, match="DDIMScheduler.*flow velocity.*FlowMatchEulerDiscreteScheduler"):
        _spec(models["edge"], "hybrid-sd", 6, scheduler="DDIMScheduler")


def test_the_handoff_of_a_1024px_sd3_latent(models):
    """SD3 at 1024 x 1024: a (1, 16, 128, 128) latent, N = 262,144 values. int8 is 1 byte a value (exactly N
    bytes before zstd) plus the header, whose int8 entry holds C = 16 float32 (lo, step) pairs: 128 bytes."""
    n = 16 * 128 * 128
    x = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(0))
    assert x.shape[1:] == (models["cloud"].latent_shape[0], 1024 // 8, 1024 // 8)
    h = wire.Handoff(x, 10, 500.0, SEED, None, 10, 0, 1)
    raw, packed, fp32 = (h.to_frames(c) for c in (Codecs(latent=("int8", 0)), Codecs(), EXACT))
    assert len(bytes(raw[1])) == n == 262_144
    assert len(bytes(fp32[1])) == 4 * n == 1_048_576
    assert 128 < len(bytes(raw[0])) <= 128 + 256  # the quantization parameters and the handoff's fields
    assert len(bytes(packed[1])) <= n  # the default codecs: int8 + zstd level 3 (Gaussian noise: ~0.9 n)
    for frames in (raw, packed):
        back = wire.parse_reply(frames)
        assert back.latent.shape == x.shape and back.latent.dtype == torch.float32
        # half a quantization step per channel, plus float32's rounding of lo + q step (SPEC.md section 4)
        step = (x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))) / 255
        rounding = 2 * torch.finfo(torch.float32).eps * x.abs().max()
        assert ((back.latent - x).abs() <= step.view(1, -1, 1, 1) / 2 + rounding).all()


def test_an_sd_edge_is_refused_by_an_sd3_cloud_naming_the_latent_space(cloud, models):
    spec = SessionSpec.for_model(models["sd"], PROMPT, plan="hybrid-sd", steps=4, plan_params={"k": 2})
    with pytest.raises(CloudError, match="latent_space"):
        EdgeClient(cloud, models["sd"], timeout_s=WAIT_S).generate(spec)
    with pytest.raises(PlanError, match="latent space"):
        run_plan(spec, {"cloud": models["cloud"], "edge": models["sd"]})


def test_the_edge_command_against_an_sd3_cloud_writes_an_image(cloud, folders, tmp_path):
    out = tmp_path / "sd3.png"
    run = run_cli("edge", "--connect", cloud, "--model", folders["edge"], "--prompt", PROMPT, "--steps", "4", "--plan",
                  "hybrid-sd", "--k", "2", "--seed", "3", "--json", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert (summary["plan"], summary["cloud_model_calls"], summary["edge_model_calls"]) == ("hybrid-sd", 2, 2)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
