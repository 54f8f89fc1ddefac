"""Link emulation and the choice of a latent codec per link.

``Link`` is a one-way latency and a bandwidth (one each way, if they differ); the edge client delays each
message it sends and receives by ``transfer_s(bytes)`` (``down=True`` for what it receives), so benchmarks
report handoff and end-to-end times per link on loopback; ``parse_link`` reads the cost model's link
profiles too (scheduler/cost/data/links). ``choose_codec`` picks, for a link and an error budget, the codec with the least
encode + transfer + decode time, from timings measured on a latent of the size that will travel.
"""
import statistics
import time
from dataclasses import dataclass

import torch

from latentwire.protocol import decode, encode, wire_bytes


@dataclass(frozen=True)
class Link:
    """An emulated network link: bandwidth in Mbit/s (edge to cloud; ``down_mbit_per_s`` cloud to edge,
    None: the same), one-way latency in ms."""

    name: str
    mbit_per_s: float
    latency_ms: float
    down_mbit_per_s: float = None

    def __post_init__(self):
        down = self.mbit_per_s if self.down_mbit_per_s is None else self.down_mbit_per_s
        if not (self.mbit_per_s > 0 and down > 0 and self.latency_ms >= 0):
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 (each way) and latency >= 0, got "
                             f"{self.mbit_per_s} Mbit/s up, {down} Mbit/s down, {self.latency_ms} ms")

    def transfer_s(self, nbytes, down=False):
        """Seconds from the first byte sent to the last received, for one message of nbytes (down: from
        the cloud to the edge)."""
        mbit = self.down_mbit_per_s if down and self.down_mbit_per_s is not None else self.mbit_per_s
        return self.latency_ms / 1e3 + 8 * nbytes / (mbit * 1e6)

    @classmethod
    def from_profile(cls, profile):
        """The emulated link of a cost-model LinkProfile (scheduler/cost/profiles.py): its bandwidths, and
        half its round-trip time each way."""
        for f in ("up_mbit_s", "down_mbit_s", "rtt_ms"):
            profile.need(f)
        return cls(profile.name, profile.up_mbit_s, profile.rtt_ms / 2, profile.down_mbit_s)


PROFILES = {
    "10mbit-50ms": Link("10mbit-50ms", 10, 50),
    "100mbit-20ms": Link("100mbit-20ms", 100, 20),
    "1gbit-1ms": Link("1gbit-1ms", 1000, 1),
}
CANDIDATES = [("fp32", 0), ("fp16", 0), ("fp16", 1), ("bf16", 1), ("int8", 0), ("int8", 1), ("int8", 3),
              ("int4", 0), ("int4", 1)]
DEFAULT_ERROR_BUDGET = 0.01  # RMSE / std of the latent: int8's error on a latent-like tensor is ~0.004


def parse_link(text):
    """A profile name from PROFILES, 'MBIT,MS' (e.g. '50,30'), or a cost-model link profile: a name from
    the package data (scheduler/cost/data/links) or a .json file's path."""
    if text in PROFILES:
        return PROFILES[text]
    from latentwire.scheduler.cost.profiles import ProfileError, list_profiles, load_link

    if text in list_profiles()["links"] or text.endswith(".json"):
        try:
            return Link.from_profile(load_link(text))
        except ProfileError as e:
            raise ValueError(f"link {text!r}: {e}") from None
    try:
        mbit, ms = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"link {text!r}: give one of {', '.join([*PROFILES, *list_profiles()['links']])}, a link "
                         "profile's .json path, or 'MBIT_PER_S,LATENCY_MS'") from None
    return Link(text, mbit, ms)


@dataclass(frozen=True)
class CodecCost:
    codec: str
    level: int
    nbytes: int
    encode_s: float
    decode_s: float
    rel_rmse: float  # RMSE of the round trip / std of the latent

    def handoff_s(self, link):
        return self.encode_s + link.transfer_s(self.nbytes) + self.decode_s


def measure_codecs(latent, candidates=CANDIDATES, repeats=5):
    """CodecCost of each candidate on this latent: bytes, median encode and decode times, error."""
    out = []
    std = latent.float().std().item() or 1.0
    for codec, level in candidates:
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            frames = encode(latent, codec, level)
            t1 = time.perf_counter()
            y = decode([bytes(f) for f in frames])
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        rmse = (y.double() - latent.double()).pow(2).mean().sqrt().item()
        out.append(CodecCost(codec, level, wire_bytes(frames), statistics.median(enc), statistics.median(dec),
                             rmse / std))
    return out


def choose_codec(costs, link, error_budget=DEFAULT_ERROR_BUDGET):
    """(codec, level) with the least encode + transfer + decode time on ``link`` among those within the
    error budget."""
    ok = [c for c in costs if c.rel_rmse <= error_budget]
    if not ok:
        raise ValueError(f"no codec meets the error budget {error_budget} (best: "
                         f"{min(c.rel_rmse for c in costs):.2e}); raise the budget or add a finer codec")
    best = min(ok, key=lambda c: c.handoff_s(link))
    return best.codec, best.level


def sample_latent(model, seed=0):
    """A latent of the size that will travel, to time the codecs on: the model's x_T for a seed."""
    return model.initial_noise(seed, generator_device="cpu").to(torch.float32)
