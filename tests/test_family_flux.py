"""The Flux family (pipelines/models/flux.py) on the tiny random pair of pipelines/models/tiny_flux.py: its pieces
against diffusers' FluxPipeline, its schedule against the one the pipeline builds, and a real `latentwire cloud`
daemon serving it to an EdgeClient here and to `latentwire edge`."""
import dataclasses
import json
import math

import daemons
import numpy as np
import pytest
from runcli import run_cli
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from latentwire.pipelines.models import load_model
from latentwire.pipelines.models.flux import FluxModel, pack, unpack
from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pipeline
from latentwire.pipelines.models.tiny_flux import IMAGE_SIZE, LAYERS, save_tiny_flux, save_tiny_flux_pair
from latentwire.protocol import wire_bytes
from latentwire.scheduler import SessionSpec, run_plan, wire
from latentwire.scheduler.engine import CloudEngine
from latentwire.scheduler.serving.edge import CloudError, EdgeClient

EXACT = wire.Codecs(latent=("fp32", 0), state=("fp32", 0))
WAIT_S = 60
PROMPT = "a red circle on a blue square"
# Final latents: the fused step rounds its float32 update in another order than scheduler.step, and the
# runner's guided sum (1 - g) v + g v of the one velocity rounds too: a few ulps (2^-23) of the largest
# entry a step; 1e-5 is ~84 of them, over <= 7 steps (measured: <= 3e-7).
LATENT_RTOL = 1e-5


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    cloud, edge = save_tiny_flux_pair(str(root), seed=0)
    return {"cloud": cloud, "edge": edge, "schnell": save_tiny_flux(str(root / "schnell"), seed=0, schnell=True),
            "sd-edge": save_tiny_pipeline(str(root / "sd-edge"), seed=0, edge=True)}


@pytest.fixture(scope="module")
def models(paths):
    return {side: FluxModel.from_pretrained(paths[side]) for side in ("cloud", "edge")}


@pytest.fixture(scope="module")
def pipe(paths):
    p = FluxPipeline.from_pretrained(paths["cloud"], local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def cloud(paths, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/flux.sock"
    proc = daemons.start("cloud", "--model", paths["cloud"], "--bind", bind)
    yield bind
    assert daemons.stop(proc) == 0, "SIGTERM should let the cloud finish and exit cleanly"


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _depth(model):
    """(double-stream blocks, single-stream blocks) of a model's transformer."""
    return len(model.transformer.transformer_blocks), len(model.transformer.single_transformer_blocks)


def _pipeline_latent(pipe, model, **kw):
    """FluxPipeline's output_type="latent" result (packed: (B, seq, 64)) unpacked to (B, 16, h, w)."""
    h, w = (model.vae_scale_factor * n for n in model.latent_shape[1:])
    packed = pipe(PROMPT, height=h, width=w, output_type="latent", **kw).images
    return pipe._unpack_latents(packed, h, w, pipe.vae_scale_factor)


# -- the model's pieces, one process --------------------------------------------------------------------

def test_the_folder_loads_as_flux_with_shared_spaces_and_a_shallower_edge(paths, models):
    cloud, edge = load_model(paths["cloud"]), models["edge"]
    assert isinstance(cloud, FluxModel) and cloud.family == "flux"
    side = IMAGE_SIZE // 8
    assert cloud.latent_shape == edge.latent_shape == (16, side, side)
    assert tuple(cloud.latent_space) == (16, 8, 0.3611, 0.1159) and cloud.latent_space == edge.latent_space
    assert tuple(cloud.text_space) == (32, 512, cloud.tokenizer_2.vocab_size, 32, 16, cloud.tokenizer.vocab_size)
    assert cloud.text_space == edge.text_space
    assert (_depth(cloud), _depth(edge)) == (LAYERS["cloud"], LAYERS["edge"])
    for name in ("text_encoder", "text_encoder_2", "vae"):  # the pair shares every other component, bit for bit
        for a, b in zip(getattr(cloud, name).state_dict().values(), getattr(edge, name).state_dict().values()):
            assert torch.equal(a, b), name
    assert cloud.guidance_embeds and not FluxModel.from_pretrained(paths["schnell"]).guidance_embeds


def test_pack_noise_ids_prompt_and_mu_are_the_pipelines(pipe, models):
    model = models["cloud"]
    x = torch.randn(3, 16, 6, 10)  # odd token grid: 3 x 5 patches
    assert torch.equal(pack(x), pipe._pack_latents(x, 3, 16, 6, 10))
    assert torch.equal(unpack(pack(x), 6, 10), x)
    h, w = (8 * n for n in model.latent_shape[1:])
    packed, img_ids = pipe.prepare_latents(2, 16, h, w, torch.float32, "cpu", torch.Generator().manual_seed(5))
    noise = model.initial_noise(5, batch=2, generator_device="cpu")
    assert noise.shape == (2, *model.latent_shape) and torch.equal(pack(noise), packed)
    assert torch.equal(model.img_ids, img_ids)
    with torch.no_grad():  # as in the pipeline's __call__ (autograd changes T5's kernels, and their rounding)
        embeds, pooled, txt_ids = pipe.encode_prompt(PROMPT, device="cpu",
                                                     max_sequence_length=model.max_sequence_length)
    cond, uncond = model.encode_prompt(PROMPT, "ignored: Flux has no negative branch")
    assert torch.equal(cond[0], embeds) and torch.equal(cond[1], pooled) and torch.equal(model.txt_ids, txt_ids)
    assert uncond is cond
    c = model.scheduler_config
    mu = calculate_shift(model.image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                         c["max_shift"])
    assert model.timestep_kwargs() == {"mu": mu}
    assert model.timestep_kwargs(5) == {"mu": mu, "sigmas": np.linspace(1.0, 1 / 5, 5).tolist()}


def test_predict_is_the_pipelines_transformer_call_once(models):
    model = models["cloud"]
    cond, uncond = model.encode_prompt(PROMPT)
    x = model.initial_noise(1, batch=3)
    t = torch.tensor([1000.0, 750.5, 31.25])
    g = torch.tensor([3.5, 1.0, 7.0])
    v, second = model.predict(x, t, cond, uncond, guidance=g)
    assert second is v and v.shape == x.shape
    with torch.no_grad():
        ref = model.transformer(hidden_states=pack(x), timestep=t / 1000, guidance=g,
                                pooled_projections=cond[1].expand(3, -1),
                                encoder_hidden_states=cond[0].expand(3, -1, -1), txt_ids=model.txt_ids,
                                img_ids=model.img_ids, return_dict=False)[0]
    assert torch.equal(v, unpack(ref, *model.latent_shape[1:]))
    for r in range(3):  # a batch of rows (the engine's stacking) is each row alone, to float32 rounding
        alone, _ = model.predict(x[r:r + 1], float(t[r]), cond, uncond, guidance=float(g[r]))
        assert _rel(v[r:r + 1], alone) <= 1e-6
    low, high = (model.predict(x[:1], 500.0, cond, guidance=g)[0] for g in (1.0, 9.0))
    assert _rel(low, high) > 1e-3  # the embedding carries g
    with pytest.raises(ValueError, match="guidance"):
        model.predict(x, 500.0, cond, uncond)
    with pytest.raises(ValueError, match=r"x must be \(B, 16, 8, 8\)"):
        model.predict(x[:, :4], 500.0, cond, guidance=3.5)
    with pytest.raises(ValueError, match="per-row t"):
        model.predict(x, t[:2], cond, guidance=3.5)


def test_limits_at_and_past_their_edge_and_schedulers_that_cannot_step_flux(models):
    m = models["edge"]
    parts = (m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, m.transformer, m.vae, m.scheduler_config)
    assert FluxModel(*parts, max_sequence_length=512).text_space.max_length == 512  # FluxPipeline's limit
    with pytest.raises(ValueError, match="max_sequence_length must be an int in 1..512"):
        FluxModel(*parts, max_sequence_length=513)
    assert FluxModel(*parts, height=16, width=16).latent_shape == (16, 2, 2)  # one 2x2 patch: one token
    with pytest.raises(ValueError, match="at least 16 pixels a side"):
        FluxModel(*parts, height=15, width=16)
    with pytest.raises(ValueError, match="cannot step Flux.*FlowMatchEulerDiscreteScheduler"):
        SessionSpec.for_model(m, PROMPT, scheduler="DPMSolverMultistepScheduler")


@pytest.mark.parametrize("size", [(IMAGE_SIZE, IMAGE_SIZE), (48, 80)])
@pytest.mark.parametrize("steps", [1, 4])
def test_generate_equals_the_flux_pipeline(paths, pipe, size, steps):
    model = FluxModel.from_pretrained(paths["cloud"], height=size[0], width=size[1])
    got = model.generate(PROMPT, seed=7, steps=steps, guidance_scale=3.5, batch=2)
    expected = _pipeline_latent(pipe, model, num_inference_steps=steps, guidance_scale=3.5, num_images_per_prompt=2,
                                generator=torch.Generator().manual_seed(7))
    assert got.shape == (2, 16, size[0] // 8, size[1] // 8) and _rel(got, expected) <= LATENT_RTOL


def test_a_schnell_folder_ignores_guidance_and_equals_its_pipeline(paths):
    model = FluxModel.from_pretrained(paths["schnell"])
    schnell = FluxPipeline.from_pretrained(paths["schnell"], local_files_only=True)
    schnell.set_progress_bar_config(disable=True)
    x, (cond, _) = model.initial_noise(0), model.encode_prompt(PROMPT)
    assert torch.equal(model.predict(x, 900.0, cond, guidance=None)[0], model.predict(x, 900.0, cond, guidance=7.0)[0])
    got = model.generate(PROMPT, seed=2, steps=4, guidance_scale=0.0)
    expected = _pipeline_latent(schnell, model, num_inference_steps=4, guidance_scale=0.0,
                                generator=torch.Generator().manual_seed(2))
    assert _rel(got, expected) <= LATENT_RTOL


def test_the_sessions_schedule_is_the_pipelines(models, pipe):
    """FluxPipeline passes set_timesteps np.linspace(1, 1/n, n) and mu; the session carries both
    (timestep_kwargs), so both sides build the pipeline's schedule, and the one-process run equals it.
    Without the sigmas, set_timesteps(n, mu=mu) would space them over [1, 1/1000]: a far smaller last one."""
    model, n = models["cloud"], 4
    spec = SessionSpec.for_model(model, PROMPT, plan="cloud-only", steps=n, guidance_scale=3.5, seed=7)
    mu = spec.timestep_kwargs["mu"]
    assert spec.timestep_kwargs == model.timestep_kwargs(n) and spec.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert spec.timestep_kwargs["sigmas"] == pytest.approx(np.linspace(1.0, 1 / n, n).tolist())
    shifted = lambda s: math.exp(mu) / (math.exp(mu) + 1 / s - 1)  # noqa: E731  time_shift, exponential
    ours = spec.make_scheduler().sigmas
    theirs = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert torch.equal(ours, theirs.sigmas) and ours[-2].item() == pytest.approx(shifted(1 / n), rel=1e-5)
    mu_only = dataclasses.replace(spec, timestep_kwargs={"mu": mu}).make_scheduler().sigmas
    assert mu_only[-2].item() == pytest.approx(shifted(1 / 1000), rel=1e-5)  # what mu alone would give: 0.00158
    latent, _ = run_plan(spec, {"cloud": model})
    expected = _pipeline_latent(pipe, model, num_inference_steps=n, guidance_scale=3.5,
                                generator=torch.Generator().manual_seed(7))
    assert _rel(latent, expected) <= LATENT_RTOL


def test_batched_sessions_on_the_engine_end_as_they_would_alone(models):
    model = models["cloud"]
    specs = [SessionSpec.for_model(model, p, plan="cloud-only", steps=3, guidance_scale=g, seed=s)
             for p, g, s in (("a red circle", 3.5, 1), ("a blue square", 5.0, 2))]

    def serve(max_batch):
        engine, events = CloudEngine(model, max_batch=max_batch), [[] for _ in specs]
        for spec, out in zip(specs, events):
            engine.submit(wire.Run(session=spec, segments=(0, 1)), emit=out.append)
        while engine.turn():
            pass
        return engine, [e[-1] for e in events]

    engine, batched = serve(2)
    _, alone = serve(1)
    assert max(engine.batch_sizes) == 2  # both stepped in one forward: prompts, guidance and t stacked
    for b, a in zip(batched, alone):
        assert isinstance(b, wire.Handoff) and _rel(b.latent, a.latent) <= LATENT_RTOL


def test_the_handoff_of_a_1024px_latent_costs_one_byte_a_value_plus_its_header(paths):
    """FLUX.1's latent at its 1024 x 1024 default: (1, 16, 128, 128), N = 262,144 values. int8 is one byte a
    value before zstd (exactly N at level 0); the header holds a (lo, step) float32 pair per channel of dim 1:
    16 of them here, where the packed (1, 4096, 64) layout would need 4,096."""
    model = FluxModel.from_pretrained(paths["edge"], height=1024, width=1024)
    assert model.latent_shape == (16, 128, 128) and model.image_seq_len == 4096
    x = model.initial_noise(0, generator_device="cpu")
    n, channels = x.numel(), x.shape[1]
    sizes = {}
    for codec in (("int8", 3), ("int8", 0), ("fp32", 0)):  # the default latent codec first
        frames = wire.Handoff(x, 14, 500.0, 7, model_calls=14, worker=1).to_frames(wire.Codecs(latent=codec))
        h = wire.parse_reply([bytes(f) for f in frames])
        assert h.latent.shape == x.shape and h.latent.dtype == torch.float32
        sizes[codec] = (len(bytes(frames[0])), len(bytes(frames[1])))
        if codec[0] == "int8":  # within half a quantization step of its channel, plus lo + q step's rounding
            hi, lo = x.amax(dim=(0, 2, 3)), x.amin(dim=(0, 2, 3))
            bound = (hi - lo) / 255 / 2 + 2 * torch.finfo(torch.float32).eps * torch.maximum(hi.abs(), lo.abs())
            assert ((h.latent - x).abs().amax(dim=(0, 2, 3)) <= bound).all()
    (head8, zstd8), (head0, raw8), (head32, raw32) = sizes[("int8", 3)], sizes[("int8", 0)], sizes[("fp32", 0)]
    assert (raw8, raw32) == (n, 4 * n) == (262_144, 1_048_576)
    assert head8 == head0 == head32 + 2 * 4 * channels + 4  # + q: 'q' (2 B), bin 8 (2 B), 16 lo + 16 step floats
    assert head0 == 356 and zstd8 <= n  # 262,500 B at level 0 (the load map is 44); x_1 is noise: zstd takes ~10 % off
    assert wire_bytes(frames) == head32 + raw32
    packed = wire.Handoff(pack(x), 14, 500.0, 7, model_calls=14, worker=1).to_frames(wire.Codecs(latent=("int8", 0)))
    # a (lo, step) pair per token: 32 KiB more (bin 16's header is a byte longer, the shape's msgpack one shorter)
    assert len(bytes(packed[0])) == head0 + 2 * 4 * (4096 - channels) == 32_996
    # and the edge's request up carries the same latent at the same cost
    spec = SessionSpec.for_model(model, PROMPT, plan="hybrid-sd", steps=28, plan_params={"k": 14}, guidance_scale=3.5)
    run = wire.Run(session=spec, segments=(1, 2), latent=x, latent_space=wire.plain(model.latent_space),
                   text_space=wire.plain(model.text_space))
    frames = run.to_frames()
    back = wire.parse_request([bytes(f) for f in frames])
    assert back.latent.shape == x.shape and len(bytes(frames[1])) == zstd8


# -- two processes: a real `latentwire cloud` -----------------------------------------------------------

def test_cloud_only_over_the_network_equals_the_flux_pipeline(cloud, models, pipe):
    """The folder's own scheduler, as SessionSpec.for_model builds the session (mu and the pipeline's sigmas
    on the wire), against the pipeline's default call."""
    model, n = models["edge"], 5
    spec = SessionSpec.for_model(model, PROMPT, plan="cloud-only", steps=n, guidance_scale=3.5, seed=11)
    latent, summary = EdgeClient(cloud, model, codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    expected = _pipeline_latent(pipe, model, num_inference_steps=n, guidance_scale=3.5,
                                generator=torch.Generator().manual_seed(11))
    assert _rel(latent, expected) <= LATENT_RTOL
    assert (summary.cloud_model_calls, summary.edge_model_calls) == (n, 0)


@pytest.mark.parametrize("plan, params", [("hybrid-sd", {"k": 3}), ("ec-diff", {"p": 2, "k": 1, "s": 5})])
def test_a_split_over_the_network_equals_one_process_bit_for_bit(cloud, models, plan, params):
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan=plan, steps=7, plan_params=params, guidance_scale=3.5,
                                 seed=4)
    expected, expected_summary = run_plan(spec, models)
    latent, summary = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    assert torch.equal(latent, expected)
    assert (summary.cloud_model_calls, summary.edge_model_calls, summary.forecast_steps) == (
        expected_summary.cloud_model_calls, expected_summary.edge_model_calls, expected_summary.forecast_steps)
    assert summary.cloud_model_calls > 0 and summary.edge_model_calls > 0


def test_an_sd_edge_is_refused_by_the_flux_cloud_naming_the_latent_space(cloud, paths, models):
    sd_edge = StableDiffusionModel.from_pretrained(paths["sd-edge"])
    spec = SessionSpec.for_model(sd_edge, PROMPT, plan="hybrid-sd", steps=4, plan_params={"k": 2})
    with pytest.raises(CloudError, match=r"field 'latent_space'.*latent space"):
        EdgeClient(cloud, sd_edge, timeout_s=WAIT_S).generate(spec)
    # a Flux edge at another image size shares both spaces but not the latent's shape: a clear error too
    big = FluxModel.from_pretrained(paths["edge"], height=2 * IMAGE_SIZE, width=2 * IMAGE_SIZE)
    spec = SessionSpec.for_model(big, PROMPT, plan="hybrid-sd", steps=2, plan_params={"k": 1})
    with pytest.raises(CloudError, match="latent has shape"):
        EdgeClient(cloud, big, timeout_s=WAIT_S).generate(spec)
    # and the cloud serves on
    latent, _ = EdgeClient(cloud, models["edge"], timeout_s=WAIT_S).generate(
        SessionSpec.for_model(models["edge"], PROMPT, plan="cloud-only", steps=3))
    assert latent.shape == (1, *models["edge"].latent_shape)


def test_the_edge_command_against_the_flux_cloud_writes_an_image(cloud, paths, tmp_path):
    out = tmp_path / "flux.png"
    run = run_cli("edge", "--connect", cloud, "--model", paths["edge"], "--prompt", PROMPT, "--plan", "hybrid-sd",
                  "--k", "2", "--steps", "4", "--seed", "3", "--guidance", "3.5", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert (summary["plan"], summary["cloud_model_calls"], summary["edge_model_calls"]) == ("hybrid-sd", 2, 2)
    assert Image.open(out).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_sessions_with_other_schedules_never_share_a_sampler(models):
    """Another mu (another image size) is another schedule: the engine keys its samplers and batches by it."""
    model = models["cloud"]
    a = SessionSpec.for_model(model, PROMPT, plan="cloud-only", steps=4, guidance_scale=3.5, seed=1)
    b = dataclasses.replace(a, timestep_kwargs={**a.timestep_kwargs, "mu": 1.15})
    engine, out = CloudEngine(model, max_batch=2), {"a": [], "b": []}
    engine.submit(wire.Run(session=b, segments=(0, 1)), emit=out["b"].append)
    engine.submit(wire.Run(session=a, segments=(0, 1)), emit=out["a"].append)
    while engine.turn():
        pass
    for name, spec in (("a", a), ("b", b)):
        assert torch.equal(out[name][-1].latent, run_plan(spec, {"cloud": model})[0])


def test_preview_refine_renoises_a_flow_matching_preview(models):
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan="preview-refine", steps=4, guidance_scale=3.5, seed=3)
    latent, summary = run_plan(spec, models)
    assert torch.isfinite(latent).all() and (summary.edge_model_calls, summary.cloud_model_calls) == (4, 2)
