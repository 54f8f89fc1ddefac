"""Benchmark: the fused DDIM step (clip_sample off, and on as DDIM defaults) on whatever device this
machine has (CUDA if present, else CPU).

On CUDA it times latentwire's Triton kernel, ``torch.compile`` of the torch reference and a
device-to-device copy of the bytes a step must move (read x, u, c; write x), reports GB/s, and
counts, with torch.profiler, the kernel launches and host synchronisations of one step (target: 1
launch, 0 syncs), then checks the step replays inside a CUDA graph. On CPU the same file runs the CPU
paths (and counts the aten ops of a step), so `make test` runs it with --benchmark-disable and it
cannot rot on machines without a GPU.
"""
import pytest
import torch
from diffusers import DDIMScheduler

from latentwire.kernels import FusedSampler, fused_step_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (1, 4, 128, 128) if DEVICE == "cuda" else (1, 4, 32, 32)
G = 7.5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIGS = {"ddim": dict(SD, clip_sample=False), "ddim-clip": dict(SD)}  # clip_sample=True: DDIM's default


def _setup(config="ddim"):
    s = DDIMScheduler(**CONFIGS[config])
    s.set_timesteps(25)
    sampler = FusedSampler(s, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    x, u, c = (torch.randn(SHAPE, generator=g).to(DEVICE) for _ in range(3))
    expected = s.step(u + G * (c - u), s.timesteps[10], x).prev_sample
    return sampler, x, u, c, expected


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _profile(fn):
    """(kernel launches, host syncs, aten ops) of one call of fn, from torch.profiler's event names."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        _sync()
    names = [e.name for e in prof.events()]
    launches = sum(("LaunchKernel" in n) or n == "cuLaunchKernelEx" for n in names)
    syncs = sum(("Synchronize" in n) for n in names) - 1 * (DEVICE == "cuda")  # minus our own _sync()
    return launches, max(0, syncs), sum(n.startswith("aten::") for n in names)


@pytest.mark.parametrize("impl", ["fused", "torch.compile(ref)", "copy"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_on_device(config, impl, benchmark, record):
    sampler, x, u, c, expected = _setup(config)
    nbytes = 4 * x.numel() * x.element_size()
    benchmark.group = f"fused step {config} {DEVICE} {SHAPE}"
    if impl == "fused":
        fn = lambda: sampler.step(x, 10, cond=c, uncond=u, guidance_scale=G)[0]  # noqa: E731
        launches, syncs, ops = _profile(fn)
        benchmark.extra_info.update(launches=launches, host_syncs=syncs, aten_ops=ops)
        if DEVICE == "cuda":
            assert (launches, syncs) == (1, 0), f"a step took {launches} launches and {syncs} host syncs"
    elif impl == "torch.compile(ref)":
        ref = torch.compile(fused_step_ref, dynamic=False)
        w, step = torch.tensor([[1 - G, G]], device=DEVICE), torch.tensor([10], device=DEVICE)
        fn = lambda: ref(x, [u, c], w, sampler.coef, step, clip=sampler.table.clip)[0]  # noqa: E731
        fn()  # compile outside the timing
    else:
        src = torch.cat([x.flatten(), u.flatten()])
        want = src.clone()  # what the copy must produce, made before the timing
        dst = torch.full_like(src, float("nan"))

        def fn():  # moves the step's bytes: reads half of them, writes the other half
            return dst.copy_(src)

    def timed():
        out = fn()
        _sync()
        return out

    out = benchmark(timed)
    if impl == "copy":
        assert torch.equal(out, want), "the copy did not copy its source"
    else:  # the steps: against diffusers' scheduler.step, computed in _setup
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s moved"] = round(nbytes / benchmark.stats.stats.median / 1e9, 3)
    record(x, baseline=impl == "copy")  # the summary prints each row's speed over the copy's


@pytest.mark.parametrize("config", list(CONFIGS))
def _step_replays_in_a_cuda_graph(config):
    sampler, x, u, c, expected = _setup(config)
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler.step(static_x, 10, cond=c, uncond=u, guidance_scale=G)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5


if DEVICE == "cuda":  # CUDA graphs exist only there; defined, not skipped, so CPU runs report no skip
    test_step_replays_in_a_cuda_graph = _step_replays_in_a_cuda_graph
