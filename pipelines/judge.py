"""The judge: a small CNN that reads the attributes of a world image (pipelines/world.py), and the two scores
built on it, our stand-ins for CLIP-score and FID on a world that CLIP and Inception know nothing about.

    load_judge()                          -> Judge (eval mode), the committed weights in assets/judge.pt
    attribute_accuracy(images, scenes)    -> (share of prompted attributes read right, share of images all right)
    attribute_scores(images, scenes)      -> {"colour": .., "shape": .., "position": .., "all": ..}
    frechet_distance(images_a, images_b)  -> Frechet distance between Gaussians fitted to judge features
    train_judge(steps, batch_size, seed)  -> a freshly trained Judge

Network: three 3x3 conv + ReLU + 2x2 max-pool stages (3 -> 16 -> 32 -> 32 channels, 32 -> 4 px), flatten
(512), a 64-unit ReLU layer (``features``: the penultimate layer, what the Frechet distance is computed on),
then one linear head per attribute. 47k float32 parameters, a 0.2 MB state_dict. No dropout and no batch
norm, so train and eval mode compute the same function and every score is a deterministic function of the
images (on a given thread count: a different count may change float rounding, not the labels).

Training draws an unlimited stream of fresh renders: step k uses ``world.dataset(batch_size,
FIRST_TRAINING_SEED + k)``, so any world seed below FIRST_TRAINING_SEED is held out. Each training image is
augmented, dimmed by a gain in [MIN_GAIN, 1] above the black background and given Gaussian noise of a
standard deviation in [0, MAX_NOISE_STD] (clamped back to [-1, 1]): a generator's images are never the exact
saturated renders, and the judge should read the attributes a viewer would read, not fail on a slightly dark
or grainy pixel. Held-out accuracy is measured on clean renders.

The committed weights were written by (2 cores, torch.set_num_threads(1), torch 2.13 CPU):

    /tmp/lwenv/bin/python -m latentwire.pipelines.train_judge --out pipelines/assets/judge.pt

in 102 s of training, 108 s in all (the script's defaults: 1500 steps of 64 images, seed 0; 87 ms a step);
held-out on 4000 clean renders of world seed 1: colour, shape, position and all attributes 1.0000 each.
After 300 steps it was at shape 0.986: the shape head is the last to converge.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import world

JUDGE_PATH = Path(__file__).parent / "assets" / "judge.pt"
FEATURE_DIM = 64
FIRST_TRAINING_SEED = 1_000_000  # training step k renders world seed FIRST_TRAINING_SEED + k
MIN_GAIN = 0.7        # training augmentation: shape colour scaled by a gain in [MIN_GAIN, 1]
MAX_NOISE_STD = 0.15  # training augmentation: additive noise std in [0, MAX_NOISE_STD] (image range is 2)
EVAL_BATCH = 512      # images per judge forward when scoring: bounds the activations at ~35 MB
IMAGE_SHAPE = (3, world.IMAGE_SIZE, world.IMAGE_SIZE)


class Judge(nn.Module):
    """images (N, 3, 32, 32) float32 in [-1, 1] -> one logit tensor (N, len(vocabulary)) per attribute,
    in world.ATTRIBUTES order."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (16, 16, 16)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (32, 8, 8)
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (32, 4, 4)
            nn.Flatten(),  # 512: kept spatial (no global pooling) so the quadrant is readable
            nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, len(world.VOCABULARIES[name])) for name in world.ATTRIBUTES)

    def features(self, images):
        """(N, 64) float32: the penultimate layer."""
        return self.body(images)

    def forward(self, images):
        f = self.features(images)
        return [head(f) for head in self.heads]


def load_judge(path=JUDGE_PATH):
    """The judge with the weights in ``path`` (a state_dict written by train_judge.py), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no judge weights at {path}; train them with "
                                f"`python -m latentwire.pipelines.train_judge --out {path}`")
    judge = Judge()
    judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return judge.eval()


def _checked(images, name):
    """images as float32 clamped to [-1, 1]; raises ValueError if they are not (N, 3, 32, 32) finite floats."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor (N, {', '.join(map(str, IMAGE_SHAPE))}), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floats in [-1, 1], got dtype {images.dtype}; convert uint8 pixels "
                         "with x / 127.5 - 1")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds NaN or inf values")
    # A VAE decodes slightly past [-1, 1]; the pixels anyone sees are clamped (diffusers' postprocess does
    # (x / 2 + 0.5).clamp(0, 1)), so the judge reads those.
    return images.detach().to("cpu", torch.float32).clamp(-1, 1)


@torch.no_grad()
def _run(images, judge, fn):
    return torch.cat([fn(judge, images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)])


def predict(images, judge=None):
    """(N, 3) int64: the judge's reading of each image, indices into world.VOCABULARIES in ATTRIBUTES order."""
    judge = load_judge() if judge is None else judge.eval()
    images = _checked(images, "images")
    return _run(images, judge, lambda j, x: torch.stack([lg.argmax(1) for lg in j(x)], 1))


def features(images, judge=None):
    """(N, 64) float32 judge features of ``images``."""
    judge = load_judge() if judge is None else judge.eval()
    return _run(_checked(images, "images"), judge, lambda j, x: j.features(x))


def attribute_scores(images, scenes, judge=None):
    """{attribute: share of images where the judge reads the prompted value, "all": share with every one
    right}. images (N, 3, 32, 32) in [-1, 1]; scenes: the N world.Scene they were prompted with."""
    if len(scenes) != len(images):
        raise ValueError(f"need one scene per image: got {len(scenes)} scenes for {len(images)} images")
    if len(scenes) == 0:
        raise ValueError("need at least one image to score")
    target = torch.tensor([sc.labels() for sc in scenes], dtype=torch.int64)
    right = predict(images, judge) == target  # (N, 3)
    scores = {name: right[:, j].double().mean().item() for j, name in enumerate(world.ATTRIBUTES)}
    scores["all"] = right.all(1).double().mean().item()
    return scores


def attribute_accuracy(images, scenes, judge=None):
    """(share of the N x 3 prompted attributes the judge finds, share of the N images with all 3 found).
    Chance, for images that carry no information: (1/4 + 1/3 + 1/4) / 3 = 0.28 and 1/48 = 0.021."""
    s = attribute_scores(images, scenes, judge)
    return sum(s[name] for name in world.ATTRIBUTES) / len(world.ATTRIBUTES), s["all"]


def _sqrtm_psd(s):
    """Symmetric square root of a symmetric positive semi-definite float64 matrix; rounding's tiny negative
    eigenvalues are taken as 0."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_of_features(fa, fb):
    """Frechet distance between N(mu_a, S_a) and N(mu_b, S_b) fitted to feature rows fa (Na, D), fb (Nb, D):

        d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))     (Dowson & Landau 1982; FID, Heusel 2017)

    in float64. S_a S_b is not symmetric, but it is similar to M = S_a^(1/2) S_b S_a^(1/2) (conjugate by
    S_a^(1/2)), which is symmetric PSD, so Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of M): two eigh calls,
    no general matrix square root (scipy's sqrtm, which FID code uses, is not installed here)."""
    for name, f in (("fa", fa), ("fb", fb)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2 rows for a covariance, got {tuple(f.shape)}")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"fa and fb must have the same feature width, got {fa.shape[1]} and {fb.shape[1]}")
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    s_a, s_b = torch.cov(fa.T), torch.cov(fb.T)  # (D, D), unbiased (N - 1)
    r = _sqrtm_psd(s_a)
    m = r @ s_b @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return max(d2.item(), 0.0)  # identical inputs can round to -1e-15


def frechet_distance(images_a, images_b, judge=None):
    """Our FID: the Frechet distance between judge features (64-d) of two image sets, each (N, 3, 32, 32)
    in [-1, 1] with N >= 2 (a few hundred or more for a stable figure: the estimate is biased upwards by
    roughly the feature variance times D / N)."""
    judge = load_judge() if judge is None else judge
    return frechet_distance_of_features(features(images_a, judge), features(images_b, judge))


def _augment(images, g):
    """Training-only: gain in [MIN_GAIN, 1] above black, plus N(0, std^2) noise, std in [0, MAX_NOISE_STD]."""
    n = len(images)
    gain = MIN_GAIN + (1 - MIN_GAIN) * torch.rand((n, 1, 1, 1), generator=g)
    std = MAX_NOISE_STD * torch.rand((n, 1, 1, 1), generator=g)
    noise = std * torch.randn(images.shape, generator=g)
    return ((images + 1) * gain - 1 + noise).clamp(-1, 1)


def train_judge(steps=1500, batch_size=64, seed=0, lr=3e-3, log=None):
    """A Judge trained by Adam on ``steps`` batches of fresh augmented renders (world seeds
    FIRST_TRAINING_SEED + k) with the summed cross-entropy of the three heads; learning rate ``lr`` decayed
    to 0 on a cosine. ``seed`` picks the initial weights and the augmentation; the global RNG is left as it
    was. Deterministic for given arguments and thread count. ``log(step, loss)`` is called every 100 steps."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    judge.train()
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * k / steps))
        images, labels = world.dataset(batch_size, FIRST_TRAINING_SEED + k)
        logits = judge(_augment(images, g))
        loss = sum(F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (k % 100 == 0 or k == steps - 1):
            log(k, loss.item())
    return judge.eval()
