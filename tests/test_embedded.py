"""The committed world models (pipelines/embedded.py, assets/world-sd-cloud and -edge), the exact denoiser of
their training set (pipelines/ideal.py) and the training scripts' resume (pipelines/train_models.py)."""
import inspect
import io

import pytest
import torch

from latentwire.pipelines import embedded, judge, train_models, world
from latentwire.pipelines.ideal import IdealDenoiser
from latentwire.pipelines.models.sd import StableDiffusionModel

diffusers = pytest.importorskip("diffusers")

MAX_BYTES = 40 * 2 ** 20       # the limit on the committed weights
MIN_EDGE_SAVING = 3            # the edge UNet: at least 3x fewer multiply-adds per step
VAE_MIN_ACCURACY = 0.97        # share of reconstructions whose three attributes the judge reads right
IDEAL_MIN_ACCURACY = 0.95      # attribute accuracy of the exact denoiser's DDIM samples
HELD_OUT_SEED = 1              # world seed used by no training: the judge's test renders


@pytest.fixture(scope="module")
def cloud():
    return StableDiffusionModel.from_pretrained(embedded.CLOUD_PATH)


@pytest.fixture(scope="module")
def edge():
    return StableDiffusionModel.from_pretrained(embedded.EDGE_PATH)


@pytest.fixture(scope="module")
def ideal(cloud):
    # 16 latents a scene (not the default 128) keeps the fixture's VAE encoding to ~1 s
    images, ids = embedded.scene_pool(16, embedded.POOL_SEED)
    return IdealDenoiser(embedded.encode_images(cloud.vae, images), ids, cloud)


def test_the_exact_denoiser_is_exact_for_the_unets_training_set_by_default():
    defaults = inspect.signature(IdealDenoiser.from_pretrained).parameters
    assert (defaults["per_scene"].default, defaults["seed"].default) == (embedded.POOL_PER_SCENE, embedded.POOL_SEED)
    assert train_models.UNetConfig().per_scene == embedded.POOL_PER_SCENE
    assert train_models.POOL_SEED == embedded.POOL_SEED


def test_committed_weights_fit_the_budget():
    files = [p for root in (embedded.CLOUD_PATH, embedded.EDGE_PATH) for p in root.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"{total / 2 ** 20:.1f} MB of model files"


@pytest.mark.parametrize("path", [embedded.CLOUD_PATH, embedded.EDGE_PATH], ids=["cloud", "edge"])
def test_diffusers_pipeline_loads_and_generates(path):
    diffusers.utils.logging.set_verbosity_error()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)  # as it is: no dtype, no options
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("a red circle at the top left", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_float16_weights_load_as_float32(cloud, edge):
    for model in (cloud, edge):
        for module in (model.text_encoder, model.unet, model.vae):
            assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_cloud_and_edge_share_everything_but_the_unet(cloud, edge):
    assert cloud.latent_space == edge.latent_space and cloud.text_space == edge.text_space
    assert cloud.latent_shape == edge.latent_shape == (embedded.LATENT_CHANNELS, embedded.LATENT_SIZE,
                                                        embedded.LATENT_SIZE)
    assert cloud.scheduler_config == edge.scheduler_config
    for name in ("text_encoder", "vae"):
        a, b = getattr(cloud, name).state_dict(), getattr(edge, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert cloud.tokenizer.get_vocab() == edge.tokenizer.get_vocab()


def _macs(unet):
    """Multiply-adds of one batch-1 UNet evaluation in its convolutions and linear layers (attention's
    two matmuls over <= 64 x 16 positions are left out: under 1% here)."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += out.numel() * k
        else:
            total += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        x = torch.zeros(1, unet.config.in_channels, embedded.LATENT_SIZE, embedded.LATENT_SIZE)
        with torch.no_grad():
            unet(x, 500, encoder_hidden_states=torch.zeros(1, embedded.MAX_LENGTH, embedded.TEXT_HIDDEN))
    finally:
        for h in handles:
            h.remove()
    return total


def test_edge_unet_is_at_least_3x_cheaper(cloud, edge):
    params = [sum(p.numel() for p in m.unet.parameters()) for m in (cloud, edge)]
    macs = [_macs(m.unet) for m in (cloud, edge)]
    assert params[0] >= MIN_EDGE_SAVING * params[1], params
    assert macs[0] >= MIN_EDGE_SAVING * macs[1], macs


def test_vae_reconstructions_pass_the_judge(cloud):
    images, labels = world.dataset(256, HELD_OUT_SEED)
    recon = embedded.decode_latents(cloud.vae, embedded.encode_images(cloud.vae, images))
    scores = judge.attribute_scores(recon, world.sample_scenes(256, HELD_OUT_SEED))
    assert scores["all"] >= VAE_MIN_ACCURACY, scores


def test_ideal_denoiser_samples_pass_the_judge(ideal):
    scenes = world.sample_scenes(32, 11)
    images = embedded.sample(ideal, scenes, steps=10, guidance=1.0, seed=0)
    mean, _ = judge.attribute_accuracy(images, scenes)
    assert mean >= IDEAL_MIN_ACCURACY


def test_ideal_denoiser_outputs_agree_across_prediction_types(ideal, cloud):
    """v, eps and x0 outputs at one x_t are the same prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0 and
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, in float64 to its rounding."""
    x = torch.randn(3, *ideal.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = torch.cat([ideal.encode_prompt(p)[0] for p in
                      ("a red circle at the top left", "a blue square at the bottom right", "")]).double()
    t = 400
    outs = {}
    for prediction in ("epsilon", "sample", "v_prediction"):
        sched = diffusers.DDIMScheduler.from_config({**cloud.scheduler_config, "prediction_type": prediction})
        outs[prediction], _ = ideal.predict(x, torch.tensor(t), cond, scheduler=sched)
    a = float(cloud.scheduler.alphas_cumprod[t].double())
    torch.testing.assert_close(a ** 0.5 * outs["sample"] + (1 - a) ** 0.5 * outs["epsilon"], x)
    torch.testing.assert_close(a ** 0.5 * outs["epsilon"] - (1 - a) ** 0.5 * outs["sample"], outs["v_prediction"])


def test_ideal_denoiser_recovers_a_training_latent_at_low_noise(ideal, cloud):
    """At small t the posterior puts all its weight on the nearest training latent y of the caption, and the
    posterior mean of its N(y, s^2 I) is y + (s^2 sqrt(abar) / v)(x_t - sqrt(abar) y), v = abar s^2 + 1 - abar."""
    sched = diffusers.DDIMScheduler.from_config({**cloud.scheduler_config, "prediction_type": "sample"})
    y = ideal.mixtures[5].means[3:4]  # a latent of scene 5
    s = float(ideal.mixtures[5].stds[0])
    a = float(sched.alphas_cumprod[10].double())
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = a ** 0.5 * y + (1 - a) ** 0.5 * noise
    cond, _ = ideal.encode_prompt(world.caption(world.all_scenes()[5]))
    x0, _ = ideal.predict(x, 10, cond.double(), scheduler=sched)
    expected = y + s * s * a ** 0.5 / (a * s * s + 1 - a) * (x - a ** 0.5 * y)
    torch.testing.assert_close(x0, expected)


def test_ideal_denoiser_refuses_what_it_cannot_do(ideal, cloud):
    with pytest.raises(world.CaptionError):
        ideal.encode_prompt("a dog")
    x = torch.zeros(1, *ideal.latent_shape)
    cond, _ = ideal.encode_prompt("a red circle at the top left")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        ideal.predict(x, 10, cond, scheduler=cloud.make_scheduler("EulerDiscreteScheduler"))
    with pytest.raises(ValueError, match="integer"):
        ideal.predict(x, 10.5, cond, scheduler=cloud.make_scheduler())
    assert ideal.text_space == cloud.text_space and ideal.latent_space == cloud.latent_space


TINY_UNETS = {"cloud": {"channels": (8, 16), "attention_levels": 1, "layers_per_block": 1},
              "edge": {"channels": (8,), "attention_levels": 0, "layers_per_block": 1}}


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _assert_same_state(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a["step"] == b["step"]


def test_unet_training_resumed_equals_a_straight_run(tmp_path):
    config = train_models.UNetConfig(batch=4, per_scene=1, specs=TINY_UNETS, warmup=2)
    vae = embedded.build_vae(0).eval().requires_grad_(False)

    def trainer(checkpoint=None):
        return train_models.UNetTrainer(vae, str(tmp_path / "tok"), config=config, checkpoint=checkpoint)

    straight = trainer()
    straight.train_step()
    straight.train_step()
    first = trainer()
    first.train_step()
    resumed = trainer(_roundtrip(first.state()))
    resumed.train_step()
    _assert_same_state(straight.state(), resumed.state())


def test_vae_training_resumed_equals_a_straight_run():
    config = train_models.VaeConfig(batch=2)
    straight = train_models.VaeTrainer(config)
    straight.train_step()
    straight.train_step()
    first = train_models.VaeTrainer(config)
    first.train_step()
    resumed = train_models.VaeTrainer(checkpoint=_roundtrip(first.state()))
    resumed.train_step()
    _assert_same_state(straight.state(), resumed.state())
