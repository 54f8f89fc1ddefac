"""Shared fixtures of the pytest benchmarks: one core, latent shapes and contents, and a GB/s summary.

Every benchmark uses ``benchmark.pedantic`` with rounds from ``rounds_for`` so that a run is bounded
(the video latent gets few rounds), groups its rows per shape and content with the same-run baseline,
and calls ``record`` after timing so that GB/s (float32 bytes / median), bytes on the wire, bits per
value and RMSE land in ``extra_info`` (saved by --benchmark-json) and in the summary printed at the end.
"""
import sys
from pathlib import Path

import pytest

# The benchmarks and report.py share cases.py and anchors.py; pytest runs with --import-mode=importlib
# (pytest.ini), which does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

import cases  # noqa: E402

# Rounds: about this many latent elements per benchmark (16 MiB of float32), between the bounds.
ELEMENTS_PER_BENCHMARK = 1 << 22
MIN_ROUNDS, MAX_ROUNDS = 5, 100
_rows = []  # (group, name, extra_info) of every recorded benchmark, for the summary


def pytest_configure(config):
    # Timing runs are one-core runs. `make test` also runs a benchmark file as a plain test
    # (--benchmark-disable): leave the threads of that test session alone then.
    if not config.getoption("benchmark_disable", default=False):
        cases.one_core()


def rounds_for(x):
    return max(MIN_ROUNDS, min(MAX_ROUNDS, ELEMENTS_PER_BENCHMARK // max(1, x.numel())))


@pytest.fixture(params=list(cases.SHAPES), ids=lambda s: s.replace("/", "-"))
def shape(request):
    return cases.SHAPES[request.param]


@pytest.fixture
def time_it(benchmark):
    """time_it(group, x, fn, *args, **kwargs) -> fn(*args, **kwargs), timed over rounds_for(x) rounds.

    x is the latent being moved (it sets the rounds); one warm-up round, then the median is what counts.
    """

    def run(group, x, fn, *args, **kwargs):
        benchmark.group = group
        rounds = rounds_for(x)
        return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=rounds, warmup_rounds=1, iterations=1)

    return run


@pytest.fixture
def record(benchmark, request):
    """record(x, wire_bytes=None, rmse=None, baseline=False): after timing, fill extra_info."""

    def put(x, wire_bytes=None, rmse=None, baseline=False, **more):
        info = benchmark.extra_info
        info["fp32_bytes"] = cases.fp32_bytes(x)
        if benchmark.stats is not None:  # None under --benchmark-disable
            info["GB/s"] = round(cases.fp32_bytes(x) / benchmark.stats.stats.median / 1e9, 3)
        if wire_bytes is not None:
            info["wire_bytes"] = wire_bytes
            info["bits/value"] = round(8 * wire_bytes / x.numel(), 3)
        if rmse is not None:
            info["rmse"] = rmse
        info["baseline"] = baseline
        info.update(more)
        _rows.append((benchmark.group, request.node.callspec.id, dict(info)))

    return put


def pytest_terminal_summary(terminalreporter):
    """Per group: GB/s next to the same-run baseline of that group, bits per value, RMSE."""
    if not _rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section("GB/s = float32 bytes / median time; N.NNx = GB/s over the group's baseline")
    groups = {}
    for group, name, info in _rows:
        groups.setdefault(group, []).append((name, info))
    for group, rows in groups.items():
        base = next((i.get("GB/s") for _, i in rows if i.get("baseline")), None)
        write(f"{group}")
        for name, info in rows:
            gbs = info.get("GB/s")
            ratio = f"{gbs / base:6.2f}x" if gbs and base else " " * 7
            bits = f"{info['bits/value']:7.3f} bits/value" if "bits/value" in info else " " * 18
            err = f"RMSE {info['rmse']:.2e}" if "rmse" in info else ""
            speed = f"{gbs:8.3f} GB/s" if gbs is not None else " " * 13
            write(f"  {name:52} {speed} {ratio}  {bits}  {err}")
