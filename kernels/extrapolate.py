"""K-step noise extrapolation: forecast the model output at steps where the model is not called.

Two forecasters, each a plain frozen dataclass with the same three methods (``is_real``,
``forecast``, ``update``) over an explicit ``History`` value, so the history can be serialized and sent
in a handoff (protocol's ``history/<i>`` tensors):

- ``ECDiff(p, k, a)``: EC-Diff's rule, as its public code runs it. Steps 0..p-1 call the model; after
  that one real call every k+1 steps (EC-Diff's fixed cycle), or, with k a tuple of gaps, after k[0]
  skipped steps, then k[1], ... (the last repeating): where the calls fall, beyond EC-Diff. The slope starts as g = eps_{p-1} - eps_{p-2}; after each later
  real call g = a (eps_i - eps_hat_{i-1}) (the real output minus the forecast before it); at a skipped
  step eps_hat_i = eps_{i-1} + g, where eps_{i-1} is the previous output, real or forecast.
- ``Taylor(order, k, variable)``: the polynomial through the last order+1 *real* outputs at their
  timesteps (variable="t") or noise levels (variable="sigma", sigma = sqrt((1 - abar) / abar)),
  evaluated at the current one (Newton's divided differences, i.e. Lagrange weights), which respects
  uneven step spacing, as TaylorSeer does for features. order 1..3.

Measured against an exact denoiser (bench/extrapolation.py, results in bench/README.md): EC-Diff's
rule is stable only for a*k < 1 (each cycle feeds the last forecast's error, times -a*k, into the next
slope); at k = 1, a = 1 it helps, at k >= 2 with a = 1 it diverges. Taylor in sigma beats Taylor in t
by 2-6x at small k for orders 2-3, because eps is smooth in sigma near the data but goes like sqrt(t).

A forecast is a weighted sum of stored tensors, so it runs inside the fused step (``FusedSampler
.step_combined``): no extra pass over memory to build eps_hat.
"""
import math
from dataclasses import dataclass, field

import torch

MAX_ORDER = 3
VARIABLES = ("t", "sigma")  # what a forecaster's polynomial runs in: timestep or noise level


@dataclass
class History:
    """What a forecaster keeps: model outputs (newest last) with their timesteps, and EC-Diff's slope."""

    outputs: list = field(default_factory=list)
    times: list = field(default_factory=list)
    grad: torch.Tensor = None


def lagrange_weights(nodes, t):
    """w_j with sum_j w_j f(nodes[j]) = P(t), P the polynomial through the points (exact for degree < len)."""
    w = []
    for j, tj in enumerate(nodes):
        wj = 1.0
        for i, ti in enumerate(nodes):
            if i != j:
                wj *= (t - ti) / (tj - ti)
        w.append(wj)
    return w


MAX_GAPS = 64  # a tuple k: at most this many gaps (a plan's segment is at most 10,000 steps; the last repeats)


def _every(p, k, i):
    """Whether step i (counted from the segment's start) calls the model: the first p do; after them one
    in every k + 1, or, with k a tuple of gaps, the j-th real call after the first p follows k[j] skipped
    steps (the last gap repeating)."""
    if i < p:
        return True
    if type(k) is int:
        return (i + 1 - p) % (k + 1) == 0
    j = p - 1  # the last real call so far
    for g in k:
        j += g + 1
        if j >= i:
            return j == i
    return (i - j) % (k[-1] + 1) == 0


def _check_k(owner, k):
    """k: an int >= 0 (a fixed cycle), or a tuple of 1..MAX_GAPS ints >= 0 (uneven spacing) -> k."""
    if type(k) is int:
        if k < 0:
            raise ValueError(f"{owner} k (skipped steps between real calls) must be >= 0, got {k}")
        return k
    if type(k) is not tuple or not 1 <= len(k) <= MAX_GAPS or any(type(g) is not int or g < 0 for g in k):
        raise ValueError(f"{owner} k must be an int >= 0 (skipped steps between real calls) or a tuple of 1.."
                         f"{MAX_GAPS} such ints (the gaps in turn, the last repeating), got {k!r}")
    return k


def max_gap(k):
    """The longest run of forecast steps a k allows (what EC-Diff's a * k < 1 bound is about)."""
    return k if type(k) is int else max(k)


@dataclass(frozen=True)
class ECDiff:
    """EC-Diff's K-step noise approximation. p >= 2 real steps first; k skipped steps between real ones;
    a scales the slope measured after each real call. Stable only for a * k < 1 (see the module doc)."""

    variable = "t"  # the rule counts steps; the value it is given is only kept

    p: int = 3
    k: int = 1  # or a tuple of gaps: see _every
    a: float = 1.0

    def __post_init__(self):
        if type(self.p) is not int:
            raise ValueError(f"ECDiff p must be an int, got {self.p!r}")
        _check_k("ECDiff", self.k)
        if type(self.a) not in (int, float) or not math.isfinite(self.a):
            raise ValueError(f"ECDiff a (slope scale) must be a finite number, got {self.a!r}")
        if self.p < 2:
            raise ValueError(f"ECDiff needs p >= 2 real steps to measure a first slope, got p={self.p}")

    def is_real(self, i):
        return _every(self.p, self.k, i)

    def forecast(self, history, t):
        """(models, weights): eps_hat = eps_{i-1} + g."""
        return [history.outputs[-1], history.grad], [1.0, 1.0]

    def update(self, i, history, m, t):
        """History after step i used model output m (real if is_real(i), else the forecast)."""
        outputs = (history.outputs + [m])[-2:]
        grad = history.grad
        if self.is_real(i):
            if i == self.p - 1:
                grad = outputs[-1] - outputs[-2]
            elif i > self.p:
                grad = self.a * (outputs[-1] - outputs[-2])
        return History(outputs, (history.times + [t])[-2:], grad)


@dataclass(frozen=True)
class Taylor:
    """Polynomial extrapolation of the given order over the last order+1 real outputs, in timestep
    (variable="t") or in noise level (variable="sigma")."""

    order: int = 1
    k: int = 1  # or a tuple of gaps: see _every
    variable: str = "t"

    def __post_init__(self):
        if type(self.order) is not int:
            raise ValueError(f"Taylor order must be an int, got {self.order!r}")
        if not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"Taylor order must be in 1..{MAX_ORDER}, got {self.order}")
        _check_k("Taylor", self.k)
        if self.variable not in VARIABLES:
            raise ValueError(f"Taylor variable must be one of {VARIABLES}, got {self.variable!r}")

    def is_real(self, i):
        return _every(self.order + 1, self.k, i)

    def forecast(self, history, t):
        return list(history.outputs), lagrange_weights(history.times, t)

    def update(self, i, history, m, t):
        if not self.is_real(i):
            return history  # only real outputs define the polynomial
        n = self.order + 1
        outputs, times = history.outputs, history.times
        if times and times[-1] == float(t):  # a repeated timestep (PNDM's PLMS): the newer output replaces it,
            outputs, times = outputs[:-1], times[:-1]  # as two nodes at one t define no polynomial
        return History((outputs + [m])[-n:], (times + [float(t)])[-n:])


class Stepper:
    """Steps [start, stop) of a schedule, one at a time: the one step loop every runner drives (the
    one-process executor, the cloud engine, which batches the model calls of many steppers, the edge and
    its fallback). Forecasters count steps from ``start``.

        s = Stepper(sampler, x, forecaster, start=a, stop=b)
        while not s.done:
            models, weights = guided(s.x, s.i, s.t) if s.real else (None, None)
            i, t, x_t, m, real = s.step(models, weights)

    At a real step the caller gives the model output as a weighted sum (classifier-free guidance: [eps_u,
    eps_c], [1 - g, g]), so guidance stays inside the fused pass; at a forecast step it gives nothing.
    noise(i) gives the noise of stochastic samplers."""

    def __init__(self, sampler, x, forecaster=None, *, start=0, stop=None, state=None, noise=None):
        self.sampler, self.forecaster, self.noise = sampler, forecaster, noise
        self.start, self.stop = start, sampler.num_steps if stop is None else stop
        self.i, self.x, self.state = start, x, state
        self.history, self.calls = History(), 0
        self._timesteps = sampler.timesteps.tolist()

    @property
    def done(self):
        return self.i >= self.stop

    @property
    def t(self):
        """The timestep of the next step."""
        return self._timesteps[self.i]

    @property
    def real(self):
        """Whether the next step calls the model (else the forecaster stands in)."""
        return self.forecaster is None or self.forecaster.is_real(self.i - self.start)

    def step(self, models=None, weights=None):
        """Take the next step -> (i, t, x_t, m, real): its index, timestep, input latent, the model output
        it used (only when a forecaster needs it, else None) and whether it was a real call."""
        if self.done:
            raise ValueError(f"the steps [{self.start}, {self.stop}) are all taken")
        i, t, x_t, real, fc = self.i, self.t, self.x, self.real, self.forecaster
        j = i - self.start
        v = self.sampler.noise_levels[i] if fc is not None and fc.variable == "sigma" else t
        if real:
            if models is None:
                raise ValueError(f"step {i} is a real step: give the model output")
            self.calls += 1
        else:
            if models is not None:
                raise ValueError(f"step {i} is a forecast step: it takes no model output")
            models, weights = fc.forecast(self.history, v)
        z = self.noise(i) if self.noise is not None else None
        # m costs passes over memory (and changes the CPU path's rounding order); only a forecaster needs it
        want_m = fc is not None
        out = self.sampler.step_combined(x_t, i, models, weights, state=self.state, noise=z, want_m=want_m)
        self.x, self.state, m = out if want_m else (*out, None)
        if fc is not None:
            self.history = fc.update(j, self.history, m, v)
        self.i += 1
        return i, t, x_t, m, real


def run_steps(sampler, x, guided, forecaster=None, *, start=0, stop=None, state=None, noise=None,
              callback=None):
    """Steps [start, stop) of the schedule from x (at step ``start``), driving a Stepper. guided(x, i, t)
    -> (models, weights) is the real model output as a weighted sum. callback(i, t, x_t, m, real) sees each
    step (m only when a forecaster needs it, else None). Returns (x, state, model calls)."""
    s = Stepper(sampler, x, forecaster, start=start, stop=stop, state=state, noise=noise)
    while not s.done:
        models, weights = guided(s.x, s.i, s.t) if s.real else (None, None)
        info = s.step(models, weights)
        if callback is not None:
            callback(*info)
    return s.x, s.state, s.calls


def denoise(sampler, x, model, forecaster=None, noise=None, callback=None):
    """Run the whole schedule: x_T -> x_0. model(x, i, t) returns the (guided) model output; with a
    forecaster it is called only at its real steps. noise(i) gives the noise of stochastic samplers.
    callback(i, t, x_t, m, real) sees each step's input, whether it was a real call, and, when a
    forecaster runs, the model output the step used (else m is None). Returns (x, number of model calls)."""
    x, _, calls = run_steps(sampler, x, lambda x, i, t: ([model(x, i, t)], [1.0]), forecaster, noise=noise,
                            callback=callback)
    return x, calls
