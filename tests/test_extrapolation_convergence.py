"""K-step noise extrapolation against ground truth: with the exact denoiser of a Gaussian mixture
(pipelines/gmm.py) as the model, the run that calls it at every step is the reference trajectory, and
the forecasting runs must converge to it at the rate their order predicts as steps get finer.

Two rates, because eps*(x_t, t) is smooth in t except near t = 0:

- forecast error at skipped steps with 300 <= t < 600, where eps* is smooth in t: a polynomial of
  order p through real outputs h apart misses by O(h^{p+1}); EC-Diff's rule (eps_{i-1} plus a slope
  measured one step back) by O(h^2), like p = 1.
- final-sample error: O(h) whatever the order. Near t = 0, 1 - abar_t ~ beta_0 (t + 1) so
  eps* ~ sqrt(1 - abar_t) (x0 - mu_j) / s_j^2 behaves like sqrt(t) at the scale of a step; a polynomial
  in t then misses by a fixed fraction (measured 5-8% at the last skipped step, whatever N), the step's
  eps coefficient and |eps*| are both O(sqrt(h)), so x_0 is off by O(h), which swamps the O(h^{p+1})
  of the smooth part.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from latentwire.kernels import ECDiff, FusedSampler, Taylor, denoise
from latentwire.pipelines.gmm import GaussianMixture

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LATENT = (4, 8, 8)
GMM = GaussianMixture.random(LATENT, components=3, seed=0)
X_T = torch.randn((4, *LATENT), generator=torch.Generator().manual_seed(100))
SMOOTH = (300, 600)  # timesteps where eps* is smooth in t (away from t -> 0 and the start)


def _scheduler(kind, n):
    """DDIM with Stable Diffusion's config ("leading" spacing, steps_offset=1: the step's prev timestep
    t - 1000 // N is the next timestep, which "trailing" spacing breaks when N does not divide 1000), or
    DPM-Solver++(2M) with diffusers' defaults."""
    if kind == "ddim":
        s = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    else:
        s = DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(n)
    return s


def _model(scheduler):
    abar = scheduler.alphas_cumprod
    return lambda x, i, t: GMM.eps(x, t, abar)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _final_error(kind, n, forecaster):
    s = _scheduler(kind, n)
    reference, calls_all = denoise(FusedSampler(s), X_T, _model(s))
    ours, calls = denoise(FusedSampler(s), X_T, _model(s), forecaster)
    assert calls_all == n and calls < n
    return _rel(ours, reference)


def _smooth_forecast_error(kind, n, forecaster):
    """Mean over skipped steps with t in SMOOTH of |eps_hat - eps*(x_t)| / |eps*(x_t)|, at the x_t the
    forecasting run is at."""
    s = _scheduler(kind, n)
    forecasts = []  # (t, x_t, eps_hat) of every skipped step

    def keep(i, t, x_t, m, real):
        if not real:
            forecasts.append((t, x_t, m))

    _, calls = denoise(FusedSampler(s), X_T, _model(s), forecaster, callback=keep)
    assert len(forecasts) == n - calls
    errs = [_rel(m, GMM.eps(x, t, s.alphas_cumprod)) for t, x, m in forecasts if SMOOTH[0] <= t < SMOOTH[1]]
    assert len(errs) >= 5
    return sum(errs) / len(errs)


@pytest.mark.parametrize("forecaster", [Taylor(1, k=1), Taylor(2, k=1), ECDiff(p=3, k=1, a=1.0)], ids=str)
def test_final_sample_error_shrinks_like_h(forecaster):
    """DDIM at 20, 40, 80 steps against its own every-step reference. O(h) predicts 4x from 20 to 80
    steps; measured on this mixture: Taylor 1 5.9x (1.6e-2 -> 2.7e-3), Taylor 2 4.5x (4.9e-3 -> 1.1e-3),
    EC-Diff 5.0x (6.5e-3 -> 1.3e-3); 3.3x to 5.9x over three other mixtures. 2.5x still fails an
    O(sqrt h) error (2x) or one that does not converge."""
    e20, e40, e80 = (_final_error("ddim", n, forecaster) for n in (20, 40, 80))
    assert e20 > 1e-3, "forecasting should change the sample well above float32 rounding (~1e-6)"
    assert e20 > e40 > e80, (e20, e40, e80)
    assert e20 / e80 >= 2.5, (e20, e80)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("forecaster, local_order", [(Taylor(1, k=1), 2), (Taylor(2, k=1), 3),
                                                     (ECDiff(p=3, k=1, a=1.0), 2)], ids=str)
def test_forecast_error_where_eps_is_smooth_shrinks_like_h_to_the_order_plus_one(kind, forecaster, local_order):
    """50 -> 200 steps (h / 4): O(h^q) predicts 4^q, 16 for q = 2 and 64 for q = 3. Measured: Taylor 1
    15.5x (DDIM) and 13.1x (DPM++), Taylor 2 51x and 54x, EC-Diff 56x and 32x (faster than its O(h^2)
    here); over three other mixtures the least was 12.9x, 49.5x, 13.9x. We ask 0.6 4^q (9.6, 38.4),
    which one order less (4^{q-1} = 4, 16) fails. Order 3 is left out: at 200 steps its error, ~3e-7,
    is at the float32 rounding of the fused step."""
    coarse = _smooth_forecast_error(kind, 50, forecaster)
    fine = _smooth_forecast_error(kind, 200, forecaster)
    assert coarse / fine >= 0.6 * 4 ** local_order, (coarse, fine, coarse / fine)
