"""Measurements a search has made, kept in a JSON file: a search stopped part-way resumes where it was, and
a second search over the same candidates (another link profile, a larger budget) measures only what is new.

A measurement is a pure function of what it is keyed by: the plan's segments, the prompt count and seed, the
cloud model and what the caller adds (latentwire search: the guidance scale, the thread count), so a hit is
the value the measurement would give again.
"""
import json
import os


class Cache:
    """measure(kind, plan, fn, **key) -> fn(), or the value stored for the same kind, plan and key."""

    def __init__(self, path=None):
        self.path, self.values, self.hits = path, {}, 0
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.values = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a measurement cache ({e}); delete it to start afresh") from None
            if type(self.values) is not dict:
                raise ValueError(f"{path}: not a measurement cache (a JSON object); delete it to start afresh")

    def measure(self, kind, plan, fn, **key):
        k = json.dumps([kind, plan.to_plain()["segments"], plan.num_steps, sorted(key.items())])
        if k in self.values:
            self.hits += 1
            return self.values[k]
        value = self.values[k] = fn()
        if self.path:  # after every measurement: a search killed part-way keeps what it measured
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.values, f)
            os.replace(tmp, self.path)
        return value


def quality(cache, plan, models, cloud, n, seed, threads):
    """pipelines.evaluate.evaluate_plan's answer for ``plan`` on n prompts from ``seed``, through ``cache``: the
    one key `latentwire search` and bench/ecdiff_table.py share (the cloud model, the guidance scale and the
    thread count, on which the last digits depend)."""
    from latentwire.pipelines.evaluate import EVAL_GUIDANCE, evaluate_plan

    return cache.measure("quality", plan, lambda: evaluate_plan(plan, models, n=n, seed=seed), n=n, seed=seed,
                         cloud=cloud, guidance=EVAL_GUIDANCE, threads=threads)
