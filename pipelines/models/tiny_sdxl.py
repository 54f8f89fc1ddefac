"""A tiny, randomly initialised Stable Diffusion XL folder: the real diffusers/transformers classes and the
file layout of StableDiffusionXLPipeline.save_pretrained, small enough to run a generation on a CPU in well
under a second.

    save_tiny_sdxl(path)               -> path   (StableDiffusionXLPipeline.from_pretrained(path) loads it)
    save_tiny_sdxl_pair(root)          -> (root/cloud, root/edge)

Shapes (kept SDXL-like: two CLIP text encoders of different widths, the second with a projection; the
VAE downsamples by 8 to 4 channels with SDXL's scaling factor; the UNet takes "text_time" added conditions):

    image (3, 64, 64)  --VAE-->  latent (4, 8, 8)                scaling_factor 0.13025, as SDXL's VAE
    prompt --tokenizer-->   ids (16,) --CLIPTextModel-->               hidden_states[-2] (16, 32)  (SDXL: 768)
    prompt --tokenizer_2--> ids (16,) --CLIPTextModelWithProjection--> hidden_states[-2] (16, 48)  (SDXL: 1280)
                                                                       text_embeds (40,)           (SDXL: 1280)
    UNet: cross_attention_dim 32 + 48 = 80; added conditions: text_embeds (40,) and 6 time ids, each
          embedded in addition_time_embed_dim 8 -> projection_class_embeddings_input_dim 6 * 8 + 40 = 88

The edge folder is SSD-1B's and Vega's relation to SDXL-Base in miniature: a distilled, narrower UNet (fewer
channels, fewer transformer layers) over the same two text encoders, two tokenizers, VAE and scheduler
(bit-identical weights), so the two share latent and text-embedding spaces. The scheduler is SDXL-Base's:
EulerDiscreteScheduler over SD's scaled_linear betas, "leading" timestep spacing, steps_offset 1.

The tokenizers' vocabulary is tiny.py's (the letters a-z and WORDS as single tokens); both tokenizers are
the same files, as SDXL's two are the same BPE vocabulary.
"""
import os

from .tiny import (IMAGE_SIZE, LATENT_SIZE, MAX_LENGTH, NORM_GROUPS, VAE_CHANNELS, BOS, EOS, _check_size, _seeded,
                   write_vocabulary)

TEXT_HIDDEN = 32         # text_encoder's width (SDXL: CLIP ViT-L, 768)
TEXT_HIDDEN_2 = 48       # text_encoder_2's width (SDXL: OpenCLIP ViT-bigG, 1280)
POOLED = 40              # text_encoder_2's projection_dim: the pooled embedding (SDXL: 1280)
TIME_EMBED = 8           # addition_time_embed_dim: the width each of the 6 time ids is embedded in (SDXL: 256)
TIME_IDS = 6             # (original_size, crops_coords_top_left, target_size), two numbers each
SCALING_FACTOR = 0.13025  # SDXL's VAE
# the edge's UNet is distilled: narrower and with fewer transformer layers per block, as SSD-1B's and Vega's
UNET = {"cloud": dict(block_out_channels=(32, 64), transformer_layers_per_block=(1, 2)),
        "edge": dict(block_out_channels=(16, 32), transformer_layers_per_block=(1, 1))}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (keys Euler ignores included)
SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                      beta_start=0.00085, clip_sample=False, interpolation_type="linear", num_train_timesteps=1000,
                      prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)


def _text_encoder(vocab, hidden, projection=None):
    """CLIPTextModel (projection None) or CLIPTextModelWithProjection of width ``hidden``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                            projection_dim=projection or hidden, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                            pad_token_id=vocab[EOS])
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def _vae(image_size=IMAGE_SIZE):
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=NORM_GROUPS, sample_size=image_size,
                         scaling_factor=SCALING_FACTOR, force_upcast=True)


def _unet(block_out_channels, transformer_layers_per_block, latent_size=LATENT_SIZE):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=block_out_channels,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=transformer_layers_per_block,
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED + POOLED, norm_num_groups=NORM_GROUPS)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)


def save_tiny_sdxl(path, seed=0, edge=False, image_size=IMAGE_SIZE):
    """Writes a StableDiffusionXLPipeline folder at ``path`` (created if missing) and returns ``path``.

    Weights are random, a function of ``seed`` alone. edge=True narrows the UNet (UNET["edge"]); the text
    encoders, tokenizers, VAE and scheduler are the same as edge=False's for the same seed. image_size: the
    default image side (1024: SDXL's latent, 4x128x128; the weights do not depend on it).
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_size(image_size)
    tokenizers = []
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt beside save_pretrained's tokenizer.json
        folder = os.path.join(path, name)
        vocab = write_vocabulary(folder)
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH))
    # each component seeded on its own (the second encoder with seed + 1), so edge=True changes the UNet only
    pipe = StableDiffusionXLPipeline(
        vae=_seeded(seed, _vae, image_size), text_encoder=_seeded(seed, _text_encoder, vocab, TEXT_HIDDEN),
        text_encoder_2=_seeded(seed + 1, _text_encoder, vocab, TEXT_HIDDEN_2, POOLED),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=_seeded(seed, lambda: _unet(**UNET["edge" if edge else "cloud"], latent_size=image_size // 8)),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def save_tiny_sdxl_pair(root, seed=0, image_size=IMAGE_SIZE):
    """(cloud_path, edge_path) = (root/cloud, root/edge): two tiny SDXL folders sharing all but the UNet."""
    return (save_tiny_sdxl(os.path.join(root, "cloud"), seed=seed, image_size=image_size),
            save_tiny_sdxl(os.path.join(root, "edge"), seed=seed, edge=True, image_size=image_size))
