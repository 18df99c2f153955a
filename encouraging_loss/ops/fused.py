"""Fused Encouraging Loss: the loss and its gradient in one forward pass.

The gradient of EL with respect to the logits has a closed form (EL_SPEC 3),
generalised here to separate target weights ``w`` for the NLL term and ``u``
for the bonus term, and the bonus weight ``rho``::

    dEL/dz_j = p_j sum(w) - w_j + rho (u_j g_j - p_j S),   S = sum_k u_k g_k,

with ``g = bonus_grad(log p)`` (:mod:`encouraging_loss.bonus`). Hard targets:
``w_y = 1 - eps + eps/V``, ``w_k = eps/V``; soft targets ``q``:
``w = (1 - eps) q + eps/V`` (``w = q`` when ``eps == 0``); ``u`` likewise with
``eps_b``. Per-class weights ``c`` (``weight=``, ``F.cross_entropy``'s
meaning) multiply both element-wise, ``w_k c_k`` and ``u_k c_k``: the same
closed form with ``sum(w) != 1``. Every back end takes that path only when a
weight is given (a Python-level branch); without one it runs exactly as
before.

On CPU the forward pass walks the rows in chunks, writes the gradient into one
buffer of the logits' shape and dtype and returns the per-row loss; the
backward pass only scales that buffer by ``grad_output`` (the Triton back end
differs, below). Apart from that buffer no ``N x V``
temporary exists (chunks are ``C x V`` with ``C * V`` about
:data:`CHUNK_ELEMS`). float16 / bfloat16 logits are computed in float32,
float64 stays float64.

When no gradient is needed (``torch.no_grad()``, or logits that do not require
grad) :func:`fused_el_rows` computes the per-row values only, in every back
end: no gradient pass and no ``N x V`` buffer, chunk-sized scratch memory only.

Back ends, chosen by :func:`fused_el_rows`:

* ``"triton"``: Triton kernels (:mod:`encouraging_loss.ops.triton_kernels`), used
  for CUDA tensors when Triton is importable, and on CPU when
  ``EL_TRITON_INTERPRET=1`` or ``TRITON_INTERPRET=1`` (Triton's interpreter:
  slow, for tests). Unlike the CPU back ends it stores no gradient in the
  forward pass: the forward kernel returns the loss and per-row statistics,
  the backward kernel recomputes ``p`` from the kept logits and writes
  ``grad_output * dEL/dz`` in one pass (into the logits' storage with
  ``inplace_backward``).
* ``"compiled"``: two chunk functions below (row statistics, then the gradient)
  under ``torch.compile`` (fixed chunk of :data:`COMPILED_ROWS` rows, the tail
  padded; compiled lazily once per configuration, 2-7 s here, cached on disk by
  inductor). On CPU it runs at about the speed of ``F.cross_entropy``.
  ``EL_COMPILE=1`` always uses it, ``EL_COMPILE=0`` never; unset, CPU inputs of
  at least :data:`COMPILE_MIN_ELEMS` elements use it. Any compilation error
  falls back to ``"eager"`` with a warning.
* ``"eager"``: the same closed form with in-place PyTorch ops on preallocated
  chunk buffers (``log_softmax`` into one, ``p`` into the gradient, ``b`` and
  ``g`` from one :func:`~encouraging_loss.bonus.bonus_value_and_grad` call).
  Always available, no start-up cost, about 2.3x slower than
  ``F.cross_entropy`` on a 2-core CPU with the bonus at every class
  (``bonus.py``'s element-wise ops dominate), faster than it without
  (``eps_b == 0``).
"""
import functools
import os
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD

from ..bonus import BonusConfig, bonus_grad, bonus_rows, bonus_value, bonus_value_and_grad
from ..checks import under_transform
from ..reference import reference_rows

__all__ = [
    "BACKENDS",
    "CHUNK_ELEMS",
    "COMPILED_ROWS",
    "COMPILE_MIN_ELEMS",
    "FusedELFunction",
    "fused_el_rows",
    "select_backend",
]

#: back ends of :class:`FusedELFunction`.
BACKENDS = ("eager", "compiled", "triton")
#: elements per row chunk (``C * V``) of the eager and compiled back ends.
CHUNK_ELEMS = 1 << 16
#: rows per chunk of the compiled back end (fixed, so that it compiles once).
COMPILED_ROWS = 256
#: with ``EL_COMPILE`` unset, CPU logits of at least this many elements use the
#: compiled back end (its compilation, a few seconds once per configuration and
#: cached on disk by inductor, pays off after a few hundred calls: a training run).
COMPILE_MIN_ELEMS = 1 << 20


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _interpret_requested() -> bool:
    return bool(_env_flag("EL_TRITON_INTERPRET") or _env_flag("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when :mod:`encouraging_loss.ops.triton_kernels` imports (Triton installed)."""
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails to initialise
        return False
    return True


def select_backend(logits: torch.Tensor) -> str:
    """The back end :func:`fused_el_rows` uses for ``logits`` (see the module doc).

    ``EL_FUSED_BACKEND`` (``eager``, ``compiled`` or ``triton``) forces one."""
    forced = os.environ.get("EL_FUSED_BACKEND", "").strip().lower()
    on_cpu = logits.device.type == "cpu"
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"EL_FUSED_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if forced == "triton":
            if not (logits.is_cuda or (on_cpu and _interpret_requested())):
                raise ValueError(
                    f"EL_FUSED_BACKEND=triton needs CUDA tensors, got logits on {logits.device} "
                    "(set TRITON_INTERPRET=1 to run the Triton kernel through its CPU interpreter, "
                    "or EL_FUSED_BACKEND=eager / compiled on CPU)"
                )
            if not triton_available():
                raise ValueError("EL_FUSED_BACKEND=triton, but Triton cannot be imported here (pip install triton)")
        return forced
    if (logits.is_cuda or (on_cpu and _interpret_requested())) and triton_available():
        return "triton"
    compile_flag = _env_flag("EL_COMPILE")
    if compile_flag is None:  # auto: compile where the one-off compilation pays for itself
        compile_flag = logits.device.type == "cpu" and logits.numel() >= COMPILE_MIN_ELEMS
    return "compiled" if compile_flag else "eager"


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


def _log_softmax_into(zc, cdt, buf):
    """``log_softmax(zc)`` in the compute dtype, into ``buf`` where the dtypes allow."""
    if zc.dtype == cdt:
        torch.ops.aten._log_softmax.out(zc, -1, False, out=buf)
        return buf
    return torch.log_softmax(zc, -1, dtype=cdt)


def _eager_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad, cw=None):
    """Return per-row (loss, nll, bonus) and, unless ``grad`` is None, fill ``grad``
    (``N x V``, logits' dtype) with the gradient. Scratch memory: a few ``C x V``
    chunk buffers; without ``grad`` no ``N x V`` tensor is allocated.
    ``cw``: per-class weights (1-D, compute dtype) or None."""
    N, V = z.shape
    cdt = _compute_dtype(z.dtype)
    dev = z.device
    rho = float(cfg.rho)
    has_bonus = rho != 0.0
    dense = _dense_bonus(cfg, eps_b, soft)
    want_grad = grad is not None
    loss = torch.empty(N, dtype=cdt, device=dev)
    nll = torch.empty(N, dtype=cdt, device=dev)
    bonus = torch.zeros(N, dtype=cdt, device=dev)
    C = _chunk_rows(V, N)
    xbuf = torch.empty((C, V), dtype=cdt, device=dev)
    same = want_grad and grad.dtype == cdt
    pbuf = torch.empty((C, V), dtype=cdt, device=dev) if (want_grad and not same) else None
    qbuf = torch.empty((C, V), dtype=cdt, device=dev) if (soft and tgt.dtype != cdt) else None
    u_o = eps_b / V
    zero = torch.zeros((), dtype=cdt, device=dev)
    if cw is not None:  # weighted: the uniform eps/V and eps_b/V become eps/V c and eps_b/V c
        cw_row = cw.unsqueeze(0)
        c_sum = cw.sum()
        wbuf = torch.empty((C, V), dtype=cdt, device=dev) if soft else None
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        n = r1 - r0
        x = _log_softmax_into(z[r0:r1], cdt, xbuf[:n])  # log p
        p = None
        if want_grad:
            p = grad[r0:r1] if same else pbuf[:n]
            torch.exp(x, out=p)
        if eps == 0.0:
            sum_lp = None
        elif cw is None:
            sum_lp = x.sum(-1)
        else:
            sum_lp = torch.mv(x, cw)  # sum_k c_k log p_k
        c_y = None  # the target's class weight (weighted hard targets)
        if soft:
            if cw is not None:  # q c: the weighted soft targets, in place of q below
                q = torch.mul(tgt[r0:r1], cw_row, out=wbuf[:n])
            elif qbuf is not None:
                q = qbuf[:n]
                q.copy_(tgt[r0:r1])
            else:
                q = tgt[r0:r1]
            nll_c = -torch.bmm(q.unsqueeze(1), x.unsqueeze(2)).view(n)
            smoothed = nll_c if eps == 0.0 else (1.0 - eps) * nll_c - (eps / V) * sum_lp
            coef = None
            if want_grad:
                sum_q = q.sum(-1)
                if cw is None:
                    coef = sum_q if eps == 0.0 else (1.0 - eps) * sum_q + eps
                else:
                    coef = sum_q if eps == 0.0 else (1.0 - eps) * sum_q + (eps / V) * c_sum
            valid = None
        else:
            tc = tgt[r0:r1]
            valid = tc != ignore_index
            tc = torch.where(valid, tc, torch.zeros_like(tc)).long().unsqueeze(1)
            lp_y = x.gather(1, tc).view(n)
            nll_c = -lp_y
            coef = None  # sum(w) = 1 for every valid row
            if cw is not None:
                c_y = cw[tc.view(n)]
                nll_c = nll_c * c_y
                coef = c_y if eps == 0.0 else (1.0 - eps) * c_y + (eps / V) * c_sum
            smoothed = nll_c if eps == 0.0 else (1.0 - eps) * nll_c - (eps / V) * sum_lp
        # bonus term, and for the gradient S = sum_k u_k g_k
        y_extra = None  # value added to the gradient at the target (hard targets)
        g = None
        if not has_bonus:
            pass
        elif not dense:  # hard targets, eps_b == 0: only p_y matters
            if want_grad:
                b_y, g_y = bonus_value_and_grad(lp_y, cfg)
                if c_y is not None:
                    g_y = c_y * g_y
                    coef = coef - rho * g_y
                else:
                    coef = 1.0 - rho * g_y
                y_extra = rho * g_y
            else:
                b_y = bonus_value(lp_y, cfg)
            bonus_c = rho * b_y if c_y is None else rho * (c_y * b_y)
        else:
            if want_grad:
                b, g = bonus_rows(x, cfg, p=p)  # p == exp(x) exactly
            else:
                b = bonus_rows(x, cfg, want_g=False)[0]
            b_sum = b.sum(-1) if cw is None else torch.mv(b, cw)
            if soft:
                b_t = torch.bmm(q.unsqueeze(1), b.unsqueeze(2)).view(n)
            else:
                b_t = b.gather(1, tc).view(n)
                if c_y is not None:
                    b_t = b_t * c_y
            del b
            bonus_c = rho * ((1.0 - eps_b) * b_t + u_o * b_sum)
            if want_grad:
                if soft:
                    g_t = torch.bmm(q.unsqueeze(1), g.unsqueeze(2)).view(n)
                else:
                    g_t = g.gather(1, tc).view(n)
                    if c_y is not None:
                        g_t = g_t * c_y
                    y_extra = rho * (1.0 - eps_b) * g_t
                S = (1.0 - eps_b) * g_t + u_o * (g.sum(-1) if cw is None else torch.mv(g, cw))
                coef = (1.0 if coef is None else coef) - rho * S
        if want_grad:
            # gradient: p * coef - w + rho * u * g
            if coef is not None:
                p.mul_(coef.unsqueeze(1))
            if g is not None:
                if soft and eps_b < 1.0:
                    p.addcmul_(q, g, value=rho * (1.0 - eps_b))
                if u_o != 0.0:
                    if cw is None:
                        p.add_(g, alpha=rho * u_o)
                    else:
                        p.addcmul_(g, cw_row, value=rho * u_o)
                del g
            if soft:
                p.sub_(q, alpha=1.0 - eps)
                if eps > 0.0:
                    if cw is None:
                        p.sub_(eps / V)
                    else:
                        p.sub_(cw_row, alpha=eps / V)
            else:
                if eps > 0.0:
                    if cw is None:
                        p.sub_(eps / V)
                    else:
                        p.sub_(cw_row, alpha=eps / V)
                w_y = (1.0 - eps) if c_y is None else (1.0 - eps) * c_y
                at_y = -w_y if y_extra is None else y_extra - w_y
                if isinstance(at_y, float):
                    p.scatter_add_(1, tc, torch.full((n, 1), at_y, dtype=cdt, device=dev))
                else:
                    p.scatter_add_(1, tc, at_y.unsqueeze(1))
                if not bool(valid.all()):
                    p.index_fill_(0, (~valid).nonzero().view(-1), 0.0)
            if not same:
                grad[r0:r1].copy_(p)
        loss_c = smoothed + bonus_c if has_bonus else smoothed
        if valid is not None:
            loss_c = torch.where(valid, loss_c, zero)
            nll_c = torch.where(valid, nll_c, zero)
            if has_bonus:
                bonus_c = torch.where(valid, bonus_c, zero)
        loss[r0:r1] = loss_c
        nll[r0:r1] = nll_c
        if has_bonus:
            bonus[r0:r1] = bonus_c
    return loss, nll, bonus


# --------------------------------------------------------------------------------------
# compiled back end: a pure chunk function under torch.compile


def _chunk_stats(zc, tc, params, out, cw=None, *, cfg, V, soft, dense, has_bonus, ignore_index, scratch,
                 need_grad=True):
    """Pass 1 of a chunk, as pure functions (for torch.compile): per-row statistics.

    Returns ``(m, log_s, loss, nll, bonus, coef, y_extra)``: ``log p = (z - m) - log_s``,
    the gradient is ``p * coef - w + rho * u * g`` (dense bonus) or
    ``p * coef - w + [j == y] * y_extra``. ``params`` is a tensor
    ``[eps, eps_b, rho]`` (a tensor, so that a new ``rho`` does not recompile).
    With ``scratch`` (dense bonus, ``out`` in the compute dtype) ``g`` is left in
    ``out`` for pass 2, which then need not evaluate the bonus again. Without
    ``need_grad`` (``out`` unused, may be None) ``g`` is never evaluated and
    ``coef`` / ``y_extra`` are meaningless. ``cw``: per-class weights (1-D,
    compute dtype) or None; a weighted chunk multiplies every target weight by
    its class's weight."""
    if cw is not None:
        return _chunk_stats_weighted(zc, tc, params, out, cw, cfg=cfg, V=V, soft=soft, dense=dense,
                                     has_bonus=has_bonus, ignore_index=ignore_index, scratch=scratch,
                                     need_grad=need_grad)
    cdt = _compute_dtype(zc.dtype)
    eps, eps_b, rho = params[0], params[1], params[2]
    x = zc.to(cdt)
    m = x.amax(-1, keepdim=True)
    log_s = torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    lp = (x - m) - log_s  # in this order, as log_softmax: accurate for p near 1
    zero = torch.zeros((), dtype=cdt, device=zc.device)
    if soft:
        q = tc.to(cdt)
        nll = -(q * lp).sum(-1)
        smoothed = (1.0 - eps) * nll - (eps / V) * lp.sum(-1)
        sum_w = (1.0 - eps) * q.sum(-1) + eps
        valid = None
    else:
        valid = tc != ignore_index
        t = torch.where(valid, tc, torch.zeros_like(tc)).long().unsqueeze(1)
        lp_y = lp.gather(1, t).squeeze(1)
        nll = -lp_y
        smoothed = (1.0 - eps) * nll - (eps / V) * lp.sum(-1)
        sum_w = torch.ones_like(nll)
    y_extra = torch.zeros_like(nll)
    top_lp = -log_s  # log p of each row's maximum
    if has_bonus and not need_grad:  # the loss only: no g, no S
        if dense and soft:
            u = (1.0 - eps_b) * q + eps_b / V
            bsum = (u * bonus_rows(lp, cfg, want_g=False, top_lp=top_lp)[0]).sum(-1)
        elif dense:
            bsum = (1.0 - eps_b) * bonus_value(lp_y, cfg) + (eps_b / V) * bonus_rows(
                lp, cfg, want_g=False, top_lp=top_lp)[0].sum(-1)
        else:
            bsum = bonus_value(lp_y, cfg)
        bonus = rho * bsum
        coef = sum_w
    elif has_bonus:
        if dense:
            b, g = bonus_rows(lp, cfg, top_lp=top_lp)
            if scratch:
                out.copy_(g)
            if soft:
                u = (1.0 - eps_b) * q + eps_b / V
                bsum = (u * b).sum(-1)
                S = (u * g).sum(-1)
            else:
                bsum = (1.0 - eps_b) * bonus_value(lp_y, cfg) + (eps_b / V) * b.sum(-1)
                S = (1.0 - eps_b) * bonus_grad(lp_y, cfg) + (eps_b / V) * g.sum(-1)
                y_extra = rho * (1.0 - eps_b) * bonus_grad(lp_y, cfg)
        else:
            bsum = bonus_value(lp_y, cfg)
            S = bonus_grad(lp_y, cfg)
            y_extra = rho * S
        bonus = rho * bsum
        coef = sum_w - rho * S
    else:
        bonus = torch.zeros_like(nll)
        coef = sum_w
    loss = smoothed + bonus
    if valid is not None:
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
        coef = torch.where(valid, coef, zero)
        y_extra = torch.where(valid, y_extra, zero)
    return m, log_s, loss, nll, bonus, coef, y_extra


def _chunk_grad(zc, tc, params, m, log_s, coef, y_extra, out, cw=None, *, cfg, V, soft, dense, has_bonus,
                ignore_index, scratch):
    """Pass 2 of a chunk (pure pointwise, for torch.compile): write the gradient into ``out``
    (``cw``: per-class weights or None, as :func:`_chunk_stats`)."""
    if cw is not None:
        return _chunk_grad_weighted(zc, tc, params, m, log_s, coef, y_extra, out, cw, cfg=cfg, V=V, soft=soft,
                                    dense=dense, has_bonus=has_bonus, ignore_index=ignore_index, scratch=scratch)
    cdt = _compute_dtype(zc.dtype)
    eps, eps_b, rho = params[0], params[1], params[2]
    lp = (zc.to(cdt) - m) - log_s
    p = torch.exp(lp)
    if has_bonus and dense:
        g = out if scratch else bonus_rows(lp, cfg, want_b=False, top_lp=-log_s)[1]
    grad = p * coef.unsqueeze(1)
    if soft:
        q = tc.to(cdt)
        grad = grad - ((1.0 - eps) * q + eps / V)
        if has_bonus:
            grad = grad + rho * ((1.0 - eps_b) * q + eps_b / V) * g
    else:
        valid = (tc != ignore_index).unsqueeze(1)
        onehot = torch.arange(V, device=zc.device).unsqueeze(0) == tc.unsqueeze(1)
        grad = grad + torch.where(onehot, y_extra.unsqueeze(1) - (1.0 - eps), 0.0) - eps / V
        if has_bonus and dense:
            grad = grad + (rho * eps_b / V) * g
        grad = torch.where(valid, grad, 0.0)
    out.copy_(grad)


def _chunk_stats_weighted(zc, tc, params, out, cw, *, cfg, V, soft, dense, has_bonus, ignore_index, scratch,
                          need_grad=True):
    """:func:`_chunk_stats` with per-class weights ``c``: target weights ``w c``
    and ``u c`` (``nll`` is the weighted NLL); same return contract."""
    cdt = _compute_dtype(zc.dtype)
    eps, eps_b, rho = params[0], params[1], params[2]
    x = zc.to(cdt)
    m = x.amax(-1, keepdim=True)
    log_s = torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    lp = (x - m) - log_s
    zero = torch.zeros((), dtype=cdt, device=zc.device)
    c_sum = cw.sum()
    wsum_lp = (lp * cw).sum(-1)  # sum_k c_k log p_k
    if soft:
        q = tc.to(cdt) * cw
        nll = -(q * lp).sum(-1)
        sum_w = (1.0 - eps) * q.sum(-1) + (eps / V) * c_sum
        valid = None
    else:
        valid = tc != ignore_index
        t = torch.where(valid, tc, torch.zeros_like(tc)).long().unsqueeze(1)
        c_y = cw[t.squeeze(1)]
        lp_y = lp.gather(1, t).squeeze(1)
        nll = -lp_y * c_y
        sum_w = (1.0 - eps) * c_y + (eps / V) * c_sum
    smoothed = (1.0 - eps) * nll - (eps / V) * wsum_lp
    y_extra = torch.zeros_like(nll)
    top_lp = -log_s
    if has_bonus:
        want_g = need_grad
        if dense:
            b, g = bonus_rows(lp, cfg, want_g=want_g, top_lp=top_lp)
            if soft:
                u = (1.0 - eps_b) * q + (eps_b / V) * cw
                bsum = (u * b).sum(-1)
                S = (u * g).sum(-1) if want_g else None
            else:
                bsum = (1.0 - eps_b) * c_y * bonus_value(lp_y, cfg) + (eps_b / V) * (b * cw).sum(-1)
                if want_g:
                    g_y = c_y * bonus_grad(lp_y, cfg)
                    S = (1.0 - eps_b) * g_y + (eps_b / V) * (g * cw).sum(-1)
                    y_extra = rho * (1.0 - eps_b) * g_y
            if want_g and scratch:
                out.copy_(g)
        else:
            bsum = c_y * bonus_value(lp_y, cfg)
            if want_g:
                S = c_y * bonus_grad(lp_y, cfg)
                y_extra = rho * S
        bonus = rho * bsum
        coef = sum_w - rho * S if want_g else sum_w
    else:
        bonus = torch.zeros_like(nll)
        coef = sum_w
    loss = smoothed + bonus
    if valid is not None:
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
        coef = torch.where(valid, coef, zero)
        y_extra = torch.where(valid, y_extra, zero)
    return m, log_s, loss, nll, bonus, coef, y_extra


def _chunk_grad_weighted(zc, tc, params, m, log_s, coef, y_extra, out, cw, *, cfg, V, soft, dense, has_bonus,
                         ignore_index, scratch):
    """:func:`_chunk_grad` with per-class weights ``c``: ``p coef - w c + rho u c g``."""
    cdt = _compute_dtype(zc.dtype)
    eps, eps_b, rho = params[0], params[1], params[2]
    lp = (zc.to(cdt) - m) - log_s
    p = torch.exp(lp)
    if has_bonus and dense:
        g = out if scratch else bonus_rows(lp, cfg, want_b=False, top_lp=-log_s)[1]
    c = cw.unsqueeze(0)
    grad = p * coef.unsqueeze(1)
    if soft:
        q = tc.to(cdt) * c
        grad = grad - ((1.0 - eps) * q + (eps / V) * c)
        if has_bonus:
            grad = grad + rho * ((1.0 - eps_b) * q + (eps_b / V) * c) * g
    else:
        valid = (tc != ignore_index).unsqueeze(1)
        t = torch.where(tc != ignore_index, tc, torch.zeros_like(tc)).long()
        c_y = cw[t].unsqueeze(1)
        onehot = torch.arange(V, device=zc.device).unsqueeze(0) == tc.unsqueeze(1)
        grad = grad + torch.where(onehot, y_extra.unsqueeze(1) - (1.0 - eps) * c_y, 0.0) - (eps / V) * c
        if has_bonus and dense:
            grad = grad + (rho * eps_b / V) * c * g
        grad = torch.where(valid, grad, 0.0)
    out.copy_(grad)


_COMPILED = {}
_COMPILE_FAILED = set()


def _compiled_pair(key):
    """The compiled (stats, grad) chunk functions for ``key`` (None when compilation failed)."""
    if key in _COMPILE_FAILED:
        return None
    fns = _COMPILED.get(key)
    if fns is None:
        fns = []
        for fn in (_chunk_stats, _chunk_grad):
            # a fresh code object per key, so that dynamo's per-code recompile limit
            # is not shared between configurations
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
            raw = type(fn)(code, fn.__globals__, code.co_name, fn.__defaults__)
            raw.__kwdefaults__ = fn.__kwdefaults__
            fns.append(torch.compile(raw, dynamic=False, fullgraph=True))
        _COMPILED[key] = fns
    return fns


def _compiled_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad, cw=None):
    """Per-row (loss, nll, bonus); fills ``grad`` unless it is None (then only
    the statistics pass runs, on ``COMPILED_ROWS x V`` chunks). ``cw``:
    per-class weights (compute dtype) or None (a separate compiled pair)."""
    N, V = z.shape
    C = COMPILED_ROWS
    full = (N // C) * C
    need_grad = grad is not None
    kw = dict(
        cfg=cfg, V=V, soft=soft, dense=_dense_bonus(cfg, eps_b, soft), has_bonus=cfg.rho != 0.0,
        ignore_index=int(ignore_index), scratch=need_grad and grad.dtype == _compute_dtype(z.dtype),
        need_grad=need_grad,
    )
    key = (
        z.dtype, grad.dtype if need_grad else None, tgt.dtype, z.device.type, V, C,
        cfg.kind, cfg.log_end, cfg.bonus_start, cfg.gamma,
        kw["soft"], kw["dense"], kw["has_bonus"], kw["ignore_index"], kw["scratch"], need_grad,
    )
    if cw is not None:
        key = key + ("weighted",)
    fns = _compiled_pair(key)
    if fns is None:
        return None
    stats_fn, grad_fn = fns
    cdt = _compute_dtype(z.dtype)
    params = torch.tensor([eps, eps_b, float(cfg.rho)], dtype=cdt, device=z.device)
    loss = torch.empty(N, dtype=cdt, device=z.device)
    nll = torch.empty_like(loss)
    bonus = torch.empty_like(loss)

    gkw = {k: v for k, v in kw.items() if k != "need_grad"}

    if cw is None:
        def chunk(zc, tc, gc):
            m, log_s, lo, nl, bo, coef, y_extra = stats_fn(zc, tc, params, gc, **kw)
            if need_grad:
                grad_fn(zc, tc, params, m, log_s, coef, y_extra, gc, **gkw)
            return lo, nl, bo
    else:
        def chunk(zc, tc, gc):
            m, log_s, lo, nl, bo, coef, y_extra = stats_fn(zc, tc, params, gc, cw, **kw)
            if need_grad:
                grad_fn(zc, tc, params, m, log_s, coef, y_extra, gc, cw, **gkw)
            return lo, nl, bo

    try:
        for r0 in range(0, full, C):
            r1 = r0 + C
            gc = grad[r0:r1] if need_grad else None
            loss[r0:r1], nll[r0:r1], bonus[r0:r1] = chunk(z[r0:r1], tgt[r0:r1], gc)
        if full < N:  # the tail goes through a padded chunk (fixed shape: no recompilation)
            n = N - full
            zp = z.new_zeros((C, V))
            zp[:n] = z[full:]
            if soft:
                tp = tgt.new_zeros((C, V))
            else:
                tp = tgt.new_full((C,), int(ignore_index))
            tp[:n] = tgt[full:]
            gp = grad.new_empty((C, V)) if need_grad else None
            parts = chunk(zp, tp, gp)
            for dst, src in zip((loss, nll, bonus), parts):
                dst[full:] = src[:n]
            if need_grad:
                grad[full:] = gp[:n]
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
    return loss, nll, bonus


# --------------------------------------------------------------------------------------
# autograd Function


def _forward_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, backend, need_grad=True, out=None, cw=None):
    """``((loss, nll, bonus), grad)``: the gradient with ``grad_output = 1``
    computed in the forward pass, into ``out`` when given (for the Triton back
    end it may be ``z`` itself: the logits are overwritten) or a new buffer. ``grad`` is None
    without ``need_grad``, and then no ``N x V`` tensor is allocated
    (chunk-sized scratch only). ``cw``: per-class weights (1-D, contiguous,
    compute dtype) or None."""
    grad = None
    if need_grad:
        grad = out if out is not None else torch.empty_like(z, memory_format=torch.contiguous_format)
    if z.shape[0] == 0:
        cdt = _compute_dtype(z.dtype)
        empty = torch.zeros(0, dtype=cdt, device=z.device)
        return (empty, empty.clone(), empty.clone()), grad
    if backend == "triton":
        from .triton_kernels import el_rows_triton

        parts = el_rows_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad, weight=cw)
        return parts, grad
    if backend == "compiled":
        parts = _compiled_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad, cw)
        if parts is not None:
            return parts, grad
    return _eager_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad, cw), grad


def _soft_target_grad(z, cfg, eps, eps_b, cw=None):
    """``d EL_row / d q`` for soft targets ``q`` (``N x V``, compute dtype):
    ``-(1 - eps) log p_k + rho (1 - eps_b) b(p_k)`` (EL_SPEC 2.4: the loss is
    linear in ``q``), times ``c_k`` with per-class weights ``cw``. Chunked like
    the eager back end; only called when the target requires grad."""
    N, V = z.shape
    cdt = _compute_dtype(z.dtype)
    out = torch.empty((N, V), dtype=cdt, device=z.device)
    C = _chunk_rows(V, N)
    has_bonus = cfg.rho != 0.0 and eps_b < 1.0
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        lp = torch.log_softmax(z[r0:r1], -1, dtype=cdt)
        o = out[r0:r1]
        torch.mul(lp, -(1.0 - eps), out=o)
        if has_bonus:
            o.add_(bonus_value(lp, cfg), alpha=cfg.rho * (1.0 - eps_b))
        if cw is not None:
            o.mul_(cw)
    return out


#: what a second differentiation through the fused gradient raises
TWICE_MESSAGE = (
    "encouraging_loss: the fused implementation computes the gradient in closed form and cannot be "
    "differentiated again (create_graph=True: gradient penalties, double backward). "
    "Use impl='reference' (EncouragingLoss(impl='reference'), fairseq --el-impl reference), "
    "which gives second-order gradients."
)


def _not_differentiable_again(grads, anchor: torch.Tensor):
    """``grads`` (the first-order gradients, any of them None) behind one node
    that raises :data:`TWICE_MESSAGE` when differentiated through.

    The node's input is ``anchor`` (the saved per-row loss, an output of the
    fused Function), so it lies on every path from the gradients back to the
    logits and what produced them: ``torch.autograd.grad(penalty, params)``
    reaches it, runs it and fails, instead of finding the parameters unused."""
    present = [g for g in grads if g is not None]
    err = torch._C._functions.DelayedError(TWICE_MESSAGE.encode(), len(present) + 1)
    link = anchor.sum() * 0.0  # a scalar in the graph of the logits
    wrapped = iter(err(*present, link)[: len(present)])
    return tuple(None if g is None else next(wrapped) for g in grads)


class FusedELFunction(torch.autograd.Function):
    """Per-row EL of 2-D ``logits`` (``N x V``).

    ``apply(logits, target, cfg, eps, eps_b, ignore_index, soft, backend, inplace_backward, weight)``
    returns ``(loss, nll, bonus)``, each of shape ``(N,)``; only ``loss`` is
    differentiable, with respect to the logits and, for soft targets that
    require grad, the target. ``weight``: per-class weights (1-D, contiguous,
    compute dtype; not differentiated) or None.

    ``"triton"``: the forward pass computes the values and per-row statistics
    only and keeps the logits; the backward pass recomputes ``p`` and writes
    ``grad_output * dEL/dz`` in one pass (into the logits' own storage with
    ``inplace_backward``, unless the graph is retained). Other back ends
    compute the gradient in the forward pass into one buffer that the backward
    pass scales by ``grad_output`` (``inplace_backward`` does not apply).

    The gradient is first-order only: under ``create_graph=True`` the returned
    gradient is correct but differentiating it again raises
    :data:`TWICE_MESSAGE` (the reference implementation supports that).
    """

    @staticmethod
    def forward(ctx, logits, target, cfg, eps, eps_b, ignore_index, soft, backend="eager", inplace_backward=False,
                weight=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        z = logits if logits.is_contiguous() else logits.contiguous()
        tgt = target if target.is_contiguous() else target.contiguous()
        need_grad = bool(ctx.needs_input_grad[0])
        eps, eps_b = float(eps), float(eps_b)
        ctx.backend = backend
        tgrad = None
        if soft and ctx.needs_input_grad[1]:
            tgrad = _soft_target_grad(z, cfg, eps, eps_b, weight)
        if backend == "triton":
            from .triton_kernels import el_stats_triton

            if weight is None:
                loss, nll, bonus, stats = el_stats_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, need_grad)
            else:
                loss, nll, bonus, stats = el_stats_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, need_grad,
                                                          weight=weight)
            ctx.weight = weight
            ctx.args = (cfg, eps, eps_b, ignore_index, soft)
            # an in-place backward may overwrite z only when z is a copy made here, or the caller allowed it
            ctx.inplace = bool(inplace_backward) or z is not logits
            ctx.save_for_backward(z if need_grad else None, tgt if need_grad else None, stats, tgrad, loss)
        else:
            (loss, nll, bonus), grad = _forward_rows(z, tgt, cfg, eps, eps_b, ignore_index, soft, backend, need_grad,
                                                     cw=weight)
            ctx.save_for_backward(grad, tgrad, loss)  # loss: N values, anchors a second differentiation
        ctx.target_dtype = target.dtype
        ctx.mark_non_differentiable(nll, bonus)
        return loss, nll, bonus

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_bonus):
        if grad_loss is None:
            return (None,) * 10
        create_graph = torch.is_grad_enabled()
        if ctx.backend == "triton":
            z, tgt, stats, tgrad, anchor = ctx.saved_tensors
            with torch.no_grad():
                dz = None
                if z is not None:
                    from .triton_kernels import el_grad_triton

                    out = z if (ctx.inplace and not _keep_graph()) else torch.empty_like(z)
                    if ctx.weight is None:
                        dz = el_grad_triton(z, tgt, *ctx.args, stats, grad_loss, out)
                    else:
                        dz = el_grad_triton(z, tgt, *ctx.args, stats, grad_loss, out, weight=ctx.weight)
                dt = (tgrad * grad_loss.unsqueeze(-1)).to(ctx.target_dtype) if tgrad is not None else None
        else:
            grad, tgrad, anchor = ctx.saved_tensors
            with torch.no_grad():
                dz = _scale_logit_grad(grad, grad_loss) if grad is not None else None
                dt = (tgrad * grad_loss.unsqueeze(-1)).to(ctx.target_dtype) if tgrad is not None else None
        if create_graph:
            dz, dt = _not_differentiable_again((dz, dt), anchor)
        return (dz, dt) + (None,) * 8


def _keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph``)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _scale_logit_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad * grad_loss[:, None]``, in place in the saved buffer when the graph
    is not kept for another backward."""
    # grad_output stays in the compute dtype: float16 / bfloat16 gradients are
    # multiplied in float32 and rounded once
    go = grad_loss.unsqueeze(-1)
    if _keep_graph():
        return torch.mul(grad, go, out=torch.empty_like(grad))
    if go.numel() and go.stride(0) == 0 and grad_loss.device.type == "cpu":
        scale = float(go.reshape(-1)[0])  # the same factor for every row (mean / sum)
        return grad if scale == 1.0 else grad.mul_(scale)
    return grad.mul_(go)


def _needs_plain_graph(*tensors) -> bool:
    """Whether a ``torch.func`` transform wraps any tensor, or any is a
    forward-mode AD dual tensor: both need the loss written with plain torch
    ops (cheap checks: this runs on every call)."""
    if under_transform(*tensors):
        return True
    if getattr(fwAD, "_current_level", -1) >= 0:  # inside forward_ad.dual_level()
        return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)
    return False


def fused_el_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, inplace_backward=False, backend=None,
                  weight=None):
    """Fused counterpart of :func:`encouraging_loss.functional.reference_rows`.

    Same arguments and return contract: per-row ``(loss, nll, bonus, valid)`` of
    shape ``logits.shape[:-1]`` (float32 for float16/bfloat16 logits, float64
    for float64); ``valid`` is the non-ignored mask for class-index targets and
    ``None`` for soft targets. ``loss`` carries the gradient with respect to
    the logits and to soft targets that require grad; ``nll`` and ``bonus``
    are not differentiable.

    Unless gradients are enabled and the logits (or soft targets) require grad,
    only the per-row values are computed (no gradient pass, no ``N x V``
    buffer): validation and evaluation under ``torch.no_grad()`` cost one
    statistics pass. Under ``torch.func`` transforms and forward-mode AD the
    reference formula is used (they need a plain torch graph; same result).

    ``inplace_backward``: the Triton back end may write the logits' gradient
    into the logits' own storage (no extra memory; the logits hold the
    gradient afterwards). ``backend``: :func:`select_backend`'s choice unless given.
    ``weight``: per-class weights (``F.cross_entropy``'s ``weight``, checked by
    the caller) or None; as in :func:`~encouraging_loss.reference.reference_rows`.
    """
    if weight is not None:
        return _fused_weighted_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, inplace_backward, backend,
                                    weight)
    if _needs_plain_graph(logits, target):

        return reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft)
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    z = logits.reshape(-1, V)
    tgt = target.reshape(-1, V) if soft else target.reshape(-1)
    backend = backend or select_backend(z)
    args = (cfg, float(eps), float(eps_b), int(ignore_index), bool(soft), backend)
    if torch.is_grad_enabled() and (logits.requires_grad or (soft and target.requires_grad)):
        loss, nll, bonus = FusedELFunction.apply(z, tgt, *args, bool(inplace_backward))
    else:
        z = z if z.is_contiguous() else z.contiguous()
        tgt = tgt if tgt.is_contiguous() else tgt.contiguous()
        with torch.no_grad():
            (loss, nll, bonus), _ = _forward_rows(z, tgt, *args, need_grad=False)
    valid = None if soft else target != ignore_index
    return loss.view(lead), nll.view(lead), bonus.view(lead), valid


def _fused_weighted_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, inplace_backward, backend, weight):
    """:func:`fused_el_rows` with per-class weights: the same back ends with the
    weights in the closed form (``w c``, ``u c``: ``sum(w) != 1``)."""
    if _needs_plain_graph(logits, target, weight):
        return reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, weight=weight)
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    z = logits.reshape(-1, V)
    tgt = target.reshape(-1, V) if soft else target.reshape(-1)
    backend = backend or select_backend(z)
    cw = weight.detach().to(_compute_dtype(z.dtype)).contiguous()
    args = (cfg, float(eps), float(eps_b), int(ignore_index), bool(soft), backend)
    if torch.is_grad_enabled() and (logits.requires_grad or (soft and target.requires_grad)):
        loss, nll, bonus = FusedELFunction.apply(z, tgt, *args, bool(inplace_backward), cw)
    else:
        z = z if z.is_contiguous() else z.contiguous()
        tgt = tgt if tgt.is_contiguous() else tgt.contiguous()
        with torch.no_grad():
            (loss, nll, bonus), _ = _forward_rows(z, tgt, *args, need_grad=False, cw=cw)
    valid = None if soft else target != ignore_index
    return loss.view(lead), nll.view(lead), bonus.view(lead), valid
