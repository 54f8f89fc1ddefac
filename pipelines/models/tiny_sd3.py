"""A tiny, randomly initialised Stable Diffusion 3 folder: the real diffusers/transformers classes and file
layout (StableDiffusion3Pipeline.save_pretrained's) at a size that runs a generation on a CPU in a second.

    save_tiny_sd3(path)                -> path   (StableDiffusion3Pipeline.from_pretrained(path) loads it)
    save_tiny_sd3(path, t5=False)      -> path   without T5 (text_encoder_3 = tokenizer_3 = None)
    save_tiny_sd3_pair(root)           -> (root/cloud, root/edge)

Shapes (kept SD3-like: the VAE downsamples by 8 and has 16 latent channels, the MMDiT patches 2 x 2):

    image (3, 64, 64)  --VAE-->  latent (16, 8, 8)      scaling_factor 1.5305, shift_factor 0.0609, as SD3's
    prompt --CLIP-L--> penultimate (16, 32), pooled (32)      (SD3: 77 x 768, 768)
           --CLIP-G--> penultimate (16, 48), pooled (48)      (SD3: 77 x 1280, 1280)
           --T5-----> (256, 96)                               (SD3: 256 x 4096; zeros without T5)
    joint embeddings (16 + 256, 96) = [CLIP-L | CLIP-G | 0] rows, then T5's; pooled (80)

The cloud's transformer is SD3.5-medium-like in miniature (qk_norm "rms_norm", a dual-attention first
block); the edge's has fewer layers over the same text encoders, tokenizers, VAE and scheduler
(bit-identical weights), so the two share latent and text-embedding spaces.

The CLIP tokenizers are tiny.py's vocabulary; the T5 tokenizer is a Unigram over the same words, each
with SentencePiece's word-start mark ("▁red"), plus the single letters, so any lowercase text tokenizes.
"""
import os
import string

from .tiny import BOS, EOS, MAX_LENGTH, WORDS, _seeded, write_vocabulary

CLIP_HIDDEN = (32, 48)      # CLIP-L's and CLIP-G's widths = their projection dims (SD3: 768, 1280)
JOINT = 96                  # T5's d_model = the transformer's joint_attention_dim (SD3: 4096) >= sum(CLIP_HIDDEN)
IMAGE_SIZE = 64             # pixels per side (SD3: 1024)
VAE_CHANNELS = (16, 16, 32, 32)   # 4 levels -> downsampling by 2^3 = 8, as SD3's VAE
LATENT_CHANNELS = 16
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609  # SD3's VAE
HEADS, HEAD_DIM = 4, 8      # the transformer's inner width 32 (SD3 medium: 24 x 64)
LAYERS = {"cloud": 2, "edge": 1}
SPIECE = "\u2581"          # SentencePiece's word-start mark


def t5_vocabulary(words=WORDS):
    """[(piece, log-probability)]: T5's three special tokens first (<pad> 0, </s> 1, <unk> 2), then the
    word-start mark, each word and each letter with and without it. Whole words score best, so a word
    of ``words`` tokenizes as one piece."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SPIECE, -3.0)]
    pieces += [(SPIECE + w, -1.0) for w in words]
    pieces += [(p + c, -5.0) for c in string.ascii_lowercase for p in ("", SPIECE)]
    return pieces


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0)


def _clip(vocab, hidden):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=hidden,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))


def _t5(vocab_size):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=JOINT, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae():
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=VAE_CHANNELS, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8,
                         sample_size=IMAGE_SIZE, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR,
                         use_quant_conv=False, use_post_quant_conv=False)


def _transformer(layers, dual):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=layers, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=JOINT,
        caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=sum(CLIP_HIDDEN),
        pos_embed_max_size=LATENT_SIZE, qk_norm="rms_norm", dual_attention_layers=(0,) if dual else ())


def _scheduler():
    """SD3's: the rectified-flow Euler sampler with its timestep shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def save_tiny_sd3(path, seed=0, edge=False, t5=True):
    """Writes a StableDiffusion3Pipeline folder at ``path`` (created if missing) and returns ``path``.

    Weights are random, a function of ``seed`` alone. edge=True gives the transformer fewer layers
    (LAYERS["edge"]); text encoders, tokenizers, VAE and scheduler are the same as edge=False's for the
    same seed. t5=False saves the folder without T5 (text_encoder_3 and tokenizer_3 None), as SD3 is run
    to save T5's memory: the pipeline then puts zeros where T5's embeddings go.
    """
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    clip_tokenizers, vocab = [], None
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt beside save_pretrained's tokenizer.json
        folder = os.path.join(path, name)
        vocab = write_vocabulary(folder)
        clip_tokenizers.append(CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH))
    t5_tokenizer = _t5_tokenizer() if t5 else None
    # each component seeded on its own, so edge=True changes the transformer and nothing else
    pipe = StableDiffusion3Pipeline(
        transformer=_seeded(seed, _transformer, LAYERS["edge" if edge else "cloud"], not edge),
        scheduler=_scheduler(), vae=_seeded(seed, _vae),
        text_encoder=_seeded(seed, _clip, vocab, CLIP_HIDDEN[0]), tokenizer=clip_tokenizers[0],
        text_encoder_2=_seeded(seed + 1, _clip, vocab, CLIP_HIDDEN[1]), tokenizer_2=clip_tokenizers[1],
        text_encoder_3=_seeded(seed, _t5, len(t5_tokenizer)) if t5 else None, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path)
    return path


def save_tiny_sd3_pair(root, seed=0, t5=True):
    """(cloud_path, edge_path) = (root/cloud, root/edge): two tiny SD3 folders sharing all but the transformer."""
    return (save_tiny_sd3(os.path.join(root, "cloud"), seed=seed, t5=t5),
            save_tiny_sd3(os.path.join(root, "edge"), seed=seed, edge=True, t5=t5))
