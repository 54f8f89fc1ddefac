"""One denoising update in one pass over memory: guidance (or a forecast), x_0, the solver update.

For each row b of a batch (its own step index and weights), with the row's coefficients from a
StepTable (step_table.py holds the equations):

    m = sum_k w[b,k] M_k ;  x0 = clamp(PX x + PM m) ;  eps = EX x + EM m + E0 x0
    x_next = AX x + A0 x0 + AE eps + AN z + AH h

Bytes that must move for an SDXL step with guidance: read x, M_0 = eps_uncond, M_1 = eps_cond, write
x_next: 4 x 256 KiB. diffusers' scheduler.step plus the eager guidance combine moves about 4x that
(every intermediate is a full tensor written and read back).

Three implementations, side by side: ``fused_step_ref`` (torch, the equations as written; what the
tests hold the others to), the CPU paths (torch on CPU: the affine map folded into per-row
coefficients first, so x_next is K + 1 fused multiply-adds without intermediates; with x_0 clamped,
DDIM's and DDPM's default, x_0 is built once in place and x_next folded from it:
``_fused_step_cpu`` with per-row tensors, ``_fused_step_cpu_scalar`` with Python floats when every
row shares the step), and the Triton kernel (one program per (block, row); compiled on CUDA,
interpreted on CPU under TRITON_INTERPRET=1).
``fused_step`` dispatches by device. Only the shared-step CPU path reads a tensor value on the host
(its coefficient row, already in host memory), so a CUDA step can be captured in a graph.
"""
import weakref
from typing import NamedTuple, Optional

import torch

from ._triton import AVAILABLE as TRITON, tl, triton
from .step_table import A0, AE, AH, AN, AX, E0, EM, EX, NCOEF, PM, PX

MAX_MODELS = 4  # guidance uses 2; a Taylor forecast of order 3 uses 4
BLOCK = 1024  # elements per program: 4 KiB of float32 per operand, enough to keep loads in flight


@triton.jit
def _weight(w_ptr, b, k, w_shared, K: tl.constexpr, PER_ROW: tl.constexpr):
    if PER_ROW:
        return tl.load(w_ptr + b * K + k)
    return w_shared


@triton.jit
def _fused_step_kernel(x_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, w_ptr, coef_ptr, step_ptr, z_ptr, h_ptr,
                       out_ptr, x0_ptr, m_ptr, n, clip, step_shared, w0, w1, w2, w3,
                       K: tl.constexpr, PER_ROW: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_HIST: tl.constexpr,
                       WRITE_X0: tl.constexpr, WRITE_M: tl.constexpr, CLIP: tl.constexpr, NC: tl.constexpr,
                       BLOCK: tl.constexpr):
    # PER_ROW: step index and weights come from (B,) and (B, K) tensors; otherwise they are scalar
    # arguments shared by every row, so a step is one launch with nothing to upload (CUDA-graph safe).
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    if PER_ROW:
        row = tl.load(step_ptr + b).to(tl.int64) * NC
    else:
        row = step_shared.to(tl.int64) * NC
    px = tl.load(coef_ptr + row + 0)
    pm = tl.load(coef_ptr + row + 1)
    ex = tl.load(coef_ptr + row + 2)
    em = tl.load(coef_ptr + row + 3)
    e0 = tl.load(coef_ptr + row + 4)
    ax = tl.load(coef_ptr + row + 5)
    a0 = tl.load(coef_ptr + row + 6)
    ae = tl.load(coef_ptr + row + 7)
    an = tl.load(coef_ptr + row + 8)
    ah = tl.load(coef_ptr + row + 9)

    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    m = _weight(w_ptr, b, 0, w0, K, PER_ROW) * tl.load(m0_ptr + base + offs, mask=mask).to(tl.float32)
    if K > 1:
        m += _weight(w_ptr, b, 1, w1, K, PER_ROW) * tl.load(m1_ptr + base + offs, mask=mask).to(tl.float32)
    if K > 2:
        m += _weight(w_ptr, b, 2, w2, K, PER_ROW) * tl.load(m2_ptr + base + offs, mask=mask).to(tl.float32)
    if K > 3:
        m += _weight(w_ptr, b, 3, w3, K, PER_ROW) * tl.load(m3_ptr + base + offs, mask=mask).to(tl.float32)
    x0 = px * x + pm * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    eps = ex * x + em * m + e0 * x0
    out = ax * x + a0 * x0 + ae * eps
    if HAS_NOISE:
        out += an * tl.load(z_ptr + base + offs, mask=mask).to(tl.float32)
    if HAS_HIST:
        out += ah * tl.load(h_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if WRITE_M:
        tl.store(m_ptr + base + offs, m.to(m_ptr.dtype.element_ty), mask=mask)


class StepOutput(NamedTuple):
    x_next: torch.Tensor
    x0: Optional[torch.Tensor]  # the data prediction x_0 (DPM-Solver++'s state), when asked for
    m: Optional[torch.Tensor]  # the model output used, sum_k w_k M_k (a forecaster's history), when asked for


def fused_step(x, models, weights, coef, step, noise=None, hist=None, clip=None, want_x0=False, want_m=False,
               backend=None):
    """One update for every row of a batch -> StepOutput(x_next, x0, m).

    x: (B, ...) latent, float32/float16/bfloat16. models: 1..4 tensors shaped like x (M_k).
    weights: (B, K) float32, the w_k of each row, or a list of K floats shared by every row.
    coef: (steps, NCOEF) float32 on x's device.
    step: (B,) int64 on x's device, each row's step index, or one int for every row.
    noise, hist: like x, or None (zeros).
    clip: clamp x_0 to [-clip, clip], or None. x0 and m are returned (like x) when asked for, else None.
    backend: None (by device: Triton on CUDA where it is installed, else the CPU path), 'triton', 'cpu' or 'ref'.
    """
    _check(x, models, weights, coef, step, noise, hist)
    if backend is None:
        backend = "triton" if x.is_cuda and TRITON else "cpu"
    if backend == "triton":
        return _fused_step_triton(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m)
    shared = isinstance(step, int) and not isinstance(weights, torch.Tensor)
    if backend == "cpu" and shared and not x.is_cuda:
        return _fused_step_cpu_scalar(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m)
    weights, step = _as_tensors(x, weights, step)
    if backend == "cpu":
        return _fused_step_cpu(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m)
    if backend == "ref":
        out = fused_step_ref(x, models, weights, coef, step, noise, hist, clip)
        return StepOutput(out.x_next, out.x0 if want_x0 else None, out.m if want_m else None)
    raise ValueError(f"backend must be None, 'triton', 'cpu' or 'ref', got {backend!r}")


def _as_tensors(x, weights, step):
    """The per-row forms of a shared weight list and a shared step index."""
    b = x.shape[0]
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor([list(weights)], dtype=torch.float32, device=x.device).expand(b, len(weights))
    if not isinstance(step, torch.Tensor):
        step = torch.full((b,), step, dtype=torch.int64, device=x.device)
    return weights, step


def _check(x, models, weights, coef, step, noise, hist):
    if not 1 <= len(models) <= MAX_MODELS:
        raise ValueError(f"fused_step takes 1 to {MAX_MODELS} model outputs, got {len(models)}")
    for name, t in [("model output", m) for m in models] + [("noise", noise), ("hist", hist)]:
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the latent {tuple(x.shape)}: they must match")
    b = x.shape[0]
    shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else (b, len(weights))
    if shape != (b, len(models)):
        raise ValueError(f"weights must be (B, K) = ({b}, {len(models)}) or K floats, got {shape}")
    if isinstance(step, torch.Tensor) and step.shape != (b,):
        raise ValueError(f"step must be (B,) = ({b},) or an int, got {tuple(step.shape)}")
    if coef.dim() != 2 or coef.shape[1] != NCOEF or coef.dtype != torch.float32 or coef.device != x.device:
        raise ValueError(f"coef must be a (steps, {NCOEF}) float32 tensor on {x.device}, got {tuple(coef.shape)} "
                         f"{coef.dtype} on {coef.device}: use FusedSampler(scheduler, device=...).coef")
    if isinstance(step, int) and not 0 <= step < coef.shape[0]:
        raise ValueError(f"step {step} is outside the table's 0..{coef.shape[0] - 1}")


def _rows(coef, step, ndim):
    """Per-row coefficients, (NCOEF, B, 1, ..., 1) float32, broadcastable against the latent."""
    r = coef.index_select(0, step).t().to(torch.float32)
    return r.reshape(r.shape + (1,) * (ndim - 1))


def fused_step_ref(x, models, weights, coef, step, noise=None, hist=None, clip=None):
    """The equations as written, in float32 (the reference the other paths are tested against).
    Returns StepOutput with x0 and m always filled."""
    r = _rows(coef, step, x.dim())
    w = weights.t().to(torch.float32).reshape((len(models), x.shape[0]) + (1,) * (x.dim() - 1))
    xf = x.float()
    m = sum(w[k] * models[k].float() for k in range(len(models)))
    x0 = r[PX] * xf + r[PM] * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    eps = r[EX] * xf + r[EM] * m + r[E0] * x0
    out = r[AX] * xf + r[A0] * x0 + r[AE] * eps
    if noise is not None:
        out = out + r[AN] * noise.float()
    if hist is not None:
        out = out + r[AH] * hist.float()
    return StepOutput(out.to(x.dtype), x0.to(x.dtype), m.to(x.dtype))


def _fused_step_cpu(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m):
    """The CPU path with a step index and weights per row: the row coefficients are folded into
    (B, 1, ..., 1) tensors first (a few flops on (B,) vectors), then each pass is one multiply-add.

    Without clipping the update is affine in (x, M_k, z, h): x_next is K + 1 passes (+1 for z, +1 for h).
    With clipping x_0 must exist on its own: m (K passes), x_0 (3: PX x, + PM m, clamp), then
    x_next = CX x + C0 x_0 + CM m (3), with CX = AX + AE EX, C0 = A0 + AE E0, CM = AE EM."""
    r = _rows(coef, step, x.dim())
    w = weights.t().to(torch.float32).reshape((len(models), x.shape[0]) + (1,) * (x.dim() - 1))
    xf = x if x.dtype == torch.float32 else x.float()
    if clip is not None:
        m = models[0].float() * w[0]
        for k in range(1, len(models)):
            m.addcmul_(models[k].float(), w[k])
        x0 = torch.mul(xf, r[PX]).addcmul_(m, r[PM]).clamp_(-clip, clip)
        out = torch.mul(x0, r[A0] + r[AE] * r[E0])
        out.addcmul_(m, r[AE] * r[EM]).addcmul_(xf, r[AX] + r[AE] * r[EX])
        _add_noise_and_history(out, noise, hist, r[AN], r[AH])
        return _as_dtype(x.dtype, out, x0 if want_x0 else None, m if want_m else None)
    # x_next = [AX + A0 PX + AE (EX + E0 PX)] x + [A0 PM + AE (EM + E0 PM)] m + AN z + AH h
    cx = r[AX] + r[A0] * r[PX] + r[AE] * (r[EX] + r[E0] * r[PX])
    cm = r[A0] * r[PM] + r[AE] * (r[EM] + r[E0] * r[PM])
    out = xf * cx
    for k, mk in enumerate(models):
        out.addcmul_(mk if mk.dtype == torch.float32 else mk.float(), cm * w[k])
    _add_noise_and_history(out, noise, hist, r[AN], r[AH])
    m = x0 = None
    if want_m or want_x0:
        m = models[0].float() * w[0]
        for k in range(1, len(models)):
            m.addcmul_(models[k].float(), w[k])
    if want_x0:
        x0 = (xf * r[PX]).addcmul_(m, r[PM])
    return _as_dtype(x.dtype, out, x0, m if want_m else None)


def _add_noise_and_history(out, noise, hist, an, ah):
    if noise is not None:
        out.addcmul_(noise.float(), an)
    if hist is not None:
        out.addcmul_(hist.float(), ah)


def _fused_step_cpu_scalar(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m):
    """The CPU path when every row shares the step and the weights (one session, or a batch of images
    of one prompt): the folded coefficients are Python floats, so x_next is one multiply and K + 2
    scaled adds (with x_0 clamped: _clipped_scalar), and no tensor is made for the coefficients. This
    is the hot path of an edge device."""
    c = _host_row(coef, step)
    weights = [float(wk) for wk in weights]
    f32 = [t if t is None or t.dtype == torch.float32 else t.float() for t in [x, *models, noise, hist]]
    xf, ms, z, h = f32[0], f32[1:-2], f32[-2], f32[-1]
    if clip is not None:
        out = _clipped_scalar(xf, ms, weights, z, h, float(clip), c, want_x0, want_m)
        if out is None:  # no model output reaches x_0 (PM or every weight is 0): the general per-row path
            weights, step = _as_tensors(x, weights, step)
            return _fused_step_cpu(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m)
        return _as_dtype(x.dtype, *out)
    px, pm, ex, em, e0, ax, a0, ae, an, ah = c
    cx = ax + a0 * px + ae * (ex + e0 * px)
    cm = a0 * pm + ae * (em + e0 * pm)
    if want_x0 and not want_m and ae * em == 0:
        # A multistep solver needs x_0 anyway: build it once (1 + K passes) and step from it, rather
        # than folding x_next and rebuilding x_0 beside it (2 passes more).
        x0 = torch.mul(xf, px)
        for mk, wk in zip(ms, weights):
            x0.add_(mk, alpha=pm * wk)
        out = torch.mul(xf, ax + ae * ex).add_(x0, alpha=a0 + ae * e0)
        _add_scaled(out, z, an)
        _add_scaled(out, h, ah)
        return _as_dtype(x.dtype, out, x0, None)
    out = torch.mul(xf, cx)
    for mk, wk in zip(ms, weights):
        out.add_(mk, alpha=cm * wk)
    _add_scaled(out, z, an)
    _add_scaled(out, h, ah)
    m = x0 = None
    if want_m or want_x0:
        m = torch.mul(ms[0], weights[0])
        for mk, wk in zip(ms[1:], weights[1:]):
            m.add_(mk, alpha=wk)
    if want_x0:
        x0 = torch.mul(xf, px).add_(m, alpha=pm)
    return _as_dtype(x.dtype, out, x0, m if want_m else None)


def _as_dtype(dtype, *tensors):
    """StepOutput of float32 results in the latent's dtype (no call at all when it is float32)."""
    return StepOutput(*(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors))


# Host copies of CPU coefficient tables, read once: id(coef) -> (weak reference, coef._version, coef.tolist()).
# A memo, not state: a table edited in place (its _version moves) is read again, a freed one drops out.
# Indexing and tolist() cost about 2 us a step after the passes over the latent have cooled the caches,
# a tenth of a clipped SD 1.5 step on one core (bench/README.md).
_HOST_ROWS = {}


def _host_row(coef, step):
    """Row ``step`` of a CPU coefficient table as Python floats."""
    if coef.is_inference():  # made under torch.inference_mode: no version counter to see an edit by
        return coef[step].tolist()
    key = id(coef)
    hit = _HOST_ROWS.get(key)
    if hit is None or hit[0]() is not coef or hit[1] != coef._version:
        hit = (weakref.ref(coef, lambda _, key=key: _HOST_ROWS.pop(key, None)), coef._version, coef.tolist())
        _HOST_ROWS[key] = hit
    return hit[2][step]


def _add_scaled(out, t, alpha):
    if t is not None and alpha:
        out.add_(t, alpha=alpha)


def _clipped_scalar(xf, ms, weights, z, h, clip, c, want_x0, want_m):
    """(x_next, x0, m) in float32 with x_0 clamped, every coefficient a Python float; None when no
    model output reaches x_0 (the caller takes the general path).

    diffusers' DDIM (clip_sample=True, its default) makes about ten full-size temporaries; this makes
    two and passes over memory 4 + K times (5 for guidance with epsilon prediction, +1 for a term in x,
    +1 for z). Two scalings are folded away instead of applied:

      m = s mm,  mm = M_p + sum_{k != p} (w_k / w_p) M_k    s = w_p, the weight of largest |w| (ratios <= 1)
      x_0 = clamp(PX x + PM m) = q clamp(y, -clip / |q|, clip / |q|),  y = mm + (PX / q) x,  q = PM s
          (the interval is symmetric, so it holds for either sign of q)
      x_next = CX x + C0 x_0 + CM m + AN z + AH h = (C0 q) y_c + (CM s) mm + CX x + AN z + AH h

    with CX = AX + AE EX, C0 = A0 + AE E0, CM = AE EM. Each float32 operation rounds once, as the
    reference's do, in another order: the results agree to float32 rounding, not bit for bit.
    """
    px, pm, ex, em, e0, ax, a0, ae, an, ah = c
    p = max(range(len(ms)), key=lambda k: abs(weights[k]))
    s = weights[p]
    q = pm * s
    if q == 0:
        return None
    mm = ms[p]  # an input: never written
    for k, (mk, wk) in enumerate(zip(ms, weights)):
        if k != p and wk:
            mm = torch.add(mm, mk, alpha=wk / s) if mm is ms[p] else mm.add_(mk, alpha=wk / s)
    lim = clip / abs(q)
    y = torch.add(mm, xf, alpha=px / q).clamp_(-lim, lim) if px else torch.clamp(mm, -lim, lim)
    cx, c0, cm = ax + ae * ex, a0 + ae * e0, ae * em
    x0 = None
    if want_x0:
        x0 = y.mul_(q)  # y is ours: scale it in place into x_0
        out = torch.mul(x0, c0)
    else:
        out = y.mul_(c0 * q)  # nothing else reads y_c: x_next accumulates in its memory
    _add_scaled(out, mm, cm * s)
    _add_scaled(out, xf, cx)
    _add_scaled(out, z, an)
    _add_scaled(out, h, ah)
    m = (mm * s if mm is ms[p] else mm.mul_(s)) if want_m else None
    return out, x0, m


def _fused_step_triton(x, models, weights, coef, step, noise, hist, clip, want_x0, want_m):
    per_row = isinstance(step, torch.Tensor) or isinstance(weights, torch.Tensor)
    if per_row:
        weights, step = _as_tensors(x, weights, step)
        w_shared, step_shared = [0.0] * MAX_MODELS, 0
        weights, step = weights.to(torch.float32).contiguous(), step.contiguous()
    else:
        w_shared, step_shared = [float(w) for w in weights] + [0.0] * (MAX_MODELS - len(weights)), step
        weights = step = coef  # unused pointers
    b = x.shape[0]
    n = x.numel() // b if b else 0
    xc = x.contiguous()
    ms = [m.contiguous() for m in models]
    ms += [ms[0]] * (MAX_MODELS - len(ms))  # unused pointers; K masks them out at compile time
    out = torch.empty_like(xc)
    x0 = torch.empty_like(xc) if want_x0 else out
    m = torch.empty_like(xc) if want_m else out
    z = noise.contiguous() if noise is not None else xc
    h = hist.contiguous() if hist is not None else xc
    if b and n:
        grid = (triton.cdiv(n, BLOCK), b)
        _fused_step_kernel[grid](
            xc, ms[0], ms[1], ms[2], ms[3], weights, coef, step, z, h, out, x0, m, n,
            float(clip) if clip is not None else 0.0, step_shared, *w_shared,
            K=len(models), PER_ROW=per_row, HAS_NOISE=noise is not None, HAS_HIST=hist is not None,
            WRITE_X0=want_x0, WRITE_M=want_m, CLIP=clip is not None, NC=NCOEF, BLOCK=BLOCK)
    return StepOutput(out, x0 if want_x0 else None, m if want_m else None)
