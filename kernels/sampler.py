"""FusedSampler: a configured diffusers scheduler, stepped by the fused kernel."""
from dataclasses import dataclass

import torch

from .fused_step import MAX_MODELS, _check, fused_step
from .step_table import UnsupportedScheduler
from .table_pndm import PLMSTable, combination
from .table_unipc import UniPCTable, orders
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
    UniPCMultistepScheduler keeps its converted outputs and corrected sample there (table_unipc.py,
    ``_step_unipc``), also stepped with int step indices.
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
        if isinstance(self.table, UniPCTable):  # each stage's rows by order - 1 (plain[0] is self.coef)
            self.unipc_coef = {kind: tuple(r.to(device=device, dtype=torch.float32) for r in getattr(self.table, kind))
                               for kind in ("plain", "corrector", "predictor")}
            self.unipc_coef["plain"] = (self.coef, *self.unipc_coef["plain"][1:])
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
        if isinstance(self.table, UniPCTable):
            return self._step_unipc(x, step, models, weights, state, want_m)
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

    def _step_unipc(self, x, i, models, weights, state, want_m):
        """UniPCMultistepScheduler's step (table_unipc.py has the equations and the rows).

        State (diffusers' name -> SolverState): model_outputs, the converted outputs x_0,j of the last
        solver_order steps -> ets, oldest first (the outputs of the steps just before this one);
        last_sample, the corrected sample x^c the last predictor started from -> sample; lower_order_nums
        and this_order -> len(ets) (they are equal in diffusers); x0_prev is unused. An empty state at
        step i > 0 (a receiver that restarts the solver) takes diffusers' first step: no corrector, a
        first-order predictor.

        Passes over memory, in latent-sized tensors, for guidance (two models). With the corrector, two
        fused passes: x_0,i and x^c_i from (x^c_{i-1}, u, c, x_i, x_0,{i-1}[, x_0,{i-2}]), then the
        predictor from (x^c_i, x_0,i[, x_0,{i-1}]); at second order 6 + 3 read and 2 + 1 written, 12 in all,
        where 9 is the least a step can move (its 6 inputs read once, its 3 results written once). Without
        the corrector (step 0, a restart, disable_corrector): one fused pass (x_i, u, c[, x_0,{i-1}] read;
        x_next, x_0,i written) and the copy of x_i kept as the sample (1 read, 1 write): 7 or 8. With
        want_m (or four models) m is combined first: K reads and 1 write more."""
        if isinstance(i, torch.Tensor):
            raise UnsupportedScheduler("UniPCMultistepScheduler: a per-row step_index is not supported: UniPC keeps "
                                       "one history of outputs per batch; step rows at different steps one at a time "
                                       "with an int step_index")
        table, rows = self.table, self.unipc_coef
        ets, sample = (state.ets, state.sample) if state is not None else ((), None)
        if state is not None and state.x0_prev is not None:
            raise ValueError("a UniPC state holds ets and sample, not x0_prev (DPM-Solver++'s): pass the state "
                             "this sampler returned")
        if len(ets) > min(table.solver_order, i):
            raise ValueError(f"step {i} of UniPC (solver_order {table.solver_order}) follows at most "
                             f"{min(table.solver_order, i)} kept outputs, the state holds {len(ets)}")
        if bool(ets) != (sample is not None):
            raise ValueError("a UniPC state holds ets and sample together (or neither, to restart the solver): "
                             f"got {sorted(state.tensors())}")
        for name, t in [(f"state.ets[{j}]", e) for j, e in enumerate(ets)] + [("state.sample", sample)]:
            if t is not None and t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, the latent {tuple(x.shape)}: they must match")
        _check(x, models, weights, self.coef, i, None, None)
        p, q = orders(table, i, len(ets), sample is not None)
        prev = ets[-1] if q == 2 else None  # x_0,{i-1}, read by a second-order predictor
        if p == 0:  # x^c_i = x_i: conversion and predictor in one pass
            out = fused_step(x, models, weights, rows["plain"][q - 1], i, hist=prev, want_x0=True, want_m=want_m,
                             backend=self.backend)
            x_next, x0, m, corrected = out.x_next, out.x0, out.m, x.clone()  # kept: a copy the caller cannot reuse
        else:
            m = None
            if want_m or len(models) == MAX_MODELS:  # m itself to return, or room for x_i among the models
                m32 = _combine_f32(x, models, weights)  # float32: x_0,i is not rounded through x's dtype
                models, weights, m = [m32], [1.0], m32.to(x.dtype)
            r = table.x_weight[i]
            if r:
                models, weights = [*models, x], _with_weight(weights, r)
            z, h = (ets[-1], ets[-2]) if p == 2 else (None, ets[-1])
            c = fused_step(sample, models, weights, rows["corrector"][p - 1], i, noise=z, hist=h, want_x0=True,
                           backend=self.backend)
            corrected, x0 = c.x_next, c.x0
            x_next = fused_step(corrected, [x0], [1.0], rows["predictor"][q - 1], i, hist=prev,
                                backend=self.backend).x_next
        new = SolverState(ets=(*ets, x0)[-table.solver_order:], sample=corrected)
        return (x_next, new, m) if want_m else (x_next, new)

    def _step_tensor(self, step_index, x):
        """A per-row step index as an int64 tensor on x's device; a shared one stays an int."""
        if isinstance(step_index, torch.Tensor):
            if step_index.shape != (x.shape[0],):
                raise ValueError(f"a per-row step_index must have shape ({x.shape[0]},), got {tuple(step_index.shape)}")
            return step_index.to(device=x.device, dtype=torch.int64)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step_index {step_index} is outside 0..{self.num_steps - 1} of this schedule")
        return int(step_index)


def _with_weight(weights, w):
    """weights ((B, K) or K floats) with one more column, w, for every row."""
    if isinstance(weights, torch.Tensor):
        return torch.cat([weights.to(torch.float32), weights.new_full((weights.shape[0], 1), w, dtype=torch.float32)],
                         dim=1)
    return [*weights, w]


def _combine(x, models, weights):
    """m = sum_k weights[:, k] models[k] in float32, in x's dtype: (B, ...). weights: (B, K) or K floats.
    Always a new tensor (it is kept in the solver state)."""
    return _combine_f32(x, models, weights).to(x.dtype)


def _combine_f32(x, models, weights):
    """_combine's sum before the rounding to x's dtype: float32, a new tensor."""
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
    return m
