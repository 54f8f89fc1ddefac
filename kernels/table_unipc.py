"""UniPC (Zhao et al. 2023, Algs. 2-3, the B(h) variants) as diffusers' UniPCMultistepScheduler.step
computes it with predict_x0=True (the data-prediction form), solver_order 1 or 2, solver_type 'bh2'
(its default) or 'bh1'.

Symbols (diffusers' names): alpha_j, sigma_j the VP pair of step j (``_sigma_to_alpha_sigma_t`` of
scheduler.sigmas[j]; sigmas[N] is the end of the schedule); lambda_j = log(alpha_j / sigma_j); x_0,j the
data prediction of step j (``model_output_convert``, kept in ``model_outputs``); x^c_j the corrected sample
(``last_sample``). Over an interval s -> t: h = lambda_t - lambda_s, B(h) = e^{-h} - 1 (bh2) or -h (bh1),
and r_k = (lambda_{s-k} - lambda_s) / h for the k-th output before s.

Step i, from x_i with the model output m (guided: sum_k w_k M_k):

 1. x_0,i = PX x_i + PM m                       (epsilon: (x - sigma m) / alpha; v: alpha x - sigma m;
                                                 sample: m; flow: x - sigmas[i] m)
 2. UniC-p, the corrector over i-1 -> i, when the solver has x^c_{i-1} and p >= 1 outputs before x_0,i:
      x^c_i = sigma_i / sigma_{i-1} x^c_{i-1} - alpha_i (e^{-h} - 1) x_0,{i-1}
              - alpha_i B(h) [ rho_1 D_1 (p = 2) + rho_p (x_0,i - x_0,{i-1}) ],   D_1 = (x_0,{i-2} - x_0,{i-1}) / r_1
      rho = 1/2 (p = 1), or the solution of [[1, 1], [r_1, 1]] rho = [b_1, b_2] (p = 2), where
      g_1 = (e^{-h} - 1) / (-h) - 1, g_{k+1} = g_k / (-h) - 1 / (k+1)!, b_k = k! g_k / B(h).
    Otherwise (step 0, a restarted solver, i - 1 in disable_corrector) x^c_i = x_i.
 3. UniP-q, the predictor over i -> i+1 from x^c_i:
      x_{i+1} = sigma_{i+1} / sigma_i x^c_i - alpha_{i+1} (e^{-h} - 1) x_0,i
                - alpha_{i+1} B(h) (1/2) (x_0,{i-1} - x_0,i) / r_1                   (the last term for q = 2 only)
 Then model_outputs = (model_outputs + [x_0,i])[-solver_order:], last_sample = x^c_i.

The orders (``orders``): p is the order of the previous predictor, which is the number of outputs kept
(capped at solver_order); q = min(solver_order, kept + 1, and N - i under lower_order_final). diffusers
counts the warm-up in lower_order_nums and keeps p in this_order: both equal the count of outputs kept,
so a solver restarted with no state at step i > 0 warms up exactly as diffusers' does from its first step.

Each stage is affine, so each is a row of the fused step (step_table.py), with operands placed in its slots:

  plain[q-1]     no corrector: x0 = PX x + PM m,  x_next = AX x + A0 x0 + AH h,  h = x_0,{i-1} (q = 2)
  corrector[p-1] x = x^c_{i-1}; the models are [M_1.., x_i] with x_i weighted by x_weight[i] = PX / PM,
                 so x0 = PM (m + (PX / PM) x_i) = x_0,i, and x_next = x^c_i = AX x^c_{i-1} + A0 x_0,i
                 + AH x_0,{i-1} (p = 1), or + AN x_0,{i-1} + AH x_0,{i-2} (p = 2: the z slot carries an
                 output, not noise)
  predictor[q-1] x = x^c_i, the model is x_0,i (PM = 1), x_next = AX x^c_i + A0 x_0,i + AH x_0,{i-1} (q = 2)

Rows that no step reaches (a corrector of order p before step p, a second-order predictor at step 0)
are zeros. Refused: predict_x0=False, solver_order 3, thresholding, solver_p, and the two configurations
whose last step diffusers computes as inf or NaN at a final sigma of 0 (h = inf there: bh1's B(h) = -inf
times a zero term, or a second-order predictor's D_1 / r_1 with r_1 = 0).
"""
import math
from dataclasses import dataclass

import torch

from .step_table import NCOEF, StepTable, no_thresholding, prediction_type, require, row


@dataclass(frozen=True)
class UniPCTable(StepTable):
    """coef (= plain[0]): the step with no corrector and a first-order predictor, what a solver with no
    state takes. The other stages' rows, each (steps, NCOEF) float64, by order - 1 (module docstring)."""

    plain: tuple = ()
    corrector: tuple = ()
    predictor: tuple = ()
    x_weight: tuple = ()  # PX / PM of each step (0 for sample prediction): x_i's weight among the models
    solver_order: int = 2
    lower_order_final: bool = True
    disable_corrector: frozenset = frozenset()


def orders(table, step_index, kept, has_sample):
    """(p, q) at step ``step_index`` with ``kept`` outputs in the state and, or not, a last sample: the
    corrector's order (0: no correction) and the predictor's."""
    p = min(kept, table.solver_order) if has_sample and step_index - 1 not in table.disable_corrector else 0
    q = min(table.solver_order, kept + 1)
    if table.lower_order_final:
        q = min(q, table.coef.shape[0] - step_index)
    return p, q


def _alpha_sigma(scheduler, sigma):
    if scheduler.config.use_flow_sigmas:
        return 1 - sigma, sigma
    alpha = 1 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha


def _g(h, order):
    """[k! g_k for k = 1..order] (module docstring): b_k times B(h)."""
    hh = -h
    g, fact, out = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        out.append(g * fact)
        fact *= k + 1
        g = g / hh - 1 / fact
    return out


def table(scheduler):
    cfg = scheduler.config
    no_thresholding(scheduler)
    require(scheduler, scheduler.predict_x0, "predict_x0=False (the noise-prediction form)",
            "use predict_x0=True (the default)")
    require(scheduler, cfg.solver_order in (1, 2), f"solver_order {cfg.solver_order}", "use 1 or 2")
    require(scheduler, scheduler.solver_p is None, "solver_p (another scheduler as the predictor)",
            "leave solver_p unset")
    bh = cfg.solver_type
    require(scheduler, bh in ("bh1", "bh2"), f"solver_type {bh!r}", "use 'bh2' or 'bh1'")
    pred = prediction_type(scheduler, ("epsilon", "sample", "v_prediction", "flow_prediction"))
    sigmas = scheduler.sigmas.double().tolist()
    n = len(scheduler.timesteps)
    if sigmas[n] == 0:
        require(scheduler, bh == "bh2", "solver_type 'bh1' with a final sigma of 0",
                "use 'bh2', or final_sigmas_type='sigma_min' (diffusers' own last step is NaN: -h = -inf times 0)")
        require(scheduler, cfg.lower_order_final or cfg.solver_order == 1 or n == 1,
                "lower_order_final=False with a final sigma of 0",
                "set lower_order_final=True, or final_sigmas_type='sigma_min' (diffusers' own second-order "
                "last step divides by r_1 = 0: not finite)")
    alpha, sigma = zip(*(_alpha_sigma(scheduler, s) for s in sigmas))
    lam = [math.inf if s == 0 else math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]

    def big_b(h):  # B(h)
        return math.expm1(-h) if bh == "bh2" else -h

    zero = [0.0] * NCOEF
    plain, corrector, predictor = ([[] for _ in range(cfg.solver_order)] for _ in range(3))
    x_weight = []
    for i in range(n):
        x0 = {"epsilon": dict(px=1 / alpha[i], pm=-sigma[i] / alpha[i]), "sample": dict(pm=1.0),
              "v_prediction": dict(px=alpha[i], pm=-sigma[i]), "flow_prediction": dict(px=1.0, pm=-sigmas[i])}[pred]
        x_weight.append(x0.get("px", 0.0) / x0["pm"])
        # UniP over i -> i+1: x_next = cx x^c + c0 x_0,i + c1 x_0,{i-1}
        h = lam[i + 1] - lam[i]
        cx, c0 = sigma[i + 1] / sigma[i], -alpha[i + 1] * math.expm1(-h)
        plain[0].append(row(**x0, ax=cx, a0=c0))
        predictor[0].append(row(pm=1.0, ax=cx, a0=c0))
        if cfg.solver_order == 2:
            if i == 0 or math.isinf(h):  # unreachable: no output before step 0; refused above at h = inf
                plain[1].append(zero)
                predictor[1].append(zero)
            else:
                d = alpha[i + 1] * big_b(h) * 0.5 / ((lam[i - 1] - lam[i]) / h)  # alpha B(h) rho / r_1
                plain[1].append(row(**x0, ax=cx, a0=c0 + d, ah=-d))
                predictor[1].append(row(pm=1.0, ax=cx, a0=c0 + d, ah=-d))
        # UniC over i-1 -> i: x^c_i = cl x^c_{i-1} + k0 x_0,i + k1 x_0,{i-1} + k2 x_0,{i-2}
        pm = x0["pm"]
        for p in range(1, cfg.solver_order + 1):
            if i < p:
                corrector[p - 1].append(zero)
                continue
            h = lam[i] - lam[i - 1]
            ab = alpha[i] * big_b(h)
            cl, base = sigma[i] / sigma[i - 1], -alpha[i] * math.expm1(-h)
            if p == 1:
                rho = 0.5
                corrector[0].append(row(pm=pm, ax=cl, a0=-ab * rho, ah=base + ab * rho))
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                b1, b2 = (g / big_b(h) for g in _g(h, 2))
                # [[1, 1], [r1, 1]] (rho_1, rho_2) = (b1, b2)
                rho1 = (b1 - b2) / (1 - r1)
                rho2 = b1 - rho1
                corrector[1].append(row(pm=pm, ax=cl, a0=-ab * rho2, an=base + ab * (rho1 / r1 + rho2),
                                        ah=-ab * rho1 / r1))
    plain, corrector, predictor = (tuple(torch.tensor(r, dtype=torch.float64).reshape(-1, NCOEF) for r in rows)
                                   for rows in (plain, corrector, predictor))
    return UniPCTable(coef=plain[0], first_order=plain[0], plain=plain, corrector=corrector, predictor=predictor,
                      x_weight=tuple(x_weight), solver_order=cfg.solver_order,
                      lower_order_final=bool(cfg.lower_order_final),
                      disable_corrector=frozenset(int(j) for j in scheduler.disable_corrector))
