"""K-step noise extrapolation: EC-Diff's rule as its public code runs it, and Taylor forecasts."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from latentwire.kernels import ECDiff, FusedSampler, History, Taylor, denoise, lagrange_weights

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there; interpreted here (conftest.py)


def _model(x, i, t):
    """A deterministic stand-in for a UNet: smooth in t, depends on x."""
    return torch.tanh(x) * (1 + t / 1000) + 0.1 * torch.sin(torch.tensor(t / 300.0))


def _ecdiff_public_loop(scheduler, x, p, k, a, s):
    """EC-Diff's denoising loop transcribed from its public code (model/sd.py), cloud segment only
    (i < s), with the guided model output given by _model -> (x_0, model calls made)."""
    cache, gradient, calls = [], None, 0
    for i, t in enumerate(scheduler.timesteps):
        if i < s:
            if i < p or (i + 1 - p) % (k + 1) == 0:
                calls += 1
                noise_pred = _model(x, i, int(t))
                x = scheduler.step(noise_pred, t, x).prev_sample
                cache.append(noise_pred)
                if i == (p - 1):
                    gradient = cache[-1] - cache[-2]
                elif i > p:
                    gradient = a * (cache[-1] - cache[-2])
            else:
                noise = cache[-1] + gradient
                x = scheduler.step(noise, t, x).prev_sample
                cache.append(noise)
        else:
            calls += 1
            x = scheduler.step(_model(x, i, int(t)), t, x).prev_sample
    return x, calls


@pytest.mark.parametrize("p, k, a", [(2, 1, 1.0), (3, 2, 0.8), (4, 4, 1.2), (3, 0, 1.0)])
@pytest.mark.parametrize("backend", ["cpu", "ref", "triton"])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
def test_ecdiff_matches_its_public_loop(p, k, a, backend, clip_sample):
    s = DDIMScheduler(**dict(SD, clip_sample=clip_sample))
    s.set_timesteps(20)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    expected, public_calls = _ecdiff_public_loop(s, x.clone(), p, k, a, s=len(s.timesteps))
    ours, calls = denoise(FusedSampler(s, device=device, backend=backend), x.to(device), _model, ECDiff(p, k, a))
    assert calls == public_calls == sum(ECDiff(p, k, a).is_real(i) for i in range(20))
    assert calls == 20 if k == 0 else calls < 20  # k = 0 skips nothing; any k > 0 skips some steps
    ours = ours.cpu()
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_ecdiff_schedule():
    assert [ECDiff(3, 2).is_real(i) for i in range(12)] == [1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    # uneven spacing: gaps in turn, the last repeating; a one-gap tuple is EC-Diff's fixed cycle
    assert [ECDiff(3, (2,)).is_real(i) for i in range(12)] == [ECDiff(3, 2).is_real(i) for i in range(12)]
    assert [i for i in range(16) if ECDiff(2, (0, 1, 3, 2)).is_real(i)] == [0, 1, 2, 4, 8, 11, 14]
    assert [i for i in range(8) if Taylor(2, (1, 0)).is_real(i)] == [0, 1, 2, 4, 5, 6, 7]
    assert ECDiff(3, (1, 2)) == ECDiff(3, (1, 2)) and hash(ECDiff(3, (1, 2))) == hash(ECDiff(3, (1, 2)))
    for bad in ((), (1, -1), (1, 2.0), [1, 2], (0,) * 65, True):
        with pytest.raises(ValueError, match="k must be an int"):
            ECDiff(3, bad)
        with pytest.raises(ValueError, match="k must be an int"):
            Taylor(1, bad)
    with pytest.raises(ValueError, match="p >= 2"):
        ECDiff(p=1)
    with pytest.raises(ValueError, match="k"):
        Taylor(order=1, k=-1)
    with pytest.raises(ValueError, match="order"):
        Taylor(order=4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lagrange_weights_are_exact_for_polynomials_on_uneven_nodes(order):
    nodes = [981.0, 937.5, 880.0, 799.25][: order + 1]
    for degree in range(order + 1):
        f = lambda t: (t / 1000) ** degree + 0.5  # noqa: E731
        w = lagrange_weights(nodes, 701.0)
        assert sum(wj * f(tj) for wj, tj in zip(w, nodes)) == pytest.approx(f(701.0), rel=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_forecast_is_exact_when_the_model_output_is_a_polynomial_in_t(order):
    """If eps(t) is a polynomial of the forecaster's order, skipping the model changes nothing."""
    s = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(16)
    base = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    model = lambda x, i, t: base * (t / 1000) ** order - 0.3 * (t / 1000)  # noqa: E731
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    every, calls_all = denoise(FusedSampler(s), x, model)
    skipped, calls = denoise(FusedSampler(s), x, model, Taylor(order, k=2))
    assert calls < calls_all
    torch.testing.assert_close(skipped, every, rtol=1e-4, atol=1e-4 * every.abs().max().item())


def test_forecast_history_is_plain_tensors_that_can_travel():
    h = ECDiff(2, 1).update(0, History(), torch.ones(3), 999.0)
    h = ECDiff(2, 1).update(1, h, torch.zeros(3), 979.0)
    assert [o.tolist() for o in h.outputs] == [[1.0] * 3, [0.0] * 3] and h.grad.tolist() == [-1.0] * 3


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_in_sigma_is_exact_when_the_model_output_is_a_polynomial_in_sigma(order):
    s = DDIMScheduler(**SD)
    s.set_timesteps(16)
    sampler = FusedSampler(s)
    abar = s.alphas_cumprod.double()
    sigma = {int(t): float(((1 - abar[t]) / abar[t]).sqrt()) for t in s.timesteps}
    assert sampler.noise_levels == pytest.approx([sigma[int(t)] for t in s.timesteps], rel=1e-12)
    base = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    model = lambda x, i, t: base * (sigma[t] / 10) ** order  # noqa: E731
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    every, _ = denoise(sampler, x, model)
    seen = []
    skipped, calls = denoise(sampler, x, model, Taylor(order, k=2, variable="sigma"),
                             callback=lambda i, t, x_t, m, real: seen.append(real))
    assert calls == sum(seen) < len(seen) == 16
    torch.testing.assert_close(skipped, every, rtol=1e-4, atol=1e-4 * every.abs().max().item())
    with pytest.raises(ValueError, match="variable"):
        Taylor(1, variable="lambda")


def test_taylor_takes_a_repeated_timestep_as_one_node():
    """PNDM's PLMS schedule repeats its second timestep: two real outputs at one t are one node (the newer)."""
    import diffusers

    s = diffusers.PNDMScheduler(skip_prk_steps=True)
    s.set_timesteps(10)
    assert s.timesteps[1] == s.timesteps[2]
    sampler = FusedSampler(s)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    for order in (1, 2, 3):
        out, calls = denoise(sampler, x, lambda x, i, t: 0.1 * x, Taylor(order, k=1))
        assert torch.isfinite(out).all() and calls < sampler.num_steps
    h = Taylor(2, k=1).update(0, History(), torch.ones(2), 981.0)
    h = Taylor(2, k=1).update(1, h, torch.full((2,), 2.0), 961.0)
    h = Taylor(2, k=1).update(2, h, torch.full((2,), 3.0), 961.0)
    assert h.times == [981.0, 961.0] and torch.equal(h.outputs[-1], torch.full((2,), 3.0))
