"""A tiny, randomly initialised Stable Diffusion folder: the real diffusers/transformers classes and file
layout at a size that runs a whole generation on a CPU in well under a second.

    save_tiny_pipeline(path)           -> path   (StableDiffusionPipeline.from_pretrained(path) loads it)
    save_tiny_pair(root)               -> (root/cloud, root/edge)

Shapes (kept SD-like: the VAE downsamples by 8 and has 4 latent channels):

    image (3, 64, 64)  --VAE-->  latent (4, 8, 8)      scaling_factor 0.18215, as SD 1.x
    prompt --CLIPTokenizer--> ids (16,) --CLIPTextModel--> embeddings (16, 32)

The edge folder is BK-SDM's relation to SD in miniature: a narrower UNet over the same text encoder,
tokenizer, VAE and scheduler (bit-identical weights), so the two share latent and text-embedding spaces.

The tokenizer's vocabulary (vocab.json + merges.txt) is written here: the letters a-z, each as a word-final
token ("a</w>") too, the merges that make each of WORDS one token, and CLIP's two special tokens. Any
lowercase text tokenizes; characters outside a-z become <|endoftext|> (CLIP's unk).
"""
import json
import os
import string

import torch

WORDS = ("a an the of on in with and under above "
         "red green blue yellow black white orange purple small big bright dark "
         "circle square triangle star cat dog bird tree house car boat flower "
         "sky sea field mountain night day photo painting").split()
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP's end-of-word suffix on a word's last BPE symbol

MAX_LENGTH = 16          # tokens per prompt, with BOS and EOS (SD: 77)
TEXT_HIDDEN = 32         # text embedding width D = the UNet's cross_attention_dim (SD 1.x: 768)
IMAGE_SIZE = 64          # pixels per side (SD: 512)
VAE_CHANNELS = (16, 16, 32, 32)   # 4 levels -> downsampling by 2^3 = 8, as SD's VAE
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
UNET_CHANNELS = {"cloud": (32, 64), "edge": (16, 32)}
NORM_GROUPS = 8          # GroupNorm groups; divides every channel count above


def _bpe(word, ranks):
    """The BPE split of ``word`` under merge ``ranks`` {(left, right): rank}: repeatedly join the
    adjacent pair of lowest rank, as CLIP's tokenizer does."""
    parts = list(word[:-1]) + [word[-1] + EOW]
    while len(parts) > 1:
        pairs = [(ranks.get((l, r), len(ranks)), i) for i, (l, r) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def vocabulary(words=WORDS):
    """(vocab {token: id}, merges [(left, right)]) in which each of ``words`` is a single token.

    Merges are added greedily: split a word with the merges so far and join its first two parts until it
    is one token. A new merge has the worst rank, so it fires only after every earlier merge is done: it
    cannot change the split of a word already made whole.
    """
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + EOW for c in letters]
    ranks = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            tokens.append(parts[0] + parts[1])
            parts = _bpe(word, ranks)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, sorted(ranks, key=ranks.get)


def write_vocabulary(folder, words=WORDS):
    """Writes ``folder``/vocab.json and merges.txt (the files CLIP's tokenizer is published with)."""
    vocab, merges = vocabulary(words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{l} {r}\n" for l, r in merges))
    return vocab


def _text_encoder(vocab):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_HIDDEN,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))


def _vae(image_size=IMAGE_SIZE):
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=NORM_GROUPS, sample_size=image_size)


def _unet(channels, latent_size=LATENT_SIZE):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=2, norm_num_groups=NORM_GROUPS)


def _scheduler(name="DDIMScheduler"):
    """SD 1.x's noise schedule (scaled_linear betas 0.00085..0.012 over 1000 steps) under DDIM, or under
    PNDM as SD v1.5's and BK-SDM's folders ship it (PLMS: skip_prk_steps)."""
    import diffusers

    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, steps_offset=1)
    if name == "DDIMScheduler":
        return diffusers.DDIMScheduler(**schedule, clip_sample=False)
    if name == "PNDMScheduler":
        return diffusers.PNDMScheduler(**schedule, skip_prk_steps=True)
    raise ValueError(f"tiny pipelines ship DDIMScheduler or PNDMScheduler, got {name!r}")


def _seeded(seed, build, *args):
    """build(*args) with torch's global generator seeded, restoring the caller's generator state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args)


def save_tiny_pipeline(path, *, seed=0, edge=False, scheduler="DDIMScheduler", image_size=IMAGE_SIZE):
    """Writes a StableDiffusionPipeline folder at ``path`` (created if missing) and returns ``path``.

    Weights are random, a function of ``seed`` alone. edge=True narrows the UNet (UNET_CHANNELS["edge"]);
    text encoder, tokenizer, VAE and scheduler are the same as edge=False's for the same seed. scheduler:
    the folder's, "DDIMScheduler" or "PNDMScheduler" (what SD v1.5 folders ship). image_size: the folder's
    default image side in pixels (512: SD v1.5's latent, 4x64x64, at the same tiny widths; the weights do
    not depend on it, only the default size the pipeline and the runners generate at).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_size(image_size)
    # vocab.json + merges.txt stay beside the tokenizer.json that save_pretrained adds (transformers 5 writes
    # only tokenizer.json), as in SD's own tokenizer folder
    tokenizer_dir = os.path.join(path, "tokenizer")
    vocab = write_vocabulary(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_LENGTH)
    # each component seeded on its own, so edge=True changes the UNet and nothing else
    pipe = StableDiffusionPipeline(
        vae=_seeded(seed, _vae, image_size), text_encoder=_seeded(seed, _text_encoder, vocab), tokenizer=tokenizer,
        unet=_seeded(seed, _unet, UNET_CHANNELS["edge" if edge else "cloud"], image_size // 8),
        scheduler=_scheduler(scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_tiny_pair(root, seed=0, scheduler="DDIMScheduler", image_size=IMAGE_SIZE):
    """(cloud_path, edge_path) = (root/cloud, root/edge): two tiny pipelines sharing all but the UNet."""
    return (save_tiny_pipeline(os.path.join(root, "cloud"), seed=seed, scheduler=scheduler, image_size=image_size),
            save_tiny_pipeline(os.path.join(root, "edge"), seed=seed, edge=True, scheduler=scheduler,
                               image_size=image_size))


def _check_size(image_size):
    # the VAE halves the side 3 times and the UNet once more: the latent side must be even
    if type(image_size) is not int or image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be an int multiple of 16 (>= 16), got {image_size!r}")
