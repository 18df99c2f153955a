"""Fused Encouraging Loss: the loss and its gradient in one forward pass.

The gradient of EL with respect to the logits has a closed form (EL_SPEC 3),
generalised here to separate target weights ``w`` for the NLL term and ``u``
for the bonus term, and the bonus weight ``rho``::

    dEL/dz_j = p_j sum(w) - w_j + rho (u_j g_j - p_j S),   S = sum_k u_k g_k,

with ``g = bonus_grad(log p)`` (:mod:`encouraging_loss.bonus`). Hard targets:
``w_y = 1 - eps + eps/V``, ``w_k = eps/V``; soft targets ``q``:
``w = (1 - eps) q + eps/V`` (``w = q`` when ``eps == 0``); ``u`` likewise with
``eps_b``.

The forward pass walks the rows in chunks, writes the gradient into one buffer
of the logits' shape and dtype and returns the per-row loss; the backward pass
only scales that buffer by ``grad_output``. Apart from that buffer no ``N x V``
temporary exists (chunks are ``C x V`` with ``C * V`` about
:data:`CHUNK_ELEMS`). float16 / bfloat16 logits are computed in float32,
float64 stays float64.

Back ends, chosen by :func:`fused_el_rows`:

* ``"triton"``: one Triton kernel launch for all rows
  (:mod:`encouraging_loss.triton_kernels`), used for CUDA tensors when Triton is
  importable, and on CPU when ``EL_TRITON_INTERPRET=1`` or ``TRITON_INTERPRET=1``
  (Triton's interpreter: slow, for tests).
* ``"compiled"``: the chunk function below under ``torch.compile`` (fixed chunk
  size, compiled lazily once per configuration, about half a minute). Used when
  ``EL_COMPILE=1``; any compilation error falls back to ``"eager"`` with a warning.
* ``"eager"``: the same closed form with in-place PyTorch ops on preallocated
  chunk buffers. Always available; the default on CPU.
"""
import math
import os
import warnings
from typing import Optional, Tuple

import torch

from .bonus import BonusConfig, bonus_grad, bonus_value

__all__ = [
    "BACKENDS",
    "CHUNK_ELEMS",
    "FusedELFunction",
    "fused_el_rows",
    "select_backend",
]

#: back ends of :class:`FusedELFunction`.
BACKENDS = ("eager", "compiled", "triton")
#: elements per row chunk (``C * V``) of the eager and compiled back ends.
CHUNK_ELEMS = 1 << 17
#: rows per chunk of the compiled back end (fixed, so that it compiles once).
COMPILED_ROWS = 64


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _interpret_requested() -> bool:
    return bool(_env_flag("EL_TRITON_INTERPRET") or _env_flag("TRITON_INTERPRET"))


def triton_available() -> bool:
    """True when :mod:`encouraging_loss.triton_kernels` imports (Triton installed)."""
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails to initialise
        return False
    return True


def select_backend(logits: torch.Tensor) -> str:
    """The back end :func:`fused_el_rows` uses for ``logits`` (see the module doc).

    ``EL_FUSED_BACKEND`` (``eager``, ``compiled`` or ``triton``) forces one."""
    forced = os.environ.get("EL_FUSED_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"EL_FUSED_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        return forced
    if (logits.is_cuda or _interpret_requested()) and triton_available():
        if logits.is_cuda or logits.device.type == "cpu":
            return "triton"
    if _env_flag("EL_COMPILE"):
        return "compiled"
    return "eager"


# --------------------------------------------------------------------------------------
# shared helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(V: int, N: int) -> int:
    return max(1, min(N, CHUNK_ELEMS // max(V, 1)))


def _dense_bonus(cfg: BonusConfig, eps_b: float, soft: bool) -> bool:
    """Whether the bonus has to be evaluated at every class (not only the target)."""
    return cfg.rho != 0.0 and (soft or eps_b > 0.0)


# --------------------------------------------------------------------------------------
# eager back end: in-place ops on chunk buffers


def _eager_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad):
    """Fill ``grad`` (``N x V``, logits' dtype) and return per-row (loss, nll, bonus)."""
    N, V = z.shape
    cdt = _compute_dtype(z.dtype)
    rho = float(cfg.rho)
    has_bonus = rho != 0.0
    dense = _dense_bonus(cfg, eps_b, soft)
    loss = torch.empty(N, dtype=cdt, device=z.device)
    nll = torch.empty(N, dtype=cdt, device=z.device)
    bonus = torch.zeros(N, dtype=cdt, device=z.device)
    C = _chunk_rows(V, N)
    xbuf = torch.empty((C, V), dtype=cdt, device=z.device)
    same = grad.dtype == cdt
    pbuf = None if same else torch.empty((C, V), dtype=cdt, device=z.device)
    qbuf = None
    if soft and tgt.dtype != cdt:
        qbuf = torch.empty((C, V), dtype=cdt, device=z.device)
    u_o = eps_b / V
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        n = r1 - r0
        zc = z[r0:r1]
        x = xbuf[:n]
        p = grad[r0:r1] if same else pbuf[:n]
        # log-softmax and softmax
        m = zc.amax(-1, keepdim=True).to(cdt)
        torch.sub(zc, m, out=x)
        torch.exp(x, out=p)
        s = p.sum(-1, keepdim=True)
        x.sub_(s.log())  # x = log p
        p.div_(s)  # p = softmax
        sum_lp = x.sum(-1) if (eps > 0.0 or dense) else None
        if soft:
            if qbuf is not None:
                q = qbuf[:n]
                q.copy_(tgt[r0:r1])
            else:
                q = tgt[r0:r1]
            q_lp = torch.bmm(q.unsqueeze(1), x.unsqueeze(2)).view(n)
            nll_c = -q_lp
            sum_q = q.sum(-1)
            smoothed = nll_c if eps == 0.0 else (1.0 - eps) * nll_c - (eps / V) * sum_lp
            sum_w = sum_q if eps == 0.0 else (1.0 - eps) * sum_q + eps
            valid = None
        else:
            tc = tgt[r0:r1]
            valid = tc != ignore_index
            tc = torch.where(valid, tc, torch.zeros_like(tc)).long().unsqueeze(1)
            lp_y = x.gather(1, tc).view(n)
            nll_c = -lp_y
            smoothed = nll_c if eps == 0.0 else (1.0 - eps) * nll_c - (eps / V) * sum_lp
            sum_w = None  # 1 for every valid row
        # bonus term and S = sum_k u_k g_k
        y_extra = None  # value added to the gradient at the target (hard targets)
        if not has_bonus:
            coef = sum_w
        elif not dense:  # hard targets, eps_b == 0: only p_y matters
            g_y = bonus_grad(lp_y, cfg)
            bonus_c = rho * bonus_value(lp_y, cfg)
            coef = 1.0 - rho * g_y
            y_extra = rho * g_y
        else:
            b = bonus_value(x, cfg)
            b_sum = b.sum(-1)
            if soft:
                qb = torch.bmm(q.unsqueeze(1), b.unsqueeze(2)).view(n)
            else:
                b_y = b.gather(1, tc).view(n)
            del b
            g = bonus_grad(x, cfg)
            g_sum = g.sum(-1)
            if soft:
                qg = torch.bmm(q.unsqueeze(1), g.unsqueeze(2)).view(n)
                bonus_c = rho * ((1.0 - eps_b) * qb + u_o * b_sum)
                S = (1.0 - eps_b) * qg + u_o * g_sum
                coef = sum_w - rho * S
            else:
                g_y = g.gather(1, tc).view(n)
                bonus_c = rho * ((1.0 - eps_b) * b_y + u_o * b_sum)
                S = (1.0 - eps_b) * g_y + u_o * g_sum
                coef = 1.0 - rho * S
                y_extra = rho * (1.0 - eps_b) * g_y
        # gradient: p * coef - w + rho * u * g
        if coef is not None:
            p.mul_(coef.unsqueeze(1))
        if has_bonus and dense:
            if soft and eps_b < 1.0:
                p.addcmul_(q, g, value=rho * (1.0 - eps_b))
            if u_o != 0.0:
                p.add_(g, alpha=rho * u_o)
            del g
        if soft:
            p.sub_(q, alpha=1.0 - eps)
            if eps > 0.0:
                p.sub_(eps / V)
        else:
            if eps > 0.0:
                p.sub_(eps / V)
            at_y = torch.full((n,), -(1.0 - eps), dtype=cdt, device=z.device)
            if y_extra is not None:
                at_y = at_y + y_extra
            p.scatter_add_(1, tc, at_y.unsqueeze(1))
            if not bool(valid.all()):
                p.index_fill_(0, (~valid).nonzero().view(-1), 0.0)
        loss_c = smoothed + bonus_c if has_bonus else smoothed
        if valid is not None:
            zero = torch.zeros((), dtype=cdt, device=z.device)
            loss_c = torch.where(valid, loss_c, zero)
            nll_c = torch.where(valid, nll_c, zero)
            if has_bonus:
                bonus_c = torch.where(valid, bonus_c, zero)
        loss[r0:r1] = loss_c
        nll[r0:r1] = nll_c
        if has_bonus:
            bonus[r0:r1] = bonus_c
        if not same:
            grad[r0:r1].copy_(p)
    return loss, nll, bonus


# --------------------------------------------------------------------------------------
# compiled back end: a pure chunk function under torch.compile


def _chunk_pure(zc, tc, params, *, cfg, V, soft, dense, has_bonus, smooth, ignore_index):
    """Per-row (loss, nll, bonus) and the gradient of one chunk, as pure functions.

    ``params`` is a float64 tensor ``[eps, eps_b, rho]`` (a tensor, so that
    changing ``rho`` during training does not recompile)."""
    cdt = _compute_dtype(zc.dtype)
    eps, eps_b, rho = params[0], params[1], params[2]
    x = zc.to(cdt)
    lp = torch.log_softmax(x, dim=-1)
    p = torch.exp(lp)
    if soft:
        q = tc.to(cdt)
        nll = -(q * lp).sum(-1)
        w = (1.0 - eps) * q + eps / V if smooth else q
        smoothed = -(w * lp).sum(-1)
        valid = None
    else:
        valid = tc != ignore_index
        t = torch.where(valid, tc, torch.zeros_like(tc)).long()
        onehot = torch.arange(V, device=zc.device).unsqueeze(0) == t.unsqueeze(1)
        lp_y = lp.gather(1, t.unsqueeze(1)).squeeze(1)
        nll = -lp_y
        w = torch.where(onehot, 1.0 - eps + eps / V, eps / V) if smooth else onehot.to(cdt)
        smoothed = (1.0 - eps) * nll - (eps / V) * lp.sum(-1) if smooth else nll
    grad = p * w.sum(-1, keepdim=True) - w
    if has_bonus:
        if dense:
            if soft:
                u = (1.0 - eps_b) * q + eps_b / V
            else:
                u = torch.where(onehot, 1.0 - eps_b + eps_b / V, eps_b / V)
            g = bonus_grad(lp, cfg)
            bonus = rho * (u * bonus_value(lp, cfg)).sum(-1)
            S = (u * g).sum(-1, keepdim=True)
            grad = grad + rho * (u * g - p * S)
        else:
            g_y = bonus_grad(lp_y, cfg)
            bonus = rho * bonus_value(lp_y, cfg)
            grad = grad + rho * (torch.where(onehot, g_y.unsqueeze(1), 0.0) - p * g_y.unsqueeze(1))
    else:
        bonus = torch.zeros_like(nll)
    loss = smoothed + bonus
    if valid is not None:
        zero = torch.zeros((), dtype=cdt, device=zc.device)
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
        grad = torch.where(valid.unsqueeze(1), grad, zero)
    return loss, nll, bonus, grad


def _chunk_into(zc, tc, params, out, **kw):
    loss, nll, bonus, grad = _chunk_pure(zc, tc, params, **kw)
    out.copy_(grad)
    return loss, nll, bonus


_COMPILED = {}
_COMPILE_FAILED = set()


def _compiled_chunk(key):
    """The compiled chunk function for ``key`` (None when compilation failed before)."""
    if key in _COMPILE_FAILED:
        return None
    fn = _COMPILED.get(key)
    if fn is None:
        # a fresh code object per key, so that dynamo's per-code recompile limit
        # is not shared between configurations
        code = _chunk_into.__code__.replace(co_name=f"_el_chunk_{len(_COMPILED)}")
        raw = type(_chunk_into)(code, _chunk_into.__globals__, code.co_name)
        fn = torch.compile(raw, dynamic=False, fullgraph=True)
        _COMPILED[key] = fn
    return fn


def _compiled_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad):
    N, V = z.shape
    C = COMPILED_ROWS
    full = (N // C) * C
    kw = dict(
        cfg=cfg, V=V, soft=soft, dense=_dense_bonus(cfg, eps_b, soft), has_bonus=cfg.rho != 0.0,
        smooth=eps > 0.0, ignore_index=int(ignore_index),
    )
    key = (
        z.dtype, grad.dtype, tgt.dtype, z.device.type, V, C,
        cfg.kind, cfg.log_end, cfg.bonus_start, cfg.gamma,
        kw["soft"], kw["dense"], kw["has_bonus"], kw["smooth"], kw["ignore_index"],
    )
    fn = _compiled_chunk(key) if full else None
    if full and fn is None:
        return None
    cdt = _compute_dtype(z.dtype)
    params = torch.tensor([eps, eps_b, float(cfg.rho)], dtype=torch.float64, device=z.device).to(cdt)
    loss = torch.empty(N, dtype=cdt, device=z.device)
    nll = torch.empty_like(loss)
    bonus = torch.empty_like(loss)
    try:
        for r0 in range(0, full, C):
            r1 = r0 + C
            parts = fn(z[r0:r1], tgt[r0:r1], params, grad[r0:r1], **kw)
            loss[r0:r1], nll[r0:r1], bonus[r0:r1] = parts
    except Exception as exc:  # compilation (or a compiled kernel) failed
        _COMPILE_FAILED.add(key)
        _COMPILED.pop(key, None)
        warnings.warn(
            f"encouraging_loss: torch.compile of the fused chunk failed ({type(exc).__name__}: {exc}); "
            "using the eager fused implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if full < N:  # the tail (fewer than C rows) runs eagerly instead of recompiling
        tail = _eager_rows(z[full:], tgt[full:], cfg, eps, eps_b, ignore_index, soft, grad[full:])
        for dst, src in zip((loss, nll, bonus), tail):
            dst[full:] = src
    return loss, nll, bonus


# --------------------------------------------------------------------------------------
# autograd Function


def _forward_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, backend):
    grad = torch.empty_like(z, memory_format=torch.contiguous_format)
    if z.shape[0] == 0:
        cdt = _compute_dtype(z.dtype)
        empty = torch.zeros(0, dtype=cdt, device=z.device)
        return (empty, empty.clone(), empty.clone()), grad
    if backend == "triton":
        from .triton_kernels import el_rows_triton

        parts = el_rows_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad)
        return parts, grad
    if backend == "compiled":
        parts = _compiled_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad)
        if parts is not None:
            return parts, grad
    return _eager_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad), grad


class FusedELFunction(torch.autograd.Function):
    """Per-row EL of 2-D ``logits`` (``N x V``); the gradient is computed in forward.

    ``apply(logits, target, cfg, eps, eps_b, ignore_index, soft, backend)`` returns
    ``(loss, nll, bonus)``, each of shape ``(N,)``; only ``loss`` is differentiable.
    ``target`` is ``(N,)`` class indices or ``(N, V)`` soft targets (no gradient).
    """

    @staticmethod
    def forward(ctx, logits, target, cfg, eps, eps_b, ignore_index, soft, backend="eager"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        z = logits if logits.is_contiguous() else logits.contiguous()
        tgt = target if target.is_contiguous() else target.contiguous()
        (loss, nll, bonus), grad = _forward_rows(z, tgt, cfg, float(eps), float(eps_b), ignore_index, soft, backend)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(nll, bonus)
        return loss, nll, bonus

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_nll, grad_bonus):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 8
        go = grad_loss.to(grad.dtype).unsqueeze(-1)
        # the buffer may be scaled in place unless the graph is kept for another backward
        try:
            keep = torch._C._autograd._get_current_graph_task_keep_graph()
        except (AttributeError, RuntimeError):
            keep = True
        if keep:
            return (grad * go,) + (None,) * 7
        if go.numel() and go.stride(0) == 0 and grad_loss.device.type == "cpu":
            scale = go.reshape(-1)[0]  # the same factor for every row (mean / sum)
            if float(scale) == 1.0:
                return (grad,) + (None,) * 7
            return (grad.mul_(scale),) + (None,) * 7
        return (grad.mul_(go),) + (None,) * 7


def fused_el_rows(logits, target, cfg, eps, eps_b, ignore_index, soft):
    """Fused counterpart of :func:`encouraging_loss.functional._reference`.

    Same arguments and return contract: per-row ``(loss, nll, bonus, valid)`` of
    shape ``logits.shape[:-1]`` (float32 for float16/bfloat16 logits, float64
    for float64); ``valid`` is the non-ignored mask for class-index targets and
    ``None`` for soft targets. ``loss`` carries the gradient (computed in the
    forward pass); ``nll`` and ``bonus`` are not differentiable.
    """
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    z = logits.reshape(-1, V)
    tgt = target.reshape(-1, V) if soft else target.reshape(-1)
    backend = select_backend(z)
    loss, nll, bonus = FusedELFunction.apply(z, tgt, cfg, float(eps), float(eps_b), int(ignore_index), bool(soft), backend)
    valid = None if soft else target != ignore_index
    return loss.view(lead), nll.view(lead), bonus.view(lead), valid
