"""The project's own pair of small text-to-image models for the procedural world (pipelines/world.py):
Stable Diffusion's structure and diffusers' folder format, at a size trained on this 2-core CPU.

    build_tokenizer(folder)               -> CLIPTokenizer over the world's words (vocab.json + merges.txt)
    build_text_encoder(vocab, seed)       -> CLIPTextModel, fixed random (never trained; see below)
    build_vae(seed)                       -> AutoencoderKL, image (3, 32, 32) -> latent (4, 8, 8)
    build_unet(kind, seed)                -> UNet2DConditionModel, kind "cloud" or "edge"
    build_scheduler()                     -> DDIMScheduler, SD 1.x's betas, prediction_type v_prediction
    scene_pool(per_scene, seed)           -> (images, scene ids): a finite training set, every scene
                                             rendered per_scene times; the UNets' (and the exact
                                             denoiser's default) is scene_pool(POOL_PER_SCENE, POOL_SEED)
    save_folder(path, ...)                -> a StableDiffusionPipeline folder
    CLOUD_PATH, EDGE_PATH                 -> the committed folders (assets/world-sd-cloud, -edge)

Shapes:

    image (3, 32, 32) in [-1, 1]  --VAE (32, 64, 64), 2 downsamplings-->  latent (4, 8, 8)
    caption --CLIPTokenizer--> ids (16,) --CLIPTextModel--> embeddings (16, 64)
    latent (4, 8, 8) + t + embeddings --UNet--> v (4, 8, 8)

Choices, each measured on this machine (numbers in assets/MODEL_CARD.md):

- Latent (4, 8, 8), not (4, 16, 16): the judge reads the VAE's reconstructions as well, and every UNet
  evaluation and the exact denoiser (pipelines/ideal.py) cost 4x less on 64 latent cells than on 256.
- v-prediction (Salimans & Ho 2022): with epsilon-prediction an earlier pixel-space model sampled pure noise
  on this black-background world (the predicted image mean drifts at high noise, where eps carries almost
  no information about x0); predicting v = sqrt(abar) eps - sqrt(1 - abar) x0 does not have that defect.
- The text encoder is a fixed random CLIPTextModel whose token embeddings are redrawn N(0, 1) (CLIP's init,
  std 0.02, leaves the token signal small next to the position embeddings). Each caption then has its own
  embedding sequence, and the UNet's cross-attention learns to read it; no text model needs training, and
  cloud and edge share it bit for bit, as they share the VAE.
- The two UNets differ in width and in where attention is, not in kind (BK-SDM's relation to SD):
  the cloud's (64, 128, 128) with cross-attention at 4x4 and 2x2 and in the middle; the edge's (32, 64)
  with cross-attention only in the middle block. Attention and extra blocks cost wall time on a CPU out of
  proportion to their multiply-adds at these sizes, so the edge is cheap by having fewer of them.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .models import tiny

ASSETS = Path(__file__).parent / "assets"
CLOUD_PATH = ASSETS / "world-sd-cloud"
EDGE_PATH = ASSETS / "world-sd-edge"

WORDS = ("a", "at", "the") + world.COLOURS + world.SHAPES + ("top", "bottom", "left", "right")
MAX_LENGTH = 16           # tokens per prompt with BOS and EOS; a caption takes 9
TEXT_HIDDEN = 64          # text embedding width D = the UNets' cross_attention_dim
TEXT_LAYERS = 2
TEXT_HEADS = 4
TOKEN_EMBEDDING_STD = 1.0  # redrawn token embeddings (CLIP init: 0.02)
LATENT_CHANNELS = 4
VAE_CHANNELS = (32, 64, 64)  # 3 levels: 2 downsamplings, 32 px -> 8 latent cells a side
LATENT_SIZE = world.IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
NORM_GROUPS = 8
ATTENTION_HEAD_DIM = 8
TEXT_SEED = 0             # the fixed random text encoder's weights
# The UNets' training set, scene_pool(POOL_PER_SCENE, POOL_SEED): train_models.py trains on it and the exact
# denoiser (ideal.py) is exact for it by default, so both take it from here.
POOL_PER_SCENE = 128      # 48 x 128 = 6144 images
POOL_SEED = 3_000_000     # the render seed of its jitter


@dataclass(frozen=True)
class UNetSpec:
    """block_out_channels per level; cross-attention in the last ``attention_levels`` down levels (and the
    mirrored up levels; the middle block always has it); ResNet blocks per level."""

    channels: tuple
    attention_levels: int
    layers_per_block: int = 1


UNETS = {"cloud": UNetSpec((64, 128, 128), attention_levels=2), "edge": UNetSpec((32, 64), attention_levels=0)}


def _seeded(seed, build, *args):
    """build(*args) under torch's global generator seeded with ``seed``; the caller's state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args)


def build_tokenizer(folder):
    """A CLIPTokenizer (max length MAX_LENGTH) whose vocabulary makes each of WORDS one token; writes
    ``folder``/vocab.json and merges.txt, the files it is loaded from."""
    from transformers import CLIPTokenizer

    tiny.write_vocabulary(folder, WORDS)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH)


def _text_encoder(vocab):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN, bos_token_id=vocab[tiny.BOS], eos_token_id=vocab[tiny.EOS],
        pad_token_id=vocab[tiny.EOS]))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape) * TOKEN_EMBEDDING_STD)
    return model.eval().requires_grad_(False)


def build_text_encoder(vocab, seed=TEXT_SEED):
    """The fixed random CLIPTextModel over ``vocab`` ({token: id}), a function of ``seed`` alone."""
    return _seeded(seed, _text_encoder, vocab)


def _vae():
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=VAE_CHANNELS, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=NORM_GROUPS,
                         sample_size=world.IMAGE_SIZE)


def build_vae(seed=0):
    """An untrained AutoencoderKL: (B, 3, 32, 32) -> latent (B, 4, 8, 8); a function of ``seed`` alone."""
    return _seeded(seed, _vae)


def _unet(spec):
    from diffusers import UNet2DConditionModel

    n = len(spec.channels)
    down = tuple("CrossAttnDownBlock2D" if i >= n - spec.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i < spec.attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=spec.channels, layers_per_block=spec.layers_per_block, down_block_types=down,
        up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=ATTENTION_HEAD_DIM, norm_num_groups=NORM_GROUPS)


def build_unet(kind, seed=0, spec=None):
    """An untrained UNet2DConditionModel of UNETS[kind] (or ``spec``), a function of ``seed`` alone."""
    if spec is None:
        if kind not in UNETS:
            raise ValueError(f"kind must be one of {', '.join(UNETS)}, got {kind!r}")
        spec = UNETS[kind]
    return _seeded(seed, _unet, spec)


def build_scheduler():
    """SD 1.x's noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps) under DDIM, v-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def scene_pool(per_scene, seed):
    """(images (48 per_scene, 3, 32, 32) float32 in [-1, 1], scene ids (48 per_scene,) int64): every scene of
    world.all_scenes() rendered ``per_scene`` times with jitter from ``seed``, scene-major (id k is
    all_scenes()[k]). The finite training set of the UNets, and the set the exact denoiser is exact for."""
    if not isinstance(per_scene, int) or per_scene < 1:
        raise ValueError(f"per_scene must be an int >= 1, got {per_scene!r}")
    scenes = world.all_scenes()
    images = world.render([sc for sc in scenes for _ in range(per_scene)], seed)
    ids = torch.arange(len(scenes)).repeat_interleave(per_scene)
    return images, ids


def captions():
    """The 48 captions, in world.all_scenes() order (index = scene id)."""
    return [world.caption(sc) for sc in world.all_scenes()]


@torch.no_grad()
def encode_images(vae, images, batch=256, scaling_factor=None):
    """images (N, 3, 32, 32) in [-1, 1] -> latents (N, 4, 8, 8) float32: the posterior mean (deterministic)
    times ``scaling_factor`` (default the VAE's), as the UNets see data."""
    vae = vae.eval()
    out = [vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out) * (vae.config.scaling_factor if scaling_factor is None else scaling_factor)


@torch.no_grad()
def decode_latents(vae, latents, batch=256):
    """latents (N, 4, 8, 8) (scaled) -> images (N, 3, 32, 32) float32, unclamped."""
    vae = vae.eval()
    return torch.cat([vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample
                      for i in range(0, len(latents), batch)])


def save_folder(path, tokenizer, text_encoder, vae, unet, scheduler, dtype=torch.float16):
    """Writes a StableDiffusionPipeline folder at ``path`` with the UNet and VAE weights as ``dtype``
    safetensors and the text encoder's as float32 (the modules are copied, the caller's are untouched);
    returns ``path``.

    Why the text encoder stays float32 (0.3 MB): with no torch_dtype, diffusers loads a model as float32
    whatever its file's dtype, but transformers loads it in the file's dtype, so a float16 text encoder
    would feed float16 embeddings to a float32 UNet and StableDiffusionPipeline.from_pretrained(path)
    would fail at its first step."""
    import copy

    from diffusers import StableDiffusionPipeline

    def cast(m):
        return copy.deepcopy(m).to(dtype)

    pipe = StableDiffusionPipeline(vae=cast(vae), text_encoder=copy.deepcopy(text_encoder).float(), tokenizer=tokenizer,
                                   unet=cast(unet), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    # keep vocab.json + merges.txt beside tokenizer.json, as tiny.py does (transformers 5 writes only the latter)
    tiny.write_vocabulary(os.path.join(path, "tokenizer"), WORDS)
    return path


@torch.no_grad()
def sample(model, scenes, *, steps, guidance, seed, batch=64):
    """images (N, 3, 32, 32) float32 in [-1, 1]: ``model``'s generations for the captions of ``scenes``, with
    the folder's scheduler (DDIM, eta 0) at ``steps`` steps and classifier-free guidance ``guidance`` against
    "" (none at guidance <= 1), stepped by FusedSampler as the runtime steps them, decoded and postprocessed
    as the pipeline does (clamped). ``model``: anything with StableDiffusionModel's interface. Rows are
    generated ``batch`` at a time; chunk j's x_T is model.initial_noise(seed * 1_000_003 + j, batch)."""
    from ..kernels import FusedSampler

    sched = model.make_scheduler()
    sched.set_timesteps(steps)
    sampler = FusedSampler(sched)
    out = []
    for j, lo in enumerate(range(0, len(scenes), batch)):
        chunk = scenes[lo:lo + batch]
        pairs = [model.encode_prompt(world.caption(sc), "") for sc in chunk]
        cond, uncond = torch.cat([c for c, _ in pairs]), pairs[0][1]
        x = model.initial_noise(seed * 1_000_003 + j, len(chunk), scheduler=sched, generator_device="cpu")
        state = None
        for i, t in enumerate(sampler.timesteps):
            if guidance > 1:
                eps_c, eps_u = model.predict(x, t, cond, uncond, scheduler=sched)
                x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=guidance, state=state)
            else:
                eps_c, _ = model.predict(x, t, cond, None, scheduler=sched)
                x, state = sampler.step(x, i, eps_c, state=state)
        out.append(model.decode(x, output_type="pt") * 2 - 1)
    return torch.cat(out)
