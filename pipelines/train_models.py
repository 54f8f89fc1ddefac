"""Trains the world models of pipelines/embedded.py and writes their two diffusers folders. Three stages:

    python -m latentwire.pipelines.train_models vae   --checkpoint-dir CK/vae   --minutes 6  [--resume]
    python -m latentwire.pipelines.train_models unets --checkpoint-dir CK/unets --vae CK/vae --minutes 45 [--resume]
    python -m latentwire.pipelines.train_models export --vae CK/vae --unets CK/unets --out pipelines/assets \
        [--edge-unets CK/edge]          # the edge UNet from another unets run (e.g. --kinds edge --steps N)

and two that measure the committed folders (assets/MODEL_CARD.md has their results):

    python -m latentwire.pipelines.train_models cost                      # ms per guided UNet step
    python -m latentwire.pipelines.train_models evaluate --prompts 256   # judge scores, FD: cloud, edge, ideal

A stage trains until ``--steps`` or ``--minutes`` of training (evaluation not counted) run out, whichever
is first, writing ``CK/<stage>/checkpoint.pt`` every ``--checkpoint-minutes`` and at the end. ``--resume``
continues from it: the run resumed after step k equals the run that never stopped, bit for bit, because
every random draw of step k comes from a generator seeded with (seed, k) (batch, timesteps, noise, caption
dropout; the VAE's data is world.dataset(batch, VAE_DATA_SEED + k)), and the checkpoint holds the weights,
the EMA weights and Adam's state exactly. The learning rate is constant after a warm-up, so a time budget
does not change the schedule of the steps it does take.

VAE: MSE reconstruction of fresh world renders plus KL_WEIGHT times the KL to N(0, I) (SD's VAE uses 1e-6
with perceptual and GAN losses we do not need at 32x32: the judge reads colour, outline and place).

UNets: cloud and edge trained side by side on the same batches (each its own Adam and EMA), v-prediction
(v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022) with plain MSE, timesteps uniform over the
1000 training steps, on the latents of embedded.scene_pool(per_scene, POOL_SEED) (per_scene defaults to
embedded.POOL_PER_SCENE: the set the exact denoiser of pipelines/ideal.py is exact for); the caption is
replaced by "" with probability CAPTION_DROPOUT so classifier-free guidance has an unconditional model. The latents
are scaled by 1 / their standard deviation over the pool (written to the VAE's scaling_factor).
Every ``--eval-minutes`` the EMA UNets generate EVAL_PROMPTS images each (DDIM EVAL_STEPS steps, guidance
EVAL_GUIDANCE) and the judge scores them: the learning curve in CK/unets/curve.json. EVAL_SEED and
EVAL_GUIDANCE are the runtime's (pipelines/evaluate.py, `latentwire eval`), so the curve scores the prompts
`latentwire eval` does.

This is a training script: runtime modules never import it (tests/test_imports.py checks that).
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import embedded, world
from .embedded import POOL_SEED
from .evaluate import EVAL_GUIDANCE, EVAL_SEED

CHECKPOINT = "checkpoint.pt"
CURVE = "curve.json"
VAE_DATA_SEED = 2_000_000   # VAE step k trains on world.dataset(batch, VAE_DATA_SEED + k): held out from
#                             the judge's training seeds (>= 1_000_000 + 1500) and its test seed 1
KL_WEIGHT = 1e-6
EVAL_PROMPTS = 64
EVAL_STEPS = 20
NO_CAPTION = len(world.all_scenes())  # index of "" among the precomputed text embeddings


@dataclass
class VaeConfig:
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0


@dataclass
class UNetConfig:
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 100
    ema: float = 0.995       # EMA decay, ramped as min(ema, (1 + k) / (10 + k))
    caption_dropout: float = 0.1
    per_scene: int = embedded.POOL_PER_SCENE  # training set: 48 x per_scene images
    seed: int = 0
    specs: dict = field(default_factory=lambda: {k: asdict(v) for k, v in embedded.UNETS.items()})


def _generator(seed, step):
    """The generator of every random draw of training step ``step``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _lr(config, step):
    return config.lr * min(1.0, (step + 1) / config.warmup)


def _save(path, state):
    """torch.save to a temporary file, then an atomic rename: a kill mid-write leaves the old checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; run the stage without --resume first")
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- VAE

class VaeTrainer:
    """State of the VAE stage: the model, Adam, the step count and the training seconds so far."""

    def __init__(self, config=None, checkpoint=None):
        if checkpoint is not None:
            config = VaeConfig(**checkpoint["config"])
        self.config = config or VaeConfig()
        self.vae = embedded.build_vae(self.config.seed).train()
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=self.config.lr)
        self.step, self.elapsed_s, self.log = 0, 0.0, []
        if checkpoint is not None:
            self.vae.load_state_dict(checkpoint["vae"])
            self.opt.load_state_dict(checkpoint["opt"])
            self.step, self.elapsed_s, self.log = checkpoint["step"], checkpoint["elapsed_s"], checkpoint["log"]

    def state(self):
        return {"stage": "vae", "config": asdict(self.config), "vae": self.vae.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step, "elapsed_s": self.elapsed_s, "log": self.log}

    def train_step(self):
        c, k = self.config, self.step
        g = _generator(c.seed, k)
        images, _ = world.dataset(c.batch, VAE_DATA_SEED + k)
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = self.vae.decode(z).sample
        loss = F.mse_loss(recon, images) + KL_WEIGHT * posterior.kl().mean()
        for group in self.opt.param_groups:
            group["lr"] = _lr(c, k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def evaluate(self, n=512):
        """{attribute: judge accuracy on reconstructions of n held-out renders (world seed 1)}."""
        from . import judge

        images, _ = world.dataset(n, 1)
        self.vae.eval()
        recon = self.vae.decode(self.vae.encode(images).latent_dist.mean).sample
        self.vae.train()
        scores = judge.attribute_scores(recon, world.sample_scenes(n, 1))
        scores["mse"] = F.mse_loss(recon.clamp(-1, 1), images).item()
        return scores


# ---------------------------------------------------------------- UNets

def load_vae(vae_dir):
    """The trained VAE of a vae-stage checkpoint dir (scaling_factor not yet set), eval mode, frozen."""
    vae = VaeTrainer(checkpoint=_load(os.path.join(vae_dir, CHECKPOINT))).vae
    return vae.eval().requires_grad_(False)


def text_parts(folder):
    """(tokenizer, fixed text encoder), the tokenizer's files written to ``folder``."""
    tokenizer = embedded.build_tokenizer(folder)
    return tokenizer, embedded.build_text_encoder(tokenizer.get_vocab())


@torch.no_grad()
def caption_embeddings(tokenizer, text_encoder):
    """(49, L, D): the text encoder's embeddings of the 48 captions (scene order) and of "" last."""
    ids = tokenizer(embedded.captions() + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


class UNetTrainer:
    """State of the UNet stage: the VAE (frozen) and the pool latents it gives, the caption embeddings, and
    per kind ("cloud", "edge") the UNet, its EMA copy and its Adam."""

    def __init__(self, vae, tokenizer_dir, config=None, checkpoint=None):
        import copy

        if checkpoint is not None:
            config = UNetConfig(**checkpoint["config"])
        self.config = c = config or UNetConfig()
        self.tokenizer, self.text_encoder = text_parts(tokenizer_dir)
        self.embeddings = caption_embeddings(self.tokenizer, self.text_encoder)
        self.vae = vae
        images, self.ids = embedded.scene_pool(c.per_scene, POOL_SEED)
        raw = embedded.encode_images(vae, images, scaling_factor=1.0)  # unscaled posterior means
        scaling = 1.0 / raw.std().item() if checkpoint is None else checkpoint["scaling_factor"]
        vae.register_to_config(scaling_factor=scaling)
        self.latents = raw * scaling  # (48 per_scene, 4, 8, 8), unit standard deviation
        alphas_cumprod = embedded.build_scheduler().alphas_cumprod
        self.abar = alphas_cumprod.double()
        self.unets, self.emas, self.opts = {}, {}, {}
        for kind, spec in c.specs.items():
            unet = embedded.build_unet(kind, c.seed, embedded.UNetSpec(**{**spec, "channels": tuple(spec["channels"])}))
            self.unets[kind] = unet.train()
            self.emas[kind] = copy.deepcopy(unet).eval().requires_grad_(False)
            self.opts[kind] = torch.optim.Adam(unet.parameters(), lr=c.lr)
        self.step, self.elapsed_s, self.curve = 0, 0.0, []
        if checkpoint is not None:
            for kind in self.unets:
                self.unets[kind].load_state_dict(checkpoint["unets"][kind])
                self.emas[kind].load_state_dict(checkpoint["emas"][kind])
                self.opts[kind].load_state_dict(checkpoint["opts"][kind])
            self.step, self.elapsed_s, self.curve = checkpoint["step"], checkpoint["elapsed_s"], checkpoint["curve"]

    def state(self):
        return {"stage": "unets", "config": asdict(self.config), "scaling_factor": self.vae.config.scaling_factor,
                "unets": {k: u.state_dict() for k, u in self.unets.items()},
                "emas": {k: u.state_dict() for k, u in self.emas.items()},
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "step": self.step, "elapsed_s": self.elapsed_s, "curve": self.curve}

    def train_step(self):
        c, k = self.config, self.step
        g = _generator(c.seed, k)
        idx = torch.randint(0, len(self.latents), (c.batch,), generator=g)
        x0 = self.latents[idx]
        caption = torch.where(torch.rand(c.batch, generator=g) < c.caption_dropout, NO_CAPTION, self.ids[idx])
        text = self.embeddings[caption]
        t = torch.randint(0, len(self.abar), (c.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = self.abar[t].float().reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM eq. 4
        v = a.sqrt() * eps - (1 - a).sqrt() * x0    # the v-prediction target
        decay = min(c.ema, (1 + k) / (10 + k))
        losses = {}
        for kind, unet in self.unets.items():
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=text).sample, v)
            opt = self.opts[kind]
            for group in opt.param_groups:
                group["lr"] = _lr(c, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(self.emas[kind].parameters(), unet.parameters()):
                    e.lerp_(p, 1 - decay)
            losses[kind] = loss.item()
        self.step += 1
        return losses

    def model(self, kind):
        """A StableDiffusionModel of the EMA UNet ``kind`` over the shared parts (in memory)."""
        from .models.sd import StableDiffusionModel

        sched = embedded.build_scheduler()
        return StableDiffusionModel(self.tokenizer, self.text_encoder, self.emas[kind], self.vae,
                                    {**sched.config, "_class_name": type(sched).__name__})

    def evaluate(self, n=EVAL_PROMPTS, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE):
        """{kind: {attribute: judge accuracy, "fd": Frechet distance to renders}} of EMA generations."""
        scenes = world.sample_scenes(n, EVAL_SEED)
        reference = world.render(scenes, EVAL_SEED)
        out = {}
        for kind in self.unets:
            images = embedded.sample(self.model(kind), scenes, steps=steps, guidance=guidance, seed=EVAL_SEED)
            out[kind] = evaluate_images(images, scenes, reference)
        return out


def evaluate_images(images, scenes, reference):
    """{colour, shape, position, all, mean (of the three), fd} of generated images against their prompts."""
    from . import judge

    scores = judge.attribute_scores(images, scenes)
    scores["mean"] = sum(scores[a] for a in world.ATTRIBUTES) / len(world.ATTRIBUTES)
    scores["fd"] = judge.frechet_distance(images, reference)
    return scores


# ---------------------------------------------------------------- driver

def run(trainer, checkpoint_dir, *, steps, minutes, checkpoint_minutes, eval_minutes=None, log=print):
    """Train ``trainer`` until it has done ``steps`` steps or ``minutes`` of training in all (across resumes);
    checkpoint every ``checkpoint_minutes`` and at the end; evaluate every ``eval_minutes`` (and at the end)
    if given, appending to the trainer's curve/log. Returns the trainer."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, CHECKPOINT)
    last_ckpt = last_eval = trainer.elapsed_s

    def evaluate():
        t0 = time.perf_counter()
        scores = trainer.evaluate()
        entry = {"step": trainer.step, "train_s": round(trainer.elapsed_s, 1), "scores": scores,
                 "eval_s": round(time.perf_counter() - t0, 1)}
        (trainer.curve if hasattr(trainer, "curve") else trainer.log).append(entry)
        log(json.dumps(entry))
        if hasattr(trainer, "curve"):
            with open(os.path.join(checkpoint_dir, CURVE), "w") as f:
                json.dump(trainer.curve, f, indent=1)

    while trainer.step < steps and trainer.elapsed_s < 60 * minutes:
        t0 = time.perf_counter()
        loss = trainer.train_step()
        trainer.elapsed_s += time.perf_counter() - t0
        if trainer.step % 50 == 0:
            log(f"step {trainer.step} {trainer.elapsed_s:.0f}s loss {loss}")
        if eval_minutes is not None and trainer.elapsed_s - last_eval >= 60 * eval_minutes:
            evaluate()
            last_eval = trainer.elapsed_s
        if trainer.elapsed_s - last_ckpt >= 60 * checkpoint_minutes:
            _save(path, trainer.state())
            last_ckpt = trainer.elapsed_s
    _save(path, trainer.state())
    if eval_minutes is not None:
        evaluate()
        _save(path, trainer.state())
    return trainer


def export(vae_dir, unets_dirs, out, tokenizer_tmp):
    """Writes out/world-sd-<kind> for kind in unets_dirs ({kind: unets-stage checkpoint dir}) from the
    EMA UNet of that kind in that checkpoint, over the vae stage's VAE and the fixed text encoder."""
    vae = load_vae(vae_dir)
    tokenizer, text_encoder = text_parts(tokenizer_tmp)
    paths, scaling = {}, None
    for kind, unets_dir in unets_dirs.items():
        ckpt = _load(os.path.join(unets_dir, CHECKPOINT))
        if kind not in ckpt["emas"]:
            raise ValueError(f"{unets_dir} has no {kind} UNet (it trained {', '.join(ckpt['emas'])})")
        if scaling is not None and ckpt["scaling_factor"] != scaling:
            raise ValueError(f"{unets_dir} was trained on latents scaled by {ckpt['scaling_factor']}, not "
                             f"{scaling}: not the same VAE, the folders would not share a latent space")
        scaling = ckpt["scaling_factor"]
        vae.register_to_config(scaling_factor=scaling)
        spec = UNetConfig(**ckpt["config"]).specs[kind]
        unet = embedded.build_unet(kind, spec=embedded.UNetSpec(**{**spec, "channels": tuple(spec["channels"])}))
        unet.load_state_dict(ckpt["emas"][kind])
        paths[kind] = embedded.save_folder(os.path.join(out, f"world-sd-{kind}"), tokenizer, text_encoder, vae,
                                           unet, embedded.build_scheduler())
    return paths


def unet_cost(paths=(embedded.CLOUD_PATH, embedded.EDGE_PATH), repeats=50):
    """{folder: median seconds of one batch-2 UNet forward (one guided step: uncond and cond rows)} on the
    current thread count, after 5 warm-up calls; models loaded as the runtime loads them."""
    from .models.sd import StableDiffusionModel

    out = {}
    for path in paths:
        model = StableDiffusionModel.from_pretrained(path)
        sched = model.make_scheduler()
        sched.set_timesteps(20)
        x = model.initial_noise(0, scheduler=sched)
        cond, uncond = model.encode_prompt("a red circle at the top left")
        times = []
        for i in range(5 + repeats):
            t0 = time.perf_counter()
            model.predict(x, sched.timesteps[i % 20], cond, uncond, scheduler=sched)
            times.append(time.perf_counter() - t0)
        out[str(path)] = sorted(times[5:])[repeats // 2]
    return out


def evaluate_folders(n=256, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, seed=EVAL_SEED, ideal=True):
    """{"cloud" | "edge" | "ideal": evaluate_images scores} of each committed model's generations for
    world.sample_scenes(n, seed), against renders of the same scenes."""
    from .ideal import IdealDenoiser
    from .models.sd import StableDiffusionModel

    scenes = world.sample_scenes(n, seed)
    reference = world.render(scenes, seed)
    models = {"cloud": StableDiffusionModel.from_pretrained(embedded.CLOUD_PATH),
              "edge": StableDiffusionModel.from_pretrained(embedded.EDGE_PATH)}
    if ideal:
        models["ideal"] = IdealDenoiser.from_pretrained(embedded.CLOUD_PATH)
    out = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        images = embedded.sample(model, scenes, steps=steps, guidance=guidance, seed=seed)
        out[name] = {**evaluate_images(images, scenes, reference), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main(argv=None):
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="python -m latentwire.pipelines.train_models", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=("vae", "unets", "export", "cost", "evaluate"),
                   help="cost: per-step CPU time of the committed UNets; evaluate: judge scores of the committed "
                        "cloud, edge and ideal models")
    p.add_argument("--checkpoint-dir", help="where the stage's checkpoint.pt (and curve.json) go")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/checkpoint.pt")
    p.add_argument("--steps", type=int, default=10 ** 9, help="stop after this many steps in all")
    p.add_argument("--minutes", type=float, default=60.0, help="stop after this much training time in all")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--eval-minutes", type=float, default=5.0, help="unets: learning-curve evaluation interval")
    p.add_argument("--vae", help="unets, export: the vae stage's checkpoint dir")
    p.add_argument("--unets", help="export: the unets stage's checkpoint dir")
    p.add_argument("--edge-unets", help="export: take the edge UNet from this unets checkpoint dir instead")
    p.add_argument("--kinds", default="cloud,edge", help="unets: which UNets to train (a fresh run only)")
    p.add_argument("--out", default=str(embedded.ASSETS), help="export: the folder the two model folders go in")
    p.add_argument("--prompts", type=int, default=256, help="evaluate: how many prompts")
    p.add_argument("--sample-steps", type=int, default=EVAL_STEPS, help="evaluate: DDIM steps")
    p.add_argument("--guidance", type=float, default=EVAL_GUIDANCE, help="evaluate: classifier-free guidance")
    p.add_argument("--no-ideal", action="store_true", help="evaluate: skip the ideal denoiser (the slowest)")
    args = p.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    if args.stage == "cost":
        log(json.dumps({k: f"{1000 * v:.1f} ms" for k, v in unet_cost().items()}))
        return
    if args.stage == "evaluate":
        log(json.dumps(evaluate_folders(args.prompts, args.sample_steps, args.guidance, ideal=not args.no_ideal), indent=1))
        return
    if args.stage == "export":
        if not (args.vae and args.unets):
            raise SystemExit("export needs --vae and --unets checkpoint dirs")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            dirs = {"cloud": args.unets, "edge": args.edge_unets or args.unets}
            log(json.dumps({k: str(v) for k, v in export(args.vae, dirs, args.out, tmp).items()}))
        return
    if not args.checkpoint_dir:
        raise SystemExit(f"{args.stage} needs --checkpoint-dir")
    ckpt = _load(os.path.join(args.checkpoint_dir, CHECKPOINT)) if args.resume else None
    if args.stage == "vae":
        trainer = VaeTrainer(checkpoint=ckpt)
        run(trainer, args.checkpoint_dir, steps=args.steps, minutes=args.minutes,
            checkpoint_minutes=args.checkpoint_minutes, log=log)
        log(json.dumps({"step": trainer.step, "train_s": round(trainer.elapsed_s, 1), "eval": trainer.evaluate()}))
    else:
        if not args.vae:
            raise SystemExit("unets needs --vae, the vae stage's checkpoint dir")
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        kinds = args.kinds.split(",")
        unknown = set(kinds) - set(embedded.UNETS)
        if unknown:
            raise SystemExit(f"--kinds must name some of {', '.join(embedded.UNETS)}, got {args.kinds!r}")
        config = UNetConfig(specs={k: asdict(embedded.UNETS[k]) for k in kinds})
        trainer = UNetTrainer(load_vae(args.vae), os.path.join(args.checkpoint_dir, "tokenizer"), config=config,
                              checkpoint=ckpt)
        run(trainer, args.checkpoint_dir, steps=args.steps, minutes=args.minutes,
            checkpoint_minutes=args.checkpoint_minutes, eval_minutes=args.eval_minutes, log=log)


if __name__ == "__main__":
    main()
