"""The SD-upscaler family (StableDiffusionUpscaleModel) against diffusers' StableDiffusionUpscalePipeline on
tiny random folders of the x4 upscaler's structure, one per VAE depth (x4: 3 levels, x2: 2 levels): the
folder loads by its model_index.json; upscale() ends on the pipeline's latents and decodes to its images;
a SegmentRun driven with condition()'s tuples ends on upscale()'s latent; engine-stacked rows predict as
single rows; and each malformed input names itself.

Shapes here: low-res image (1, 3, 8, 8) -> latent (1, 4, 8, 8), UNet input (1, 4 + 3, 8, 8) -> decoded
image (1, 3, 8f, 8f), f = 4 or 2. Text: (1, 16, 32) embeddings over embedded.py's world words.
"""
import json
import os
import shutil

import pytest
import torch

from latentwire.kernels import FusedSampler
from latentwire.pipelines import embedded
from latentwire.pipelines.models import load_model
from latentwire.pipelines.models.sd import LatentSpace as SDLatentSpace
from latentwire.pipelines.models.sd_upscale import StableDiffusionUpscaleModel
from latentwire.scheduler.engine import _stack
from latentwire.scheduler.segments import SegmentRun, drive
from latentwire.scheduler.session import SessionSpec

diffusers = pytest.importorskip("diffusers")

torch.set_num_threads(1)
PROMPT, NEGATIVE = "a red circle at the top", "blue"
LOW_RES = 8                 # the low-res image's side = the latent's = the UNet's sample_size
TEXT_HIDDEN = 32
NOISE_LEVELS = {4: 350, 2: 300}  # max_noise_level per scale factor (350: the pipeline's default; 300: read back)
# FusedSampler folds guidance and the update into one float32 pass, so its rounding differs from the
# pipeline's `u + g (c - u)` then scheduler.step by a few ulps (2^-23) a step: 1e-5 of the largest entry is
# room for ~80 ulps over <= 5 steps (as test_sd_model.py)
LATENT_RTOL = 1e-5


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoder(vocab):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=embedded.MAX_LENGTH, projection_dim=TEXT_HIDDEN,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))


def _unet(in_channels, classes):
    """The x4 upscaler's UNet in miniature: latent + image channels in, the noise level as a class label
    (class_embed_type None: an nn.Embedding of max_noise_level + 1 rows, as its config's num_class_embeds)."""
    return diffusers.UNet2DConditionModel(
        sample_size=LOW_RES, in_channels=in_channels, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,
        norm_num_groups=8, num_class_embeds=classes)


def _vae(levels):
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=8, sample_size=LOW_RES * 2 ** (levels - 1), scaling_factor=0.08333)


def _scheduler():
    """The x4 upscaler's kind of schedule: v-prediction DDIM over scaled-linear betas."""
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                   beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1)


def save_tiny_upscaler(path, scale, *, seed=0):
    """A StableDiffusionUpscalePipeline folder at ``path`` with a VAE of log2(scale) + 1 levels."""
    levels = scale.bit_length()  # 4 -> 3 levels, 2 -> 2
    max_level = NOISE_LEVELS[scale]
    tokenizer = embedded.build_tokenizer(os.path.join(path, "tokenizer"))
    vocab = tokenizer.get_vocab()
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=_seeded(seed, lambda: _vae(levels)), text_encoder=_seeded(seed, lambda: _text_encoder(vocab)),
        tokenizer=tokenizer, unet=_seeded(seed, lambda: _unet(7, max_level + 1)),
        low_res_scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"),
        scheduler=_scheduler(), max_noise_level=max_level)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    diffusers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("upscale")
    return {s: save_tiny_upscaler(str(root / f"x{s}"), s) for s in (4, 2)}


@pytest.fixture(scope="module")
def models(folders):
    return {s: load_model(p) for s, p in folders.items()}


@pytest.fixture(scope="module")
def pipes(folders):
    out = {}
    for s, p in folders.items():
        out[s] = diffusers.StableDiffusionUpscalePipeline.from_pretrained(p, local_files_only=True)
        out[s].set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="module")
def image01():
    """The low-res image in [0, 1], as a user hands it to the pipeline."""
    return torch.rand(1, 3, LOW_RES, LOW_RES, generator=torch.Generator().manual_seed(42))


def rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def _pipe_call(pipe, image01, model, name, steps, guidance, seed, output_type, noise_level=20):
    pipe.scheduler = model.make_scheduler(name)
    return pipe(PROMPT, image=image01, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                noise_level=noise_level, generator=torch.Generator().manual_seed(seed), output_type=output_type).images


# -- the folder -----------------------------------------------------------------------------------------

def test_the_folder_loads_as_its_family(folders, models, pipes, image01):
    for scale, model in models.items():
        assert type(model) is StableDiffusionUpscaleModel and model.family == "sd-upscale"
        assert model.scale_factor == scale and model.latent_shape == (4, LOW_RES, LOW_RES)
        assert model.max_noise_level == NOISE_LEVELS[scale] == pipes[scale].config.max_noise_level
        assert model.noise_level == 20 and model.image_channels == 3
        assert model.latent_space == (4, scale, 0.08333, 3, NOISE_LEVELS[scale])
        assert type(model.low_res_scheduler).__name__ == "DDPMScheduler"
        assert model.low_res_scheduler is not pipes[scale].low_res_scheduler
        # the pipeline's own preprocessing of a [0, 1] image is condition()'s input, exactly
        assert torch.equal(model.image_processor.preprocess(image01), 2 * image01 - 1)
    # a text-to-image latent space of the same values is not an upscaler's: no handoff between the two
    assert models[4].latent_space != SDLatentSpace(4, 4, 0.08333)


def test_encode_prompt_is_the_pipelines(models, pipes):
    ref_cond, ref_uncond = pipes[4].encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    cond, uncond = models[4].encode_prompt(PROMPT, NEGATIVE)
    assert cond.shape == (1, embedded.MAX_LENGTH, TEXT_HIDDEN)
    assert torch.equal(cond, ref_cond) and torch.equal(uncond, ref_uncond)


# -- upscale() against the pipeline ---------------------------------------------------------------------

@pytest.mark.parametrize("scale", [4, 2])
def test_the_first_unet_call_is_the_pipelines_bit_for_bit(models, pipes, image01, scale):
    """condition() + initial_noise() + predict() give the pipeline's first UNet call exactly: its input (x_T
    after the image noise, the noised image), text embeddings, class labels and output. Only the fused
    step's rounding (LATENT_RTOL) separates the two loops."""
    model, calls = models[scale], []

    def record(module, args, kwargs, out):
        calls.append((args[0], kwargs["encoder_hidden_states"], kwargs["class_labels"], out[0]))

    handle = pipes[scale].unet.register_forward_hook(record, with_kwargs=True)
    try:
        _pipe_call(pipes[scale], image01, model, None, 2, 3.0, 7, "latent", noise_level=60)
    finally:
        handle.remove()
    sched = model.make_scheduler()
    sched.set_timesteps(2)
    cond, uncond = model.condition(model.encode_prompt(PROMPT, NEGATIVE), 2 * image01 - 1, 7, noise_level=60)
    x = model.initial_noise(7, scheduler=sched, generator_device="cpu")
    sample, embeds, labels, out = calls[0]
    assert torch.equal(sample, torch.cat([torch.cat([x, x]), torch.cat([cond[1], uncond[1]])], dim=1))
    assert torch.equal(embeds, torch.cat([uncond[0], cond[0]])) and labels.tolist() == [60, 60]
    pred_c, pred_u = model.predict(x, sched.timesteps[0], cond, uncond, scheduler=sched)
    assert torch.equal(torch.cat([pred_u, pred_c]), out)


@pytest.mark.parametrize("scale, name, steps, guidance", [
    (4, "DDIMScheduler", 4, 3.0),
    (4, "DDIMScheduler", 4, 1.0),                     # the pipeline skips the unconditional branch
    (2, "DDIMScheduler", 4, 3.0),
    (2, "DDIMScheduler", 3, 1.0),
    (4, "EulerDiscreteScheduler", 4, 3.0),            # init_noise_sigma != 1 and scale_model_input
    (2, "DPMSolverMultistepScheduler", 4, 3.0),       # multistep state
    (4, "EulerAncestralDiscreteScheduler", 3, 3.0),   # per-step noise drawn after x_T from the one generator
])
def test_upscale_equals_the_pipeline(models, pipes, image01, scale, name, steps, guidance):
    model = models[scale]
    ref = _pipe_call(pipes[scale], image01, model, name, steps, guidance, 3, "latent")
    out = model.upscale(2 * image01 - 1, PROMPT, NEGATIVE, seed=3, steps=steps, guidance_scale=guidance,
                        noise_level=20, scheduler=name)
    assert out.shape == ref.shape == (1, 4, LOW_RES, LOW_RES)
    assert rel_err(out, ref) < LATENT_RTOL


@pytest.mark.parametrize("scale", [4, 2])
def test_decode_equals_the_pipelines_images(models, pipes, image01, scale):
    model = models[scale]
    latent = model.upscale(2 * image01 - 1, PROMPT, NEGATIVE, seed=5, steps=3, guidance_scale=3.0,
                           noise_level=40)
    side = LOW_RES * scale
    for output_type in ("np", "pt"):
        ref = _pipe_call(pipes[scale], image01, model, None, 3, 3.0, 5, output_type, noise_level=40)
        image = model.decode(latent, output_type=output_type)
        assert tuple(image.shape) == tuple(ref.shape)
        assert abs(image - ref).max() < 1e-5  # pixels in [0, 1]; the latents agree to ~1e-6
    assert tuple(image.shape) == (1, 3, side, side)
    pil = model.decode(latent)
    assert len(pil) == 1 and pil[0].size == (side, side)


def test_the_noise_level_matters(models, image01):
    """The tests above check the noised image only if the noise level changes the result: it does."""
    a, b = (models[4].upscale(2 * image01 - 1, PROMPT, seed=1, steps=2, guidance_scale=1.0, noise_level=n)
            for n in (0, 300))
    assert rel_err(a, b) > 1e-3


# -- the runners' loop ----------------------------------------------------------------------------------

def test_a_segment_run_of_condition_tuples_equals_upscale(models, image01):
    model, image = models[4], 2 * image01 - 1
    spec = SessionSpec.for_model(model, PROMPT, plan="cloud-only", steps=4, negative_prompt=NEGATIVE,
                                 guidance_scale=3.0, seed=9)
    sampler = FusedSampler(spec.make_scheduler())
    conditioning = model.condition(model.encode_prompt(PROMPT, NEGATIVE), image, spec.seed, noise_level=20)
    assert all(type(c) is tuple and len(c) == 3 for c in conditioning)
    x = model.initial_noise(spec.seed, scheduler=sampler.scheduler, generator_device="cpu")  # as executor.py
    run = drive(SegmentRun(spec, spec.plan.segments, sampler, conditioning, x), model)
    ref = model.upscale(image, PROMPT, NEGATIVE, seed=9, steps=4, guidance_scale=3.0, noise_level=20)
    assert run.calls == 4 and run.forecasts == 0
    assert torch.equal(run.x, ref)


def test_stacked_rows_predict_as_single_rows(models, image01):
    """Two sessions (other prompts, images, noise levels, latents and steps) stacked as the cloud engine
    stacks them (_stack of each branch's tuples, a (B,) t) predict as each alone."""
    model = models[4]
    sched = model.make_scheduler("EulerDiscreteScheduler")  # c_in depends on t: per-row scaling is tested
    sched.set_timesteps(6)
    images = (2 * image01 - 1, 1 - 2 * image01)
    rows = [model.condition(model.encode_prompt(p, n), im, seed=s, noise_level=lv)
            for p, n, im, s, lv in ((PROMPT, "", images[0], 1, 20), ("a blue square", NEGATIVE, images[1], 2, 200))]
    cond, uncond = _stack([r[0] for r in rows]), _stack([r[1] for r in rows])
    assert type(cond) is tuple and cond[0].shape[0] == cond[1].shape[0] == cond[2].shape[0] == 2
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0)) * 3
    t = sched.timesteps[[1, 4]]
    pc, pu = model.predict(x, t, cond, uncond, scheduler=sched)
    for r in range(2):
        rc, ru = model.predict(x[r:r + 1], t[r], *rows[r], scheduler=sched)
        assert rel_err(pc[r:r + 1], rc) < 1e-5 and rel_err(pu[r:r + 1], ru) < 1e-5
    # a row of 1 serves every row of x, as the pipeline repeats one image for num_images_per_prompt
    one, _ = model.predict(x, t[0], rows[0][0], scheduler=sched)
    assert rel_err(one[1:], model.predict(x[1:], t[0], rows[0][0], scheduler=sched)[0]) < 1e-5


# -- what is refused ------------------------------------------------------------------------------------

def test_a_folder_without_its_low_res_scheduler(folders, tmp_path):
    folder = shutil.copytree(folders[2], tmp_path / "no-low-res")
    shutil.rmtree(folder / "low_res_scheduler")
    with pytest.raises(FileNotFoundError, match="lacks low_res_scheduler"):
        load_model(str(folder))


def test_a_unet_that_does_not_read_the_image(folders, tmp_path):
    folder = shutil.copytree(folders[2], tmp_path / "t2i-unet")
    shutil.rmtree(folder / "unet")
    _unet(4, NOISE_LEVELS[2] + 1).save_pretrained(str(folder / "unet"))
    with pytest.raises(ValueError, match=r"takes 4 input channels.*4 latent channels \+ the 3 of the low-res image"):
        load_model(str(folder))


def test_noise_levels_out_of_range(models, image01):
    model, image = models[2], 2 * image01 - 1
    text = model.encode_prompt(PROMPT)
    for bad in (-1, NOISE_LEVELS[2] + 1):
        with pytest.raises(ValueError, match=r"noise_level must be in \[0, 300\]"):
            model.condition(text, image, 0, noise_level=bad)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 300\]"):
        model.upscale(image, PROMPT, seed=0, steps=1, guidance_scale=1.0, noise_level=301)
    with pytest.raises(TypeError, match="noise_level must be an int"):
        model.condition(text, image, 0, noise_level=20.0)
    model.condition(text, image, 0, noise_level=NOISE_LEVELS[2])  # the top level is allowed


def test_max_noise_level_past_the_unets_class_embedding(folders, tmp_path):
    """The pipeline loads such a folder (diffusers' own dummy upscaler is one) and fails only at such a
    level, with an IndexError; condition() names the limit instead."""
    folder = shutil.copytree(folders[2], tmp_path / "levels")
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "max_noise_level": 999}))
    model = load_model(str(folder))
    with pytest.raises(ValueError, match=r"past the UNet's num_class_embeds - 1 \(300\)"):
        model.condition(model.encode_prompt(PROMPT), torch.zeros(1, 3, 8, 8), 0, noise_level=500)


@pytest.mark.parametrize("image, match", [
    (torch.zeros(1, 3, 7, 8), "multiples of 4"),
    (torch.zeros(1, 1, 8, 8), r"must be \(1, 3, h, w\)"),
    (torch.zeros(2, 3, 8, 8), r"must be \(1, 3, h, w\)"),
    (torch.zeros(3, 8, 8), r"must be \(1, 3, h, w\)"),
    (torch.full((1, 3, 8, 8), 2.0), r"lie in \[-1, 1\]"),
])
def test_images_of_the_wrong_shape_or_range(models, image, match):
    with pytest.raises(ValueError, match=match):
        models[4].condition(models[4].encode_prompt(PROMPT), image, 0)


def test_text_to_image_conditioning_is_refused_by_name(models):
    model = models[4]
    x = torch.zeros(1, *model.latent_shape)
    with pytest.raises(TypeError, match=r"condition\(\) makes, got Tensor"):
        model.predict(x, 1, *model.encode_prompt(PROMPT))
    with pytest.raises(TypeError, match="upscale"):
        model.generate(PROMPT, seed=0, steps=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match="latent's size"):
        cond, _ = model.condition(model.encode_prompt(PROMPT), torch.zeros(1, 3, 4, 4), 0)
        model.predict(x, 1, cond)
