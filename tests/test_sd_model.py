"""StableDiffusionModel against diffusers' StableDiffusionPipeline on the tiny random pair of pipelines/models/tiny.py:
the same text embeddings, initial noise, final latents and images."""
import copy
import os

import pytest
import torch

from latentwire.pipelines.models.sd import StableDiffusionModel, scale_model_input
from latentwire.pipelines.models.tiny import MAX_LENGTH, WORDS, save_tiny_pair, save_tiny_pipeline

diffusers = pytest.importorskip("diffusers")

# Final latents: FusedSampler folds guidance and the update into one pass, so its float32 rounding differs
# from scheduler.step's at each step; 1e-5 is ~84 ulps (2^-23 each) of the largest entry, room for a few
# ulps a step over <= 7 steps (measured: <= 7e-7).
LATENT_RTOL = 1e-5
PROMPT, NEGATIVE = "a red circle on a blue square", "dark photo"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_tiny_pair(str(tmp_path_factory.mktemp("tiny")), seed=0)


@pytest.fixture(scope="module")
def cloud(paths):
    return StableDiffusionModel.from_pretrained(paths[0])


@pytest.fixture(scope="module")
def edge(paths):
    return StableDiffusionModel.from_pretrained(paths[1])


@pytest.fixture(scope="module")
def pipe(paths):
    diffusers.utils.logging.set_verbosity_error()
    p = diffusers.StableDiffusionPipeline.from_pretrained(paths[0])
    p.set_progress_bar_config(disable=True)
    return p


def rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def test_tiny_weights_follow_the_seed_alone(paths, tmp_path):
    unet = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    rng = torch.get_rng_state()
    again, other = (save_tiny_pipeline(str(tmp_path / str(s)), seed=s) for s in (0, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generator is left as it was
    read = lambda folder: open(os.path.join(folder, unet), "rb").read()  # noqa: E731
    assert read(again) == read(paths[0]) != read(other)


def test_every_word_is_one_token(cloud):
    ids = [cloud.tokenizer(w).input_ids for w in WORDS]
    assert all(len(i) == 3 for i in ids), [w for w, i in zip(WORDS, ids) if len(i) != 3]


# prompts of 0 words, 3, and MAX_LENGTH - 2 words (BOS + words + EOS fill L exactly), and one word past it
@pytest.mark.parametrize("n_words", [0, 3, MAX_LENGTH - 2, MAX_LENGTH - 1])
def test_encode_prompt_matches_pipeline(cloud, pipe, n_words):
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(7, 7 + n_words))
    ref_cond, ref_uncond = pipe.encode_prompt(prompt, "cpu", 1, True, NEGATIVE)
    cond, uncond = cloud.encode_prompt(prompt, NEGATIVE)
    assert cond.shape == (1, MAX_LENGTH, cloud.text_space.hidden_size)
    assert torch.equal(cond, ref_cond) and torch.equal(uncond, ref_uncond)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("batch", [1, 2])
def test_initial_noise_matches_prepare_latents(cloud, pipe, name, batch):
    sched = cloud.make_scheduler(name)
    sched.set_timesteps(7)
    pipe.scheduler = copy.deepcopy(sched)
    ref = pipe.prepare_latents(batch, 4, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(11))
    assert torch.equal(cloud.initial_noise(11, batch, scheduler=sched), ref)


@pytest.mark.parametrize("name, steps, kw", [
    ("DDIMScheduler", 7, {}),
    ("DDIMScheduler", 1, {}),                        # shortest schedule
    ("DDIMScheduler", 5, {"eta": 0.5}),              # per-step noise from the generator
    ("DPMSolverMultistepScheduler", 7, {}),
    ("EulerDiscreteScheduler", 7, {}),               # init_noise_sigma != 1 and scale_model_input
    ("EulerAncestralDiscreteScheduler", 5, {}),
    ("DDIMScheduler", 5, {"guidance_scale": 1.0}),   # the pipeline skips the unconditional branch
    ("DPMSolverMultistepScheduler", 5, {"num_images_per_prompt": 2}),
])
def test_generate_matches_pipeline(cloud, pipe, name, steps, kw):
    kw = {"guidance_scale": 6.0, **kw}
    pipe.scheduler = cloud.make_scheduler(name)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
               output_type="latent", **kw).images
    out = cloud.generate(PROMPT, NEGATIVE, seed=3, steps=steps, scheduler=name, eta=kw.get("eta", 0.0),
                         guidance_scale=kw["guidance_scale"], batch=kw.get("num_images_per_prompt", 1))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < LATENT_RTOL


def test_euler_scales_the_input(cloud):
    """The Euler case above tests c_in only if c_in changes the prediction: it does, by far."""
    sched = cloud.make_scheduler("EulerDiscreteScheduler")
    sched.set_timesteps(7)
    t = sched.timesteps[2]
    x = torch.randn(1, *cloud.latent_shape, generator=torch.Generator().manual_seed(0)) * 5
    cond, uncond = cloud.encode_prompt(PROMPT)
    scaled, _ = cloud.predict(x, t, cond, uncond, scheduler=sched)
    unscaled, _ = cloud.predict(x, t, cond, uncond, scheduler=cloud.make_scheduler("DDIMScheduler"))
    assert rel_err(scaled, unscaled) > 1e-2
    assert sched.step_index is None  # scale_model_input ran on a copy


def test_eps_per_row_timesteps(cloud):
    """A (B,) t scales and embeds each row at its own step, as B separate calls do."""
    sched = cloud.make_scheduler("EulerDiscreteScheduler")
    sched.set_timesteps(9)
    t = sched.timesteps[[0, 4, 0]]
    x = torch.randn(3, *cloud.latent_shape, generator=torch.Generator().manual_seed(1)) * 3
    cond, uncond = cloud.encode_prompt(PROMPT, NEGATIVE)
    eps_c, eps_u = cloud.predict(x, t, cond, uncond, scheduler=sched)
    for r in range(3):
        ref_c, ref_u = cloud.predict(x[r:r + 1], t[r], cond, uncond, scheduler=sched)
        assert rel_err(eps_c[r:r + 1], ref_c) < 1e-5 and rel_err(eps_u[r:r + 1], ref_u) < 1e-5


def test_stepped_scheduler_and_foreign_timestep_are_refused(cloud):
    sched = cloud.make_scheduler("EulerDiscreteScheduler")
    sched.set_timesteps(4)
    x = torch.zeros(1, *cloud.latent_shape)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="has been stepped"):
        scale_model_input(sched, x, sched.timesteps[1])
    with pytest.raises(ValueError, match="is not in EulerDiscreteScheduler.timesteps"):
        scale_model_input(cloud.make_scheduler("EulerDiscreteScheduler"), x, 0.5)


def test_edge_shares_spaces_with_a_smaller_unet(cloud, edge):
    assert edge.text_space == cloud.text_space and edge.latent_space == cloud.latent_space
    assert edge.latent_shape == cloud.latent_shape
    for a, b in zip(cloud.encode_prompt(PROMPT, NEGATIVE), edge.encode_prompt(PROMPT, NEGATIVE)):
        assert torch.equal(a, b)
    vae_c, vae_e = cloud.vae.state_dict(), edge.vae.state_dict()
    assert vae_c.keys() == vae_e.keys() and all(torch.equal(vae_c[k], vae_e[k]) for k in vae_c)
    n_cloud = sum(p.numel() for p in cloud.unet.parameters())
    n_edge = sum(p.numel() for p in edge.unet.parameters())
    assert n_edge < n_cloud / 2, f"edge UNet {n_edge} vs cloud {n_cloud} parameters ({n_edge / n_cloud:.2f}x)"


def test_decode_matches_pipeline(cloud, pipe):
    pipe.scheduler = cloud.make_scheduler()
    ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
               output_type="np").images
    latent = cloud.generate(PROMPT, seed=5, steps=3, guidance_scale=4.0)
    image = cloud.decode(latent, output_type="np")
    assert image.shape == ref.shape == (1, 64, 64, 3)
    assert abs(image - ref).max() < 1e-5  # pixels in [0, 1]; the latents agree to ~1e-6
    pil = cloud.decode(latent)
    assert len(pil) == 1 and pil[0].size == (64, 64)


def test_bad_inputs(cloud, tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        StableDiffusionModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        cloud.make_scheduler("NoSuchScheduler")
    with pytest.raises(ValueError, match="x must be"):
        cloud.predict(torch.zeros(1, 3, 8, 8), 1, *cloud.encode_prompt(PROMPT))
    with pytest.raises(ValueError, match="text embeddings must be"):
        cloud.predict(torch.zeros(2, 4, 8, 8), 1, torch.zeros(3, MAX_LENGTH, 32), torch.zeros(1, MAX_LENGTH, 32))


def test_a_tiny_folder_at_a_real_latent_size_has_the_same_weights(tmp_path):
    # bench/cost_check.py --models tiny-sd: SD v1.5's 4x64x64 latent at the tiny widths; the size is config
    # only, so the weights are those of the default folder
    from latentwire.pipelines.models.tiny_sdxl import save_tiny_sdxl

    small = StableDiffusionModel.from_pretrained(save_tiny_pipeline(str(tmp_path / "s"), edge=True))
    big = StableDiffusionModel.from_pretrained(save_tiny_pipeline(str(tmp_path / "b"), edge=True, image_size=128))
    assert small.latent_shape == (4, 8, 8) and big.latent_shape == (4, 16, 16)
    for a, b in zip(small.unet.state_dict().values(), big.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert big.initial_noise(0).shape == (1, 4, 16, 16)
    from latentwire.pipelines.models import load_model

    xl = load_model(save_tiny_sdxl(str(tmp_path / "xl"), image_size=128))
    assert xl.latent_shape == (4, 16, 16)
    for bad in (100, 8, "64", 64.0):
        with pytest.raises(ValueError, match="image_size"):
            save_tiny_pipeline(str(tmp_path / "bad"), image_size=bad)
