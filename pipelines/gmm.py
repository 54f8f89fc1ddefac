"""The exact denoiser of a Gaussian-mixture data distribution: a model whose noise predictions are the
truth, so a sampler run with it is a ground-truth reference trajectory.

Data p(x0) = sum_j pi_j N(mu_j, s_j^2 I) in R^D (D = C*H*W of a latent). Under the variance-preserving
forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM, Ho et al. 2020, eq. 4) the
marginal is again a mixture,

    p_t(x) = sum_j pi_j N(x; sqrt(abar_t) mu_j, v_j I),   v_j = abar_t s_j^2 + 1 - abar_t,

and the minimum-MSE noise prediction E[eps | x_t] = -sqrt(1 - abar_t) grad log p_t(x_t) (Tweedie) is

    eps*(x_t, t) = sqrt(1 - abar_t) sum_j r_j(x_t) (x_t - sqrt(abar_t) mu_j) / v_j,
    r_j(x_t) = pi_j N(x_t; sqrt(abar_t) mu_j, v_j I) / p_t(x_t)      (posterior responsibilities),

with log r_j from a log-sum-exp over components, since in D = 256 dimensions every N(x_t; ...) alone
underflows even float64. Everything is computed in float64 and returned in the input's dtype.

Scope: ``t`` is an integer training timestep indexing a diffusers scheduler's ``alphas_cumprod``, and the
model input is x_t itself. That is what DDIM (eta 0) and DPM-Solver++(2M) (``DPMSolverMultistepScheduler``,
whose step takes epsilon and whose integer timesteps index ``alphas_cumprod`` too) feed a UNet.
k-diffusion-style schedulers (Euler) feed x_t / sqrt(sigma^2 + 1) and may use fractional timesteps; this
model does not do that scaling, so do not use it with them.
"""
import math
from dataclasses import dataclass

import torch

# Relative slack on sum(weights) == 1: float32 weights normalized by a division are off by a few ulps.
WEIGHT_SUM_RTOL = 1e-5


@dataclass(frozen=True)
class GaussianMixture:
    """p(x0) = sum_j weights[j] N(means[j], stds[j]^2 I).

    means: (J, *latent_shape); stds: (J,) > 0; weights: (J,) >= 0, summing to 1. Any float dtype (the
    constructor from ``random`` gives float64).
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        j = self.means.shape[0] if self.means.dim() >= 2 else None
        if j is None or j == 0:
            raise ValueError(f"means must be (J, *latent_shape) with J >= 1 components, got shape "
                             f"{tuple(self.means.shape)}")
        for name, v in (("stds", self.stds), ("weights", self.weights)):
            if v.shape != (j,):
                raise ValueError(f"{name} must be ({j},), one per component of means, got {tuple(v.shape)}")
        if not bool((self.stds > 0).all()):
            raise ValueError(f"stds must all be > 0, got {self.stds.tolist()}")
        total = float(self.weights.double().sum())
        if bool((self.weights < 0).any()) or abs(total - 1) > WEIGHT_SUM_RTOL:
            raise ValueError(f"weights must be >= 0 and sum to 1, got {self.weights.tolist()} (sum {total}); "
                             "divide them by their sum")

    @property
    def latent_shape(self):
        return tuple(self.means.shape[1:])

    @classmethod
    def random(cls, latent_shape, components, seed, std_range=(0.2, 0.5)):
        """A test mixture: means ~ N(0, I), stds ~ U(std_range), weights ~ U(1, 2) normalized; float64.

        Well separated in D dimensions: a draw from component i is s_i sqrt(D) from mu_i and about
        sqrt((2 + s_i^2) D) from any other mean, at least 3x farther for s_i <= 0.5; for D >= 64 these
        distances concentrate (relative spread ~ 1 / sqrt(2D)), so a nearer foreign mean is negligible.
        """
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        lo, hi = std_range
        if not 0 < lo <= hi:
            raise ValueError(f"std_range must be (lo, hi) with 0 < lo <= hi, got {std_range}")
        g = torch.Generator().manual_seed(seed)
        means = torch.randn((components, *latent_shape), generator=g, dtype=torch.float64)
        stds = lo + (hi - lo) * torch.rand(components, generator=g, dtype=torch.float64)
        weights = 1 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights / weights.sum())

    def sample(self, n, generator=None, dtype=torch.float32):
        """n draws x0 ~ p(x0): (n, *latent_shape) in ``dtype``, plus each draw's component index (n,)."""
        j = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float64)
        s = self.stds.double()[j].reshape((n,) + (1,) * len(self.latent_shape))
        return (self.means.double()[j] + s * z).to(dtype), j

    def eps(self, x, t, alphas_cumprod):
        """eps*(x_t, t) = E[eps | x_t]: (B, *latent_shape) in x's dtype.

        x: (B, *latent_shape) at training timestep t (an int in 0..len(alphas_cumprod) - 1);
        alphas_cumprod: (T,) the scheduler's abar.
        """
        abar = self._abar(t, alphas_cumprod)
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"x must be (B, *{self.latent_shape}), got {tuple(x.shape)}")
        xf = x.double().flatten(1)  # (B, D)
        mu = self.means.double().flatten(1)  # (J, D)
        d = xf.shape[1]
        v = abar * self.stds.double() ** 2 + (1 - abar)  # v_j, (J,)
        diff = xf[:, None, :] - math.sqrt(abar) * mu[None]  # x_t - sqrt(abar) mu_j, (B, J, D)
        # log pi_j + log N(x_t; sqrt(abar) mu_j, v_j I), (B, J); r_j by log-sum-exp over j
        log_joint = (self.weights.double().log() - 0.5 * d * torch.log(2 * math.pi * v)
                     - diff.square().sum(-1) / (2 * v))
        r = torch.softmax(log_joint, dim=1)
        # eps* = sqrt(1 - abar) sum_j r_j (x_t - sqrt(abar) mu_j) / v_j
        e = math.sqrt(1 - abar) * torch.einsum("bj,bjd->bd", r / v, diff)
        return e.reshape(x.shape).to(x.dtype)

    @staticmethod
    def _abar(t, alphas_cumprod):
        if isinstance(t, torch.Tensor):
            t = t.item()
        if isinstance(t, float):
            if not t.is_integer():
                raise ValueError(f"t must be an integer training timestep, got {t}; this model does not "
                                 "interpolate alphas_cumprod (use DDIM or DPM-Solver++ timesteps)")
            t = int(t)
        n = len(alphas_cumprod)
        if not 0 <= t < n:
            raise ValueError(f"t must be in 0..{n - 1} (an index into alphas_cumprod), got {t}")
        return float(alphas_cumprod[t].double())
