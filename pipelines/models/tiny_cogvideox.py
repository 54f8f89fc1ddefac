"""A tiny, randomly initialised CogVideoX folder: the real diffusers/transformers classes and file layout
(CogVideoXPipeline.save_pretrained) at a size that runs a whole video generation on a CPU in about a second.

    save_tiny_cogvideox(path)          -> path   (CogVideoXPipeline.from_pretrained(path) loads it)
    save_tiny_cogvideox_pair(root)     -> (root/cloud, root/edge)

Shapes (kept CogVideoX-like: the 3-D VAE downsamples 8x in space and 4x in time, 16 latent channels):

    video (9, 3, 64, 64)  --VAE-->  latent (F, C, H, W) = (3, 16, 8, 8)    scaling_factor 1.15258426, as CogVideoX-2b
    prompt --T5Tokenizer--> ids (226,) --T5EncoderModel--> embeddings (226, 32)      226: CogVideoX's text length

The pair is EC-Diff's CogVideoX-5B (cloud) / CogVideoX-2B (edge) in miniature: the cloud transformer is
wider and deeper and uses 3-D rotary position embeddings (as 5B does), the edge one has one layer and
sinusoidal position embeddings (as 2B does); text encoder, tokenizer, VAE and scheduler are the same
(bit-identical weights), so the two share latent and text-embedding spaces. (The real 5B and 2B do not:
their VAE scaling factors are 0.7 and 1.15258426.)

The tokenizer is a Unigram T5Tokenizer over the words of tiny.py's WORDS, each a single token, and the
letters a-z; other characters become <unk>.
"""
import os

from .tiny import WORDS, _seeded

MAX_TEXT_LENGTH = 226    # tokens per prompt: CogVideoX's max_text_seq_length, the pipeline's max_sequence_length
TEXT_HIDDEN = 32         # T5 d_model = the transformer's text_embed_dim (CogVideoX: T5-XXL's 4096)
FRAMES = 9               # video frames: (9 - 1) / 4 + 1 = 3 latent frames (CogVideoX: 49 -> 13)
IMAGE_SIZE = 64          # pixels per side (CogVideoX: 480 x 720)
VAE_CHANNELS = (8, 8, 16, 16)    # 4 levels -> 2^3 = 8 spatially; the first two also halve time: 4x
LATENT_CHANNELS = 16
TEMPORAL_COMPRESSION = 4
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
NORM_GROUPS = 4          # GroupNorm groups; divides every channel count above
SCALING_FACTOR = 1.15258426  # CogVideoX-2b's VAE
# CogVideoX-5B / 2B in miniature: heads x head_dim, layers, rotary (5B) or sinusoidal (2B) positions
TRANSFORMERS = {"cloud": dict(num_attention_heads=4, attention_head_dim=16, num_layers=2,
                              use_rotary_positional_embeddings=True),
                "edge": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1,
                             use_rotary_positional_embeddings=False)}
# CogVideoX-2b's scheduler/scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
                 sample_max_value=1.0, clip_sample_range=1.0)
PAD, EOS, UNK, SPACE = "<pad>", "</s>", "<unk>", "\u2581"  # T5's special tokens; SentencePiece's word marker


def vocabulary(words=WORDS):
    """[(piece, log-probability)] of a Unigram model in T5's order (<pad> 0, </s> 1, <unk> 2): each of
    ``words`` one piece, scored above any spelling of it in letters, so a known word is always one token."""
    import string

    letters = list(string.ascii_lowercase)
    return ([(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -8.0)]
            + [(SPACE + w, -1.0) for w in words]
            + [(SPACE + c, -6.0) for c in letters if c not in words] + [(c, -7.0) for c in letters])


def _tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=vocabulary(), extra_ids=0, model_max_length=MAX_TEXT_LENGTH)


def _text_encoder(vocab_size):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (gated GELU, untied), as CogVideoX's t5-v1_1-xxl
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae():
    from diffusers import AutoencoderKLCogVideoX

    n = len(VAE_CHANNELS)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * n,
        up_block_types=("CogVideoXUpBlock3D",) * n, block_out_channels=VAE_CHANNELS, latent_channels=LATENT_CHANNELS,
        layers_per_block=1, norm_num_groups=NORM_GROUPS, temporal_compression_ratio=TEMPORAL_COMPRESSION,
        sample_height=IMAGE_SIZE, sample_width=IMAGE_SIZE, scaling_factor=SCALING_FACTOR)


def _transformer(side, patch_size_t):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        **TRANSFORMERS[side], in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, time_embed_dim=16,
        text_embed_dim=TEXT_HIDDEN, sample_width=LATENT_SIZE, sample_height=LATENT_SIZE, sample_frames=FRAMES,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=TEMPORAL_COMPRESSION,
        max_text_seq_length=MAX_TEXT_LENGTH)


def save_tiny_cogvideox(path, seed=0, edge=False, *, patch_size_t=None):
    """Writes a CogVideoXPipeline folder at ``path`` (created if missing) and returns ``path``.

    Weights are random, a function of ``seed`` alone. edge=True: the edge transformer of TRANSFORMERS
    (one layer, sinusoidal positions); text encoder, tokenizer, VAE and scheduler are the same as
    edge=False's for the same seed. patch_size_t=2: a CogVideoX 1.5-style transformer (patches of two
    latent frames; 3 latent frames are padded to 4, as the pipeline pads them).
    """
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if patch_size_t not in (None, 2):
        raise ValueError(f"patch_size_t must be None (CogVideoX 1.0) or 2 (CogVideoX 1.5), got {patch_size_t!r}")
    tokenizer = _tokenizer()
    # each component seeded on its own, so edge=True changes the transformer and nothing else
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=_seeded(seed, _text_encoder, len(tokenizer)), vae=_seeded(seed, _vae),
        transformer=_seeded(seed, _transformer, "edge" if edge else "cloud", patch_size_t),
        scheduler=CogVideoXDDIMScheduler(**SCHEDULER))
    pipe.save_pretrained(path)
    return path


def save_tiny_cogvideox_pair(root, seed=0):
    """(cloud_path, edge_path) = (root/cloud, root/edge): two tiny CogVideoX folders sharing all but the
    transformer."""
    return (save_tiny_cogvideox(os.path.join(root, "cloud"), seed=seed),
            save_tiny_cogvideox(os.path.join(root, "edge"), seed=seed, edge=True))


__all__ = ["save_tiny_cogvideox", "save_tiny_cogvideox_pair", "vocabulary"]
