"""A tiny, randomly initialised Flux folder: the real diffusers/transformers classes and FluxPipeline's file
layout, at a size that runs a whole generation on a CPU in well under a second.

    save_tiny_flux(path)               -> path   (FluxPipeline.from_pretrained(path) loads it)
    save_tiny_flux_pair(root)          -> (root/cloud, root/edge)

Shapes (kept Flux-like: the VAE downsamples by 8 and has 16 latent channels, the transformer packs 2x2
patches, T5 embeds the prompt token by token and CLIP's pooled output conditions the modulation):

    image (3, 64, 64)  --VAE-->  latent (16, 8, 8)  --pack 2x2-->  (16 tokens, 64)   FLUX.1's scaling 0.3611,
                                                                                   shift 0.1159
    prompt --T5Tokenizer--> ids (512,) --T5EncoderModel--> embeddings (512, 32)     (FLUX.1: (512, 4096))
    prompt --CLIPTokenizer--> ids (16,) --CLIPTextModel--> pooled (32,)             (FLUX.1: (768,))

The edge folder is a depth-pruned Flux (as Flux.1-lite is to FLUX.1-dev) in miniature: a transformer of
the same width with fewer blocks, over the same text encoders, tokenizers, VAE and scheduler (bit-identical
weights), so the two share latent and text-embedding spaces. schnell=True writes a FLUX.1-schnell-like
folder: no guidance embedding, and schnell's scheduler (no dynamic shifting).

The CLIP tokenizer's vocabulary is tiny.py's. The T5 tokenizer is a Unigram model over the same words
(each "▁word" one piece) and the letters a-z, with T5's <pad> = 0, </s> = 1 and <unk> = 2; characters
outside a-z become <unk>.
"""
import os
import string

from .tiny import BOS, EOS, MAX_LENGTH, VAE_CHANNELS, WORDS, _seeded, write_vocabulary

IMAGE_SIZE = 64          # pixels per side, the VAE config's sample_size (FLUX.1: 1024)
LATENT_CHANNELS = 16     # as FLUX.1's VAE
TEXT_HIDDEN = 32         # T5's d_model = the transformer's joint_attention_dim (FLUX.1: 4096)
POOLED = 32              # CLIP's hidden size = the transformer's pooled_projection_dim (FLUX.1: 768)
HEADS, HEAD_DIM = 2, 16  # attention heads and their width (FLUX.1: 24 x 128)
ROPE_AXES = (4, 6, 6)    # rotary dims per position axis (text, row, column), adding up to HEAD_DIM (FLUX.1: 16, 56, 56)
LAYERS = {"cloud": (2, 2), "edge": (1, 1)}  # (double-stream blocks, single-stream blocks) (FLUX.1: 19, 38)
NORM_GROUPS = 8
# FLUX.1-dev's and FLUX.1-schnell's scheduler configs
SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
SPACE = "\u2581"  # SentencePiece's word-start mark


def t5_vocabulary(words=WORDS):
    """[(piece, score)] for T5Tokenizer's Unigram model: T5's three specials first, then each word as one
    word-initial piece (the likeliest split of it), then the letters alone and word-initial."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SPACE, -3.0)]
    pieces += [(SPACE + w, -2.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase] + [(SPACE + c, -5.0) for c in string.ascii_lowercase]
    return pieces


def _clip(vocab):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=POOLED, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=POOLED,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))


def _t5(vocab_size):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, is_encoder_decoder=False))


def _vae():
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=VAE_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=NORM_GROUPS, sample_size=IMAGE_SIZE,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def _transformer(layers, guidance_embeds):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=layers[0], num_single_layers=layers[1],
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=POOLED, guidance_embeds=guidance_embeds, axes_dims_rope=ROPE_AXES)


def save_tiny_flux(path, seed=0, edge=False, *, schnell=False):
    """Writes a FluxPipeline folder at ``path`` (created if missing) and returns ``path``.

    Weights are random, a function of ``seed`` alone. edge=True has the transformer fewer blocks
    (LAYERS["edge"]); text encoders, tokenizers, VAE and scheduler are the same as edge=False's for the
    same seed. schnell=True: no guidance embedding, and FLUX.1-schnell's scheduler config.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    tokenizer_dir = os.path.join(path, "tokenizer")
    vocab = write_vocabulary(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_LENGTH)
    pieces = t5_vocabulary()
    tokenizer_2 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    # each component seeded on its own, so edge=True changes the transformer and nothing else
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["schnell" if schnell else "dev"]),
        vae=_seeded(seed, _vae), text_encoder=_seeded(seed, _clip, vocab), tokenizer=tokenizer,
        text_encoder_2=_seeded(seed, _t5, len(pieces)), tokenizer_2=tokenizer_2,
        transformer=_seeded(seed, _transformer, LAYERS["edge" if edge else "cloud"], not schnell))
    pipe.save_pretrained(path)
    return path


def save_tiny_flux_pair(root, seed=0, *, schnell=False):
    """(cloud_path, edge_path) = (root/cloud, root/edge): two tiny Flux folders sharing all but the transformer."""
    return (save_tiny_flux(os.path.join(root, "cloud"), seed=seed, schnell=schnell),
            save_tiny_flux(os.path.join(root, "edge"), seed=seed, edge=True, schnell=schnell))


__all__ = ["save_tiny_flux", "save_tiny_flux_pair", "t5_vocabulary"]

