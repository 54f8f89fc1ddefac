"""Trains hybrid SR's world models and writes them under pipelines/hybrid_sr/assets. Per scale S (2 or 4):

    python -m latentwire.pipelines.hybrid_sr.train_sr vae   --scale S --checkpoint-dir CK/vae-xS --minutes 8
    python -m latentwire.pipelines.hybrid_sr.train_sr unet  --scale S --checkpoint-dir CK/unet-xS --vae CK/vae-xS \
        --minutes 15
    python -m latentwire.pipelines.hybrid_sr.train_sr light --scale S --checkpoint-dir CK/light-xS --minutes 3
    python -m latentwire.pipelines.hybrid_sr.train_sr export --scale S --vae CK/vae-xS --unet CK/unet-xS \
        --light CK/light-xS --out pipelines/hybrid_sr/assets

Every stage is resumable (``--resume``) bit for bit, as train_models.py's are (the same run/checkpoint
code): step k draws everything from a generator seeded with (seed, k).

The data: a pool of POOL_CROPS crops of world scenes with textures (world.sample_scenes(textures=True)),
each a PATCH x PATCH low-resolution crop of the 32-px render (plain: the 32-px camera does not resolve
texture) and the matching 8S x 8S crop of the S-times render (textured): the pairs an SR model of the
world maps between. FOREGROUND_SHARE of crops hold a pixel of the shape (the rest fall anywhere, mostly on
black), because the foreground is what the diffusion SR model is for.

- vae: an AutoencoderKL whose factor is S (log2 S downsamplings), so that its latent is the low-resolution
  crop's size, as StableDiffusionUpscalePipeline concatenates them. MSE + KL_WEIGHT KL, on the high crops.
- unet: the upscaler's UNet2DConditionModel: 4 latent + 3 image channels in, v-prediction on the SD 1.x
  schedule, the noise level of the low-resolution image (SD x4's class labels) uniform in
  [0, TRAIN_NOISE_LEVEL], the caption (with its texture) dropped to "" with probability CAPTION_DROPOUT
  for classifier-free guidance. EMA weights are exported.
- light: the ESPCN of light.py, MSE on the same pairs (no caption: it cannot know the texture).

This is a training script: runtime modules never import it.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import embedded, world
from ..models import tiny
from ..train_models import CHECKPOINT, _generator, _load, _lr, run
from .light import ESPCN, LightSR

PATCH = 8                  # low-resolution crop side: one latent patch of the upscaler at any scale
POOL_CROPS = 4096
POOL_SEED = 4_000_000      # the pool's scenes and jitter (held out: evaluations use seeds below 1000)
FOREGROUND_SHARE = 0.75
WORDS = embedded.WORDS + world.TEXTURES
MAX_NOISE_LEVEL = 350      # SD x4 upscaler's
TRAIN_NOISE_LEVEL = 50     # trained on noise levels 0..50; the pipeline's default level is 20
NOISE_LEVEL = 20
KL_WEIGHT = 1e-6
# StableDiffusionUpscalePipeline sets its VAE's scaling_factor to this whatever the folder says (SD x4's);
# so the VAE is reparametrised (rescale_vae) to latents whose std times this is 1, and the UNet trains on those
UPSCALER_SCALING = 0.08333
CAPTION_DROPOUT = 0.1
CLIP_NORM = 1.0
FOREGROUND_WEIGHT = 10.0  # the decoder stage's weight of a foreground pixel against a background one
VAE_CHANNELS = {2: (32, 64), 4: (32, 64, 64)}
UNET_CHANNELS = (64, 128)  # cross-attention at the second level and in the middle block


@dataclass
class Config:
    scale: int = 4
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.995
    seed: int = 0


def crop_pool(scale, n=POOL_CROPS, seed=POOL_SEED, patch=PATCH):
    """(low (n, 3, P, P), high (n, 3, P S, P S), captions [n]) float32 in [-1, 1], detail captions."""
    per_scene = 4
    scenes = world.sample_scenes(n // per_scene, seed, textures=True)
    low_full, high_full = world.render(scenes, seed), world.render(scenes, seed, scale=scale)
    mask = world.coverage(scenes, seed) > 0  # (N, 32, 32)
    g = torch.Generator().manual_seed(seed)
    lows, highs, captions = [], [], []
    last = world.IMAGE_SIZE - patch
    for i, scene in enumerate(scenes):
        ys, xs = mask[i].nonzero(as_tuple=True)
        for _ in range(per_scene):
            if float(torch.rand((), generator=g)) < FOREGROUND_SHARE:  # a crop that holds a shape pixel
                k = int(torch.randint(len(ys), (), generator=g))
                y0 = int(ys[k]) - int(torch.randint(patch, (), generator=g))
                x0 = int(xs[k]) - int(torch.randint(patch, (), generator=g))
                y0, x0 = min(max(y0, 0), last), min(max(x0, 0), last)
            else:
                y0, x0 = (int(v) for v in torch.randint(last + 1, (2,), generator=g))
            lows.append(low_full[i, :, y0:y0 + patch, x0:x0 + patch])
            highs.append(high_full[i, :, y0 * scale:(y0 + patch) * scale, x0 * scale:(x0 + patch) * scale])
            captions.append(world.caption(scene, detail=True))
    return torch.stack(lows), torch.stack(highs), captions


def build_vae(scale, seed=0):
    from diffusers import AutoencoderKL

    channels = VAE_CHANNELS[scale]
    n = len(channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=embedded.LATENT_CHANNELS,
                             block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                             norm_num_groups=embedded.NORM_GROUPS, sample_size=PATCH * scale)


def build_unet(seed=0):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=PATCH, in_channels=embedded.LATENT_CHANNELS + 3, out_channels=embedded.LATENT_CHANNELS,
            block_out_channels=UNET_CHANNELS, layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=embedded.TEXT_HIDDEN, attention_head_dim=embedded.ATTENTION_HEAD_DIM,
            norm_num_groups=embedded.NORM_GROUPS, num_class_embeds=MAX_NOISE_LEVEL + 1)


def build_low_res_scheduler():
    """SD x4 upscaler's: DDPM, linear betas 1e-4..0.02 over 1000 steps (it noises the low-resolution image)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def text_parts(folder):
    """The tokenizer (WORDS, textures included) and fixed random text encoder of the SR folders."""
    from transformers import CLIPTokenizer

    tiny.write_vocabulary(folder, WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=embedded.MAX_LENGTH)
    return tokenizer, embedded.build_text_encoder(tokenizer.get_vocab())


class _Trainer:
    stage = None

    def __init__(self, config, checkpoint):
        if checkpoint is not None:
            config = Config(**checkpoint["config"])
        self.config = config
        self.low, self.high, self.captions = crop_pool(config.scale)
        self.step, self.elapsed_s, self.log, self.losses = 0, 0.0, [], []
        self._loss_sum = 0.0

    def _restore(self, checkpoint, modules):
        if checkpoint is None:
            return
        for name, module in modules.items():
            module.load_state_dict(checkpoint[name])
        self.step, self.elapsed_s = checkpoint["step"], checkpoint["elapsed_s"]
        self.log, self.losses = checkpoint["log"], checkpoint.get("losses", [])

    def _state(self, modules):
        return {"stage": self.stage, "config": asdict(self.config), "step": self.step, "elapsed_s": self.elapsed_s,
                "log": self.log, "losses": self.losses, **{k: m.state_dict() for k, m in modules.items()}}

    def _batch(self, g):
        return torch.randint(len(self.low), (self.config.batch,), generator=g)

    def _optimise(self, loss):
        for group in self.opt.param_groups:
            group["lr"] = _lr(self.config, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # loss spikes (0.003 -> 0.18) at a constant learning rate were seen without this; see the model card
        torch.nn.utils.clip_grad_norm_([q for g in self.opt.param_groups for q in g["params"]], CLIP_NORM)
        self.opt.step()
        self.step += 1
        self._loss_sum += loss.item()
        if self.step % 50 == 0:  # the learning curve: mean training loss of each 50 steps
            self.losses.append({"step": self.step, "train_s": round(self.elapsed_s, 1), "loss": self._loss_sum / 50})
            self._loss_sum = 0.0
        return loss.item()

    def evaluate(self):
        return {}


class VaeTrainer(_Trainer):
    stage = "vae"

    def __init__(self, config=None, checkpoint=None):
        super().__init__(config or Config(), checkpoint)
        self.vae = build_vae(self.config.scale, self.config.seed).train()
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=self.config.lr)
        self._restore(checkpoint, {"vae": self.vae, "opt": self.opt})

    def state(self):
        return self._state({"vae": self.vae, "opt": self.opt})

    def train_step(self):
        g = _generator(self.config.seed, self.step)
        images = self.high[self._batch(g)]
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = F.mse_loss(self.vae.decode(z).sample, images) + KL_WEIGHT * posterior.kl().mean()
        return self._optimise(loss)

    @torch.no_grad()
    def evaluate(self):
        low, high, _ = crop_pool(self.config.scale, 256, seed=7)
        self.vae.eval()
        recon = self.vae.decode(self.vae.encode(high).latent_dist.mean).sample.clamp(-1, 1)
        self.vae.train()
        return {"psnr": _psnr(recon, high)}


@torch.no_grad()
def rescale_vae(vae, k):
    """The same autoencoder with latents k times larger: the posterior's mean (quant_conv's first half) times
    k, its log-variance plus 2 ln k, and post_quant_conv's input weights over k, so decode(k z) is the old
    decode(z) exactly (up to rounding)."""
    import math

    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k
    q.bias[:c] *= k
    q.bias[c:] += 2 * math.log(k)
    pq.weight *= 1 / k
    return vae


class DecoderTrainer(_Trainer):
    """The VAE trained further on a loss that weighs foreground pixels FOREGROUND_WEIGHT times, so that it
    learns the texture the plain MSE let it average away. stage "decoder": the encoder frozen (the latent
    space, which a UNet may already have learnt, does not move); stage "vae-fg": both halves."""

    stage = "decoder"

    def __init__(self, vae_dir, config=None, checkpoint=None, encoder=False):
        super().__init__(config or Config(), checkpoint)
        self.stage = "vae-fg" if encoder else "decoder"
        self.vae = load_vae(vae_dir).train()
        self.vae.requires_grad_(encoder)
        params = [q for q in self.vae.parameters() if q.requires_grad] if encoder else \
            [*self.vae.decoder.parameters(), *self.vae.post_quant_conv.parameters()]
        for q in params:
            q.requires_grad_(True)
        self.opt = torch.optim.Adam(params, lr=self.config.lr)
        self._restore(checkpoint, {"vae": self.vae, "opt": self.opt})

    def state(self):
        return self._state({"vae": self.vae, "opt": self.opt})

    def train_step(self):
        g = _generator(self.config.seed + 1, self.step)
        images = self.high[self._batch(g)]
        with torch.set_grad_enabled(self.stage == "vae-fg"):
            posterior = self.vae.encode(images).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        weight = 1 + (FOREGROUND_WEIGHT - 1) * ((images.amax(1, keepdim=True) + 1) / 2 > 0.05).float()
        loss = (weight * (self.vae.decode(z).sample - images).square()).mean() / weight.mean()
        if self.stage == "vae-fg":
            loss = loss + KL_WEIGHT * posterior.kl().mean()
        return self._optimise(loss)

    evaluate = VaeTrainer.evaluate


def load_vae(vae_dir):
    ckpt = _load(os.path.join(vae_dir, CHECKPOINT))
    vae = build_vae(ckpt["config"]["scale"])
    vae.load_state_dict(ckpt["vae"])
    return vae.eval().requires_grad_(False)


class UNetTrainer(_Trainer):
    stage = "unet"

    def __init__(self, vae, tokenizer_dir, config=None, checkpoint=None):
        super().__init__(config or Config(batch=64, lr=5e-4, warmup=100), checkpoint)
        c = self.config
        with torch.no_grad():
            latents = torch.cat([vae.encode(self.high[i:i + 256]).latent_dist.mean for i in range(0, len(self.high), 256)])
        # k: the reparametrisation that makes UPSCALER_SCALING * latent unit-variance (export applies it)
        self.vae_rescale = float(1 / (latents.std() * UPSCALER_SCALING))
        self.latents = latents / latents.std()
        tokenizer, text_encoder = text_parts(tokenizer_dir)
        unique = sorted(set(self.captions))
        with torch.no_grad():
            embeds = [text_encoder(tokenizer(t, padding="max_length", max_length=embedded.MAX_LENGTH,
                                             return_tensors="pt").input_ids)[0] for t in unique + [""]]
        self.embeds = torch.cat(embeds)
        index = {t: i for i, t in enumerate(unique)}
        self.caption_ids = torch.tensor([index[t] for t in self.captions])
        self.no_caption = len(unique)
        self.unet = build_unet(c.seed).train()
        self.ema = build_unet(c.seed).eval().requires_grad_(False)
        self.ema.load_state_dict(self.unet.state_dict())
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=c.lr)
        self.schedule = embedded.build_scheduler().alphas_cumprod
        self.low_res_scheduler = build_low_res_scheduler()
        self._restore(checkpoint, {"unet": self.unet, "ema": self.ema, "opt": self.opt})

    def state(self):
        return {**self._state({"unet": self.unet, "ema": self.ema, "opt": self.opt}),
                "vae_rescale": self.vae_rescale}

    def train_step(self):
        c = self.config
        g = _generator(c.seed, self.step)
        rows = self._batch(g)
        x0, low = self.latents[rows], self.low[rows]
        b = len(rows)
        t = torch.randint(1000, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        abar = self.schedule[t].view(b, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        level = torch.randint(TRAIN_NOISE_LEVEL + 1, (b,), generator=g)
        low = self.low_res_scheduler.add_noise(low, torch.randn(low.shape, generator=g), level)
        ids = torch.where(torch.rand(b, generator=g) < CAPTION_DROPOUT, self.no_caption, self.caption_ids[rows])
        pred = self.unet(torch.cat([x_t, low], 1), t, encoder_hidden_states=self.embeds[ids], class_labels=level).sample
        loss = self._optimise(F.mse_loss(pred, v))
        decay = min(c.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters()):
                e.lerp_(p, 1 - decay)
        return loss


class LightTrainer(_Trainer):
    stage = "light"

    def __init__(self, config=None, checkpoint=None):
        super().__init__(config or Config(batch=64, lr=2e-3), checkpoint)
        self.net = ESPCN(self.config.scale).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.config.lr)
        self._restore(checkpoint, {"net": self.net, "opt": self.opt})

    def state(self):
        return self._state({"net": self.net, "opt": self.opt})

    def train_step(self):
        rows = self._batch(_generator(self.config.seed, self.step))
        return self._optimise(F.mse_loss(self.net(self.low[rows]), self.high[rows]))

    @torch.no_grad()
    def evaluate(self):
        low, high, _ = crop_pool(self.config.scale, 256, seed=7)
        self.net.eval()
        out = self.net(low).clamp(-1, 1)
        self.net.train()
        return {"psnr": _psnr(out, high), "bicubic_psnr": _psnr(F.interpolate(low, scale_factor=self.config.scale,
                                                                             mode="bicubic").clamp(-1, 1), high)}


def _psnr(a, b):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))


def save_folder(path, vae, unet, tokenizer_tmp, dtype=torch.float16):
    """A StableDiffusionUpscalePipeline folder at ``path``: the UNet and VAE as ``dtype`` safetensors, the
    fixed text encoder as float32 (embedded.save_folder says why), SD x4's schedulers and noise levels."""
    import copy

    from diffusers import StableDiffusionUpscalePipeline

    tokenizer, text_encoder = text_parts(tokenizer_tmp)
    cast = lambda m: copy.deepcopy(m).to(dtype)  # noqa: E731
    pipe = StableDiffusionUpscalePipeline(vae=cast(vae), text_encoder=text_encoder.float(), tokenizer=tokenizer,
                                          unet=cast(unet), low_res_scheduler=build_low_res_scheduler(),
                                          scheduler=embedded.build_scheduler(), max_noise_level=MAX_NOISE_LEVEL)
    pipe.save_pretrained(path, safe_serialization=True)
    tiny.write_vocabulary(os.path.join(path, "tokenizer"), WORDS)
    return path


def export(scale, vae_dir, unet_dir, light_dir, out, tokenizer_tmp, vae_base=None):
    """Writes out/world-sr-x<scale> (a StableDiffusionUpscalePipeline folder, float16 UNet and VAE) and
    out/world-light-x<scale> (light.LightSR)."""
    vae = load_vae(vae_dir)
    ckpt = _load(os.path.join(unet_dir, CHECKPOINT))
    rescale_vae(vae, ckpt["vae_rescale"])
    vae.register_to_config(scaling_factor=UPSCALER_SCALING)
    unet = build_unet()
    unet.load_state_dict(ckpt["ema"])
    path = save_folder(os.path.join(out, f"world-sr-x{scale}"), vae, unet, tokenizer_tmp)
    net = ESPCN(scale)
    net.load_state_dict(_load(os.path.join(light_dir, CHECKPOINT))["net"])
    light = LightSR(net).save_pretrained(os.path.join(out, f"world-light-x{scale}"))
    import shutil

    sources = [*(d for d in (vae_base,) if d), vae_dir, unet_dir]
    for src, dst in [(d, path) for d in sources] + [(light_dir, light)]:  # learning curves go with the models
        stage = _load(os.path.join(src, CHECKPOINT))["stage"]
        shutil.copy(os.path.join(src, "curve.json"), os.path.join(dst, f"curve-{stage}.json"))
    return path, light


@torch.no_grad()
def patch_cost(scale, repeats=20, batches=(1, 16), steps=1):
    """Seconds, median of ``repeats``, on this machine (one thread): one guided upscaler step on B patches,
    one VAE decode of a patch, the lightweight model on a whole 32-px image, for the committed models."""
    import statistics

    from latentwire.pipelines import hybrid_sr
    from latentwire.pipelines.models import load_model

    def median(fn):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    model = load_model(str(hybrid_sr.upscaler_path(scale)))
    light = LightSR.from_pretrained(str(hybrid_sr.light_path(scale)))
    out = {"scale": scale, "threads": torch.get_num_threads()}
    cond, uncond = model.encode_prompt("a red striped circle at the top left", "")
    for b in batches:
        image = torch.zeros(b, 3, PATCH, PATCH)
        c = (cond.expand(b, -1, -1), image, torch.full((b,), NOISE_LEVEL))
        u = (uncond.expand(b, -1, -1), image, torch.full((b,), NOISE_LEVEL))
        x = torch.randn(b, embedded.LATENT_CHANNELS, PATCH, PATCH)
        sched = model.make_scheduler()
        sched.set_timesteps(20)
        t = sched.timesteps[0]
        out[f"upscaler_step_s_batch_{b}"] = median(lambda: model.predict(x, t, c, u, scheduler=sched))
    latent = torch.randn(1, embedded.LATENT_CHANNELS, PATCH, PATCH)
    out["vae_decode_patch_s"] = median(lambda: model.decode(latent, output_type="pt"))
    image = torch.zeros(1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    out["light_image_s"] = median(lambda: light.upscale(image))
    out["bicubic_image_s"] = median(lambda: F.interpolate(image, scale_factor=scale, mode="bicubic"))
    return out


def plot_curves(out, assets):
    """learning-curves.png: the training loss of every stage of every scale, from the curve-*.json files
    export copied beside the models."""
    import glob

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("vae", "vae-fg", "unet", "light")
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2))
    for ax, stage in zip(axes, stages):
        for path in sorted(glob.glob(os.path.join(assets, "world-*-x*", f"curve-{stage}.json"))):
            with open(path) as f:
                losses = json.load(f)["losses"]
            label = os.path.basename(os.path.dirname(path))
            ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], label=label)
        ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss (mean of 50 steps)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m latentwire.pipelines.hybrid_sr.train_sr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("vae", "vae-fg", "decoder", "unet", "light", "export", "cost", "curves"))
    p.add_argument("--scale", type=int, choices=(2, 4), required=True)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--vae")
    p.add_argument("--unet")
    p.add_argument("--vae-base", help="export: the vae stage a vae-fg stage started from (its curve is copied too)")
    p.add_argument("--light")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "assets"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=10 ** 9)
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tokenizer_tmp = os.path.join(a.checkpoint_dir or a.out, "tokenizer-tmp")
    if a.stage == "curves":
        print(plot_curves(os.path.join(a.out, "learning-curves.png"), a.out))
        return
    if a.stage == "cost":
        print(json.dumps(patch_cost(a.scale)))
        return
    if a.stage == "export":
        print(export(a.scale, a.vae, a.unet, a.light, a.out, tokenizer_tmp, a.vae_base))
        return
    ckpt = _load(os.path.join(a.checkpoint_dir, CHECKPOINT)) if a.resume else None
    config = Config(scale=a.scale)
    if a.stage == "vae":
        trainer = VaeTrainer(config, ckpt)
    elif a.stage in ("decoder", "vae-fg"):
        trainer = DecoderTrainer(a.vae, Config(scale=a.scale, lr=3e-4, warmup=20), ckpt, encoder=a.stage == "vae-fg")
    elif a.stage == "light":
        trainer = LightTrainer(Config(scale=a.scale, batch=64, lr=2e-3), ckpt)
    else:
        trainer = UNetTrainer(load_vae(a.vae), tokenizer_tmp, Config(scale=a.scale, batch=64, lr=5e-4, warmup=100),
                              ckpt)
    t0 = time.time()
    run(trainer, a.checkpoint_dir, steps=a.steps, minutes=a.minutes, checkpoint_minutes=a.checkpoint_minutes,
        eval_minutes=a.minutes, log=lambda m: print(m, flush=True))
    with open(os.path.join(a.checkpoint_dir, "curve.json"), "w") as f:
        json.dump({"losses": trainer.losses, "evaluations": trainer.log, "wall_s": round(time.time() - t0, 1)}, f,
                  indent=1)


if __name__ == "__main__":
    main()
