"""DiffusionX's noise-level predictor: the refine strength the cloud starts the final from, chosen from what
an edge knows at run time (the prompt's change since the preview, the cloud's load, the link).

Two parts, each plain:

- **quality**: P(the refined image shows every attribute the final prompt names | features, strength), a
  logistic model over FEATURES: the text-embedding distance between the preview's prompt and the final one
  (1 - cosine of their mean-pooled embeddings, from the edge's own text encoder: the shared text space), the
  word edits between them, the strength, and their products. Trained on pairs latentwire generates from the
  world (train_predictor.py), weights shipped as package data (predictor.json, its card PREDICTOR_CARD.md).
- **the objective**, written down: over the strengths in STRENGTHS, the least

      J(s) = latency(s)  +  u / (1 - u) * cloud_gpu_s(s)  +  (1 - P(s)) * miss_s

  latency(s): the final's predicted time (scheduler/cost: the preview's x_0 up, the cloud's steps, the image
  down, with the M/D/1 queue wait at utilisation u). u / (1 - u) * cloud_gpu_s: what this request's GPU-seconds
  cost everyone else queued behind it (an M/M/1 queue's wait grows as u / (1 - u)), so more load makes cloud
  work dearer. (1 - P(s)) * miss_s: a final that misses an attribute the person asked for costs them miss_s
  (they notice and start over: more rounds and another final). miss_s = DEFAULT_MISS_S is an assumption, not
  a measurement: it is the exchange rate between quality and seconds, and `--miss-s` sets it. So an unchanged
  prompt gets a light refine, a changed one a deeper one, and under load the choice moves to less cloud work,
  at the quality P says.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FEATURES = ("bias", "embed_distance", "word_edits", "strength", "strength*embed_distance", "strength*word_edits",
            "strength^2")
WEIGHTS_PATH = Path(__file__).with_name("predictor.json")
DEFAULT_MISS_S = 10.0  # ASSUMED: what a final missing an attribute costs the person (see the module doc)
MAX_LOAD = 0.99  # utilisation is clipped here: at 1 the load term is infinite and every choice is the least work


class PredictorError(ValueError):
    """Inputs the predictor cannot use: the text says which and what to give."""


def word_edits(a, b):
    """The word-level Levenshtein distance between two prompts (insertions, deletions, substitutions)."""
    x, y = a.split(), b.split()
    row = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, wy in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wx != wy))
    return row[-1]


def embed_distance(model, a, b):
    """1 - cosine similarity of the two prompts' mean-pooled text embeddings from ``model``'s text encoder."""
    ea, eb = (model.encode_prompt(p)[0].float().mean(dim=1).flatten() for p in (a, b))
    return float(1 - torch.nn.functional.cosine_similarity(ea, eb, dim=0))


def features(distance, edits, strength):
    """The model's input row for one (prompt change, strength), in FEATURES order."""
    return [1.0, distance, float(edits), strength, strength * distance, strength * edits, strength * strength]


@dataclass(frozen=True)
class Choice:
    """The strength chosen, and why: per candidate strength its P, latency, load term and J."""

    strength: float
    embed_distance: float
    word_edits: int
    load: float
    table: tuple  # ({"strength", "p_success", "latency_s", "cloud_gpu_s", "load_term_s", "objective_s"}, ...)

    def to_plain(self):
        row = next(r for r in self.table if r["strength"] == self.strength)
        return {"strength": self.strength, "p_success": row["p_success"], "latency_s": row["latency_s"],
                "cloud_gpu_s": row["cloud_gpu_s"], "embed_distance": self.embed_distance,
                "word_edits": self.word_edits, "load": self.load, "candidates": list(self.table)}


class NoisePredictor:
    """weights: one per FEATURES name. cost(strength, load) -> (latency_s, cloud_gpu_s) of the final at that
    strength (strength_costs() builds one from device and link profiles). miss_s: the objective's price of a
    final that misses an attribute, in seconds."""

    def __init__(self, weights, cost, miss_s=DEFAULT_MISS_S):
        if sorted(weights) != sorted(FEATURES):
            raise PredictorError(f"weights: one per feature {', '.join(FEATURES)}; got {', '.join(sorted(weights))}")
        if not (type(miss_s) in (int, float) and miss_s >= 0):
            raise PredictorError(f"miss_s {miss_s!r}: seconds >= 0")
        self.weights = [float(weights[f]) for f in FEATURES]
        self.cost, self.miss_s = cost, float(miss_s)

    @classmethod
    def load(cls, cost, path=WEIGHTS_PATH, miss_s=DEFAULT_MISS_S):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PredictorError(f"{path}: no predictor weights ({e}); train them with `python -m "
                                 "latentwire.pipelines.diffusionx.train_predictor`") from None
        if type(d) is not dict or type(d.get("weights")) is not dict or not all(
                type(v) in (int, float) and math.isfinite(v) for v in d["weights"].values()):
            raise PredictorError(f"{path}: not predictor weights (a JSON object with a 'weights' map of finite "
                                 "numbers, as train_predictor writes)")
        return cls(d["weights"], cost, miss_s)

    def p_success(self, distance, edits, strength):
        z = sum(w * x for w, x in zip(self.weights, features(distance, edits, strength)))
        return 1 / (1 + math.exp(-max(-60.0, min(60.0, z))))

    def choose(self, distance, edits, load=0.0):
        """The strength of least J (the module doc) -> Choice."""
        if not (type(load) in (int, float) and 0 <= load <= 1):
            raise PredictorError(f"load {load!r}: the cloud's utilisation in [0, 1]")
        u = min(float(load), MAX_LOAD)
        rows = []
        for s in STRENGTHS:
            latency, gpu = self.cost(s, u)
            p = self.p_success(distance, edits, s)
            term = u / (1 - u) * gpu
            rows.append({"strength": s, "p_success": round(p, 4), "latency_s": round(latency, 4),
                         "cloud_gpu_s": round(gpu, 4), "load_term_s": round(term, 4),
                         "objective_s": round(latency + term + (1 - p) * self.miss_s, 4)})
        best = min(rows, key=lambda r: (r["objective_s"], r["strength"]))
        return Choice(best["strength"], round(distance, 6), edits, float(load), tuple(rows))

    def choose_for(self, model, before, after, load=0.0):
        """choose() from two prompts, their distance from ``model``'s text encoder."""
        return self.choose(embed_distance(model, before, after), word_edits(before, after), load)


def strength_costs(steps, cloud, edge, link):
    """cost(strength, load) -> (latency_s, cloud_gpu_s) of a final at that strength: the preview-refine plan's
    cloud part (its x_0 up, the cloud's steps and queue wait, the latent down and the edge's decode) as
    scheduler/cost predicts it, the preview's own edge steps left out (the preview is already made)."""
    from latentwire.scheduler import make
    from latentwire.scheduler.cost.model import predict

    cache = {}

    def cost(strength, load):
        key = (strength, round(load, 6))
        if key not in cache:
            c = predict(make("preview-refine", steps, strength=strength), cloud, edge, link, load=load)
            cache[key] = (c.latency_s - c.parts["edge_steps"], c.cloud_gpu_s)
        return cache[key]
    return cost


def fit(rows, labels, *, l2=1e-3, iterations=200):
    """Logistic regression of labels (0/1) on feature rows (features()) by L-BFGS -> {feature: weight}.
    Features are standardized inside and the weights given back on the raw scale."""
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-9)
    mu[0], sd[0] = 0.0, 1.0  # the bias column stays
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y) + l2 * (w[1:] ** 2).sum()
        value.backward()
        return value
    opt.step(loss)
    raw = (w / sd).detach()
    raw[0] = w[0].detach() - (w[1:] * mu[1:] / sd[1:]).sum().detach()
    return {f: float(v) for f, v in zip(FEATURES, raw)}


def log_loss(weights, rows, labels):
    """Mean binary cross-entropy of the model with ``weights`` on rows and labels (the card's curve)."""
    p = NoisePredictor(weights, cost=None)
    eps = 1e-9
    total = 0.0
    for row, y in zip(rows, labels):
        q = p.p_success(row[1], row[2], row[3])
        total -= y * math.log(q + eps) + (1 - y) * math.log(1 - q + eps)
    return total / max(1, len(rows))


# The profiles the predictor's costs come from unless told otherwise: the DiffusionX setting (SD v1.5 in the
# cloud; an edge device) as the cost model has it. The A100 profile has no text-encoding figure: assumed 0.
DEFAULT_CLOUD, DEFAULT_EDGE, DEFAULT_LINK = "sd-v1-5@a100", "bk-sdm-tiny@galaxy-s24", "lte"
DEFAULT_ASSUME = ("cloud.text_encode_s=0",)


def from_profiles(steps, cloud=DEFAULT_CLOUD, edge=DEFAULT_EDGE, link=DEFAULT_LINK, assume=DEFAULT_ASSUME,
                  path=WEIGHTS_PATH, miss_s=DEFAULT_MISS_S):
    """The shipped predictor with its costs from named (or PATH.json) device and link profiles -> NoisePredictor."""
    from latentwire.scheduler.cost.profiles import apply_assumptions, load_device, load_link

    cloud_p, edge_p, _ = apply_assumptions(list(assume), load_device(cloud), load_device(edge))
    return NoisePredictor.load(strength_costs(steps, cloud_p, edge_p, load_link(link)), path, miss_s)
