"""FusedSampler: a configured diffusers scheduler, stepped by the fused kernel."""
from dataclasses import dataclass

import torch

from .fused_step import _check, fused_step
from .step_table import UnsupportedScheduler
from .table_pndm import PLMSTable, combination
from .tables import table_for


@dataclass
class SolverState:
    """What a multistep solver carries from one step to the next, and across a handoff.

    x0_prev: DPM-Solver++'s previous data prediction x_0 (B, ...), or None before the first step (a
    multistep solver with no history takes a first-order step, as diffusers' does at step 0).
    ets: PLMS's previous (guided) model outputs, oldest first, each (B, ...).
    sample: PLMS's latent at the step its second step restarts from, or None.

    An empty state (the default) is a solver's state before its first step. ``tensors()`` names what
    travels (the protocol's ``solver/<name>`` tensors); ``from_tensors`` is its inverse.
    """

    x0_prev: torch.Tensor = None
    ets: tuple = ()
    sample: torch.Tensor = None

    MAX_ETS = 3  # PLMS's fourth-order formula uses the three outputs before the current one

    def tensors(self):
        """{name: tensor} of what this state holds: 'x0_prev', 'ets.0'.. (oldest first), 'sample'."""
        out = {} if self.x0_prev is None else {"x0_prev": self.x0_prev}
        out.update({f"ets.{i}": e for i, e in enumerate(self.ets)})
        if self.sample is not None:
            out["sample"] = self.sample
        return out

    @classmethod
    def from_tensors(cls, named):
        """The inverse of tensors(); a ValueError names a tensor that no state holds."""
        named = dict(named)
        ets = []
        while f"ets.{len(ets)}" in named:
            ets.append(named.pop(f"ets.{len(ets)}"))
        if len(ets) > cls.MAX_ETS:
            raise ValueError(f"a solver state holds at most {cls.MAX_ETS} PLMS outputs (ets.0..ets.{cls.MAX_ETS - 1}), "
                             f"got {len(ets)}")
        x0_prev, sample = named.pop("x0_prev", None), named.pop("sample", None)
        if named:
            raise ValueError(f"unknown solver state tensors {sorted(named)}: a state holds x0_prev, ets.0.. and sample")
        return cls(x0_prev=x0_prev, ets=tuple(ets), sample=sample)

    def map(self, fn):
        """The same state with fn applied to each tensor (moving it to a device, say)."""
        return SolverState.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def __bool__(self):
        return bool(self.tensors())


def noise_levels(scheduler):
    """sigma of each step as a list of floats: the scheduler's own sigmas where it has them (Euler,
    DPM-Solver++, flow matching), else sqrt((1 - abar_t) / abar_t) at each timestep (DDIM, DDPM)."""
    n = len(scheduler.timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > n:
        return [float(s) for s in sigmas[:n]]
    abar = scheduler.alphas_cumprod.double()
    return [float(((1 - abar[t]) / abar[t]).sqrt()) for t in scheduler.timesteps.tolist()]


class FusedSampler:
    """Steps a diffusers scheduler's schedule with one fused pass per step.

    Build it after ``scheduler.set_timesteps(N)``; the per-step coefficients are computed once and
    moved to ``device``. The scheduler object itself is not stepped (it keeps no state here), so one
    sampler serves any number of concurrent generations.

        sampler = FusedSampler(scheduler, device=x.device)
        state = None
        for i in range(sampler.num_steps):
            x, state = sampler.step(x, i, cond=eps_c, uncond=eps_u, guidance_scale=7.5, state=state)

    PNDMScheduler (skip_prk_steps=True: PLMS) keeps earlier model outputs in the state (table_pndm.py);
    its N inference steps are N + 1 steps here (1 for N = 1), stepped with int step indices.
    """

    def __init__(self, scheduler, *, device="cpu", eta=0.0, use_clipped_model_output=False, backend=None):
        opts = {}
        if type(scheduler).__name__ == "DDIMScheduler":
            opts = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
        elif eta or use_clipped_model_output:
            raise ValueError(f"eta and use_clipped_model_output are DDIM options; {type(scheduler).__name__} "
                             "takes neither")
        self.scheduler = scheduler  # read, never stepped: its schedule and add_noise
        self.table = table_for(scheduler, **opts)
        self.coef = self.table.coef.to(device=device, dtype=torch.float32)
        self.coef_first_order = (None if self.table.first_order is None
                                 else self.table.first_order.to(device=device, dtype=torch.float32))
        self.timesteps = scheduler.timesteps
        self.num_steps = len(self.timesteps)
        self.noise_levels = noise_levels(scheduler)
        self.backend = backend

    @property
    def stochastic(self):
        """Whether step() needs ``noise`` (DDIM with eta > 0, DDPM, Euler ancestral, stochastic flow)."""
        return self.table.stochastic

    def step(self, x, step_index, model_output=None, *, cond=None, uncond=None, guidance_scale=None,
             state=None, noise=None):
        """x_t -> (x_next, state) for step ``step_index`` (an int, or a (B,) tensor: one per row; an int
        only for PNDMScheduler, whose PLMS history is one per batch).

        Give either ``model_output`` (already guided) or ``cond``, ``uncond`` and ``guidance_scale`` (a
        float or a (B,) tensor), combined as uncond + g (cond - uncond) inside the pass.
        noise: (B, ...) standard normal, required when ``self.stochastic``.
        state: the SolverState the previous step returned (None at the first step).
        """
        if model_output is not None:
            if cond is not None or uncond is not None or guidance_scale is not None:
                raise ValueError("give either model_output, or cond + uncond + guidance_scale, not both")
            models, weights = [model_output], [1.0]
        else:
            if cond is None or uncond is None or guidance_scale is None:
                raise ValueError("classifier-free guidance needs cond, uncond and guidance_scale")
            models = [uncond, cond]
            if isinstance(guidance_scale, torch.Tensor):  # one scale per row
                g = guidance_scale.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
                weights = torch.stack([1 - g, g], dim=1)
            else:
                weights = [1.0 - guidance_scale, float(guidance_scale)]
        return self.step_combined(x, step_index, models, weights, state=state, noise=noise)

    def step_combined(self, x, step_index, models, weights, *, state=None, noise=None, want_m=False):
        """The general form: the model output is sum_k weights[:, k] * models[k] (guidance, or a forecast
        from a history of model outputs: see kernels/extrapolate.py); weights is (B, K) or K floats.
        With want_m, also returns that model output: (x_next, state, m)."""
        step = self._step_tensor(step_index, x)
        if isinstance(self.table, PLMSTable):
            return self._step_plms(x, step, models, weights, state, want_m)
        if self.table.stochastic and noise is None:
            raise ValueError("this scheduler adds noise at each step: pass noise=torch.randn_like(x) "
                             "(drawn from your generator)")
        coef, hist = self.coef, None
        if self.table.multistep:
            hist = state.x0_prev if state is not None else None
            if hist is None:  # no history: a first-order step, as diffusers takes its first one
                coef = self.coef_first_order
        out = fused_step(x, models, weights, coef, step, noise=noise if self.table.stochastic else None,
                         hist=hist, clip=self.table.clip, want_x0=self.table.multistep, want_m=want_m,
                         backend=self.backend)
        state = SolverState(x0_prev=out.x0)
        return (out.x_next, state, out.m) if want_m else (out.x_next, state)

    def _step_plms(self, x, i, models, weights, state, want_m):
        """PNDMScheduler's PLMS step (table_pndm.py has the equations and the bookkeeping): e_i, the
        model output, in one pass; then the fused step over [e_i, ets[-1], ets[-2], ets[-3]] (newest
        first) with the multistep weights, from x, or from state.sample at step 1."""
        if isinstance(i, torch.Tensor):
            raise UnsupportedScheduler("PNDMScheduler: a per-row step_index is not supported: PLMS keeps one history "
                                       "of model outputs per batch; step rows at different steps one at a time "
                                       "with an int step_index")
        ets, sample = (state.ets[-SolverState.MAX_ETS:], state.sample) if state is not None else ((), None)
        for name, t in [(f"state.ets[{j}]", e) for j, e in enumerate(ets)] + [("state.sample", sample)]:
            if t is not None and t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, the latent {tuple(x.shape)}: they must match")
        _check(x, models, weights, self.coef, i, None, None)
        e = _combine(x, models, weights)
        src, previous = x, ets
        if i == 0:
            if ets or sample is not None:
                raise ValueError("step 0 starts a PLMS solver: pass state=None (the state given holds "
                                 f"{sorted(state.tensors())})")
            new = SolverState(ets=(e,), sample=x.clone())  # step 1 restarts from x: a copy the caller cannot reuse
        elif i == 1:
            new = SolverState(ets=ets)  # diffusers keeps e_1 nowhere
            if sample is None:  # a restarted solver: x is at timesteps[1] already (step 0 took it there)
                x_next = x.clone()
                return (x_next, new, e) if want_m else (x_next, new)
            if not ets:
                raise ValueError("step 1 restarts from state.sample with step 0's output: the state has sample "
                                 "but no ets.0")
            src, previous = sample, ets[-1:]
        else:
            new = SolverState(ets=(*ets, e)[-SolverState.MAX_ETS:])
        out = fused_step(src, [e, *reversed(previous)], list(combination(i, len(previous))), self.coef, i,
                         backend=self.backend)
        return (out.x_next, new, e) if want_m else (out.x_next, new)

    def _step_tensor(self, step_index, x):
        """A per-row step index as an int64 tensor on x's device; a shared one stays an int."""
        if isinstance(step_index, torch.Tensor):
            if step_index.shape != (x.shape[0],):
                raise ValueError(f"a per-row step_index must have shape ({x.shape[0]},), got {tuple(step_index.shape)}")
            return step_index.to(device=x.device, dtype=torch.int64)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step_index {step_index} is outside 0..{self.num_steps - 1} of this schedule")
        return int(step_index)


def _combine(x, models, weights):
    """m = sum_k weights[:, k] models[k] in float32, in x's dtype: (B, ...). weights: (B, K) or K floats.
    Always a new tensor (it is kept in the solver state)."""
    if isinstance(weights, torch.Tensor):
        view = (x.shape[0],) + (1,) * (x.dim() - 1)
        w = weights.to(device=x.device, dtype=torch.float32)
        m = models[0].float() * w[:, 0].reshape(view)
        for k in range(1, len(models)):
            m.addcmul_(models[k].float(), w[:, k].reshape(view))
    else:
        m = torch.mul(models[0].float(), float(weights[0]))
        for mk, wk in zip(models[1:], weights[1:]):
            m.add_(mk.float(), alpha=float(wk))
    return m.to(x.dtype)
