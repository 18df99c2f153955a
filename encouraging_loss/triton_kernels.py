"""Triton kernel of the fused Encouraging Loss (EL_SPEC 3).

One launch computes, for every row of ``N x V`` logits, the loss, the plain
NLL, the bonus term and the gradient: one program per row makes

1. an online log-sum-exp pass over the row,
2. when the bonus is needed at every class (soft targets, or bonus smoothing
   ``eps_b > 0``), a pass for ``S = sum_k u_k g_k`` and ``sum_k u_k b(p_k)``,
3. a pass that writes ``dEL/dz_j = p_j sum(w) - w_j + rho (u_j g_j - p_j S)``
   and sums ``log p`` for the smoothed NLL.

With ``WRITE_GRAD=False`` (no gradient needed: ``torch.no_grad()``, or logits
that do not require grad) passes 2 and 3 become one pass that sums ``log p`` and
``u_k b(p_k)`` only: ``g`` is never evaluated, nothing is stored but the per-row
values, and the gradient pointer is not used (any tensor will do).

The bonus maths (``_bonus_b`` / ``_bonus_g``) MIRRORS
:func:`encouraging_loss.bonus.bonus_value` and
:func:`encouraging_loss.bonus.bonus_grad` (same branches, same clamp, same
``log1mexp`` split at ``-ln 2``), re-expressed in Triton language because a
Triton kernel cannot call PyTorch. ``tests/test_fused.py`` pins the two
together; change both or neither. ``expm1`` / ``log1p`` are written with
``exp`` / ``log`` only (Kahan's accurate forms), so the kernel needs no
libdevice and also runs under Triton's CPU interpreter.

Importing this module raises ImportError when Triton is not installed.
Set ``TRITON_INTERPRET=1`` *before* importing it to run the kernel on CPU
tensors (Triton reads the variable when ``@triton.jit`` decorates).
"""
import math

import torch
import triton
import triton.language as tl

from .bonus import LOG_CLAMP, LP_MAX, BonusConfig, bonus_value

__all__ = ["el_rows_triton", "bonus_triton", "KIND_CODES"]

KIND_CODES = {"log": 0, "power": 1, "cosine": 2}
_NEG_LN2 = -math.log(2.0)
_PI = math.pi


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) * x / log(u), exact where u rounds to 1
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where(um1 == 0.0, 1.0, um1)
    r = um1 * x / tl.log(tl.where(um1 == 0.0, 2.0, u))
    return tl.where(um1 == 0.0, x, tl.where(safe == -1.0, -1.0, r))


@triton.jit
def _log1p(y):
    # Kahan: log(u) * y / (u - 1), exact where u rounds to 1
    u = 1.0 + y
    um1 = u - 1.0
    r = tl.log(u) * y / tl.where(um1 == 0.0, 1.0, um1)
    return tl.where(um1 == 0.0, y, r)


@triton.jit
def _log1mexp(x):
    # log(1 - exp(x)), x <= 0; mirrors bonus.log1mexp
    near = tl.log(-_expm1(tl.maximum(x, -0.6931471805599453)))
    far = _log1p(-tl.exp(tl.minimum(x, -0.6931471805599453)))
    return tl.where(x > -0.6931471805599453, near, far)


@triton.jit
def _bonus_b(lp, KIND: tl.constexpr, HAS_LE: tl.constexpr, HAS_START: tl.constexpr,
             log_end, log_log_end, le_const, log_start, b_start, gamma, LP_MAX, LOG_CLAMP):
    """b(p) from lp = log p; mirrors bonus.bonus_value."""
    if KIND == 1:  # power
        b = -tl.exp(gamma * lp)
    elif KIND == 2:  # cosine
        b = tl.cos(3.141592653589793 * tl.exp(lp)) - 1.0
    else:  # log: normal / conservative / aggressive
        b = tl.maximum(_log1mexp(tl.minimum(lp, LP_MAX)), LOG_CLAMP)
        if HAS_LE:
            lin = (tl.exp(lp) - log_end) / (log_end - 1.0) + le_const
            b = tl.where(lp <= log_log_end, b, lin)
        if HAS_START:
            b = tl.where(lp >= log_start, b - b_start, 0.0)
    return b


@triton.jit
def _bonus_g(lp, KIND: tl.constexpr, HAS_LE: tl.constexpr, HAS_START: tl.constexpr,
             log_end, log_log_end, log_start, gamma, LP_MAX):
    """g(p) = b'(p) p from lp = log p; mirrors bonus.bonus_grad."""
    if KIND == 1:
        g = -gamma * tl.exp(gamma * lp)
    elif KIND == 2:
        p = tl.exp(lp)
        g = -3.141592653589793 * tl.sin(3.141592653589793 * p) * p
    else:
        lpc = tl.minimum(lp, LP_MAX)
        g = tl.where(lp > LP_MAX, 0.0, -tl.exp(lpc - _log1mexp(lpc)))
        if HAS_LE:
            g = tl.where(lp <= log_log_end, g, tl.exp(lp) / (log_end - 1.0))
        if HAS_START:
            g = tl.where(lp >= log_start, g, 0.0)
    return g


@triton.jit
def _el_fwd_kernel(
    z_ptr, z_stride, t_ptr, t_stride, g_ptr, g_stride,
    loss_ptr, nll_ptr, bonus_ptr, prm_ptr,
    V, ignore_index,
    BLOCK: tl.constexpr, SOFT: tl.constexpr, KIND: tl.constexpr,
    HAS_LE: tl.constexpr, HAS_START: tl.constexpr, HAS_BONUS: tl.constexpr,
    DENSE: tl.constexpr, F64: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # scalars come in a tensor of the compute dtype (float64 kernels need float64 constants)
    eps = tl.load(prm_ptr + 0)
    eps_b = tl.load(prm_ptr + 1)
    rho = tl.load(prm_ptr + 2)
    log_end = tl.load(prm_ptr + 3)
    log_log_end = tl.load(prm_ptr + 4)
    le_const = tl.load(prm_ptr + 5)
    log_start = tl.load(prm_ptr + 6)
    b_start = tl.load(prm_ptr + 7)
    gamma = tl.load(prm_ptr + 8)
    LP_MAX = tl.load(prm_ptr + 9)
    LOG_CLAMP = tl.load(prm_ptr + 10)
    zrow = z_ptr + row * z_stride
    grow = g_ptr + row * g_stride
    offs0 = tl.arange(0, BLOCK)
    if F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    Vf = V.to(CDT)

    if SOFT:
        trow = t_ptr + row * t_stride
        valid = True
        y = -1
    else:
        y = tl.load(t_ptr + row).to(tl.int32)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)

    if not valid:
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK):
                offs = v0 + offs0
                tl.store(grow + offs, tl.zeros([BLOCK], dtype=CDT).to(g_ptr.dtype.element_ty), mask=offs < V)
        tl.store(loss_ptr + row, 0.0)
        tl.store(nll_ptr + row, 0.0)
        tl.store(bonus_ptr + row, 0.0)
    else:
        # 1. online log-sum-exp (and sum q for soft targets)
        m = tl.full([], float("-inf"), CDT)
        s = tl.zeros([], CDT)
        sum_q = tl.zeros([], CDT)
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            mask = offs < V
            z = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(CDT)
            m_new = tl.maximum(m, tl.max(z, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
            m = m_new
            if SOFT:
                sum_q += tl.sum(tl.load(trow + offs, mask=mask, other=0.0).to(CDT), 0)
        # log p = (z - m) - log s, in this order (as torch's log_softmax): accurate for p near 1
        m_fin = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)

        # target weights: w = (1 - eps) onehot/q + eps/V, u likewise with eps_b
        if SOFT:
            sum_w = (1.0 - eps) * sum_q + eps
        else:
            sum_w = tl.full([], 1.0, CDT)
            lp_y = (tl.load(zrow + y).to(CDT) - m_fin) - log_s

        # 2. S = sum_k u_k g_k and sum_k u_k b(p_k)
        S = tl.zeros([], CDT)
        bsum = tl.zeros([], CDT)
        if HAS_BONUS:
            if DENSE and WRITE_GRAD:
                for v0 in range(0, V, BLOCK):
                    offs = v0 + offs0
                    mask = offs < V
                    lp = (tl.load(zrow + offs, mask=mask, other=0.0).to(CDT) - m_fin) - log_s
                    if SOFT:
                        q = tl.load(trow + offs, mask=mask, other=0.0).to(CDT)
                        u = (1.0 - eps_b) * q + eps_b / Vf
                    else:
                        u = tl.where(offs == y, 1.0 - eps_b + eps_b / Vf, eps_b / Vf)
                    u = tl.where(mask, u, 0.0)
                    b = _bonus_b(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                                 log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
                    g = _bonus_g(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
                    bsum += tl.sum(tl.where(mask, u * b, 0.0), 0)
                    S += tl.sum(tl.where(mask, u * g, 0.0), 0)
            elif not DENSE:  # hard targets, eps_b == 0: u is the one-hot of y
                bsum = _bonus_b(lp_y, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                                log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
                if WRITE_GRAD:
                    S = _bonus_g(lp_y, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)

        # 3. gradient, and sum log p / sum q log p for the loss (without the
        #    gradient: also sum_k u_k b(p_k) of a dense bonus, pass 2 being skipped)
        sum_lp = tl.zeros([], CDT)
        sum_qlp = tl.zeros([], CDT)
        coef = sum_w - rho * S
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            mask = offs < V
            lp = (tl.load(zrow + offs, mask=mask, other=0.0).to(CDT) - m_fin) - log_s
            p = tl.exp(lp)
            if SOFT:
                q = tl.load(trow + offs, mask=mask, other=0.0).to(CDT)
                w = (1.0 - eps) * q + eps / Vf
                sum_qlp += tl.sum(tl.where(mask, q * lp, 0.0), 0)
            else:
                w = tl.where(offs == y, 1.0 - eps + eps / Vf, eps / Vf)
            sum_lp += tl.sum(tl.where(mask, lp, 0.0), 0)
            if WRITE_GRAD:
                grad = p * coef - w
                if HAS_BONUS:
                    if DENSE:
                        if SOFT:
                            u = (1.0 - eps_b) * q + eps_b / Vf
                        else:
                            u = tl.where(offs == y, 1.0 - eps_b + eps_b / Vf, eps_b / Vf)
                        g = _bonus_g(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
                        grad += rho * u * g
                    else:
                        grad += tl.where(offs == y, rho * S, 0.0)
                tl.store(grow + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)
            elif HAS_BONUS:
                if DENSE:
                    if SOFT:
                        u = (1.0 - eps_b) * q + eps_b / Vf
                    else:
                        u = tl.where(offs == y, 1.0 - eps_b + eps_b / Vf, eps_b / Vf)
                    u = tl.where(mask, u, 0.0)
                    b = _bonus_b(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                                 log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
                    bsum += tl.sum(tl.where(mask, u * b, 0.0), 0)

        if SOFT:
            nll = -sum_qlp
        else:
            nll = -lp_y
        smoothed = (1.0 - eps) * nll - eps / Vf * sum_lp
        bonus = rho * bsum
        tl.store(loss_ptr + row, smoothed + bonus)
        tl.store(nll_ptr + row, nll)
        tl.store(bonus_ptr + row, bonus)


def _bonus_args(cfg: BonusConfig) -> dict:
    """Scalar arguments of the kernel's bonus functions."""
    le = float(cfg.log_end)
    s = float(cfg.bonus_start)
    has_le = cfg.kind == "log" and le < 1.0
    has_start = cfg.kind == "log" and s > 0.0
    b_start = 0.0
    if has_start:  # b(s) of the un-shifted bonus, from bonus.py
        base = BonusConfig(kind="log", log_end=le, bonus_start=0.0)
        b_start = float(bonus_value(torch.tensor(math.log(s), dtype=torch.float64), base))
    return dict(
        log_end=le, log_log_end=math.log(le), le_const=(math.log1p(-le) if le < 1.0 else 0.0),
        log_start=(math.log(s) if s > 0.0 else 0.0), b_start=b_start, gamma=float(cfg.gamma),
        has_le=has_le, has_start=has_start,
    )


def _params(a: dict, eps, eps_b, rho, dtype, device) -> torch.Tensor:
    vals = [eps, eps_b, rho, a["log_end"], a["log_log_end"], a["le_const"], a["log_start"], a["b_start"],
            a["gamma"], LP_MAX, LOG_CLAMP]
    return torch.tensor([float(v) for v in vals], dtype=dtype).to(device)


def _block_size(V: int, interpret: bool) -> int:
    cap = 64 if interpret else 4096
    return max(16, min(triton.next_power_of_2(V), cap))


def el_rows_triton(z, tgt, cfg: BonusConfig, eps, eps_b, ignore_index, soft, grad, block=None):
    """Run the kernel on 2-D ``z`` (``N x V``, contiguous rows); fill ``grad``
    (``None``: no gradient, the kernel variant without the gradient pass).

    Returns per-row ``(loss, nll, bonus)`` in float32 (float64 for float64 ``z``)."""
    N, V = z.shape
    f64 = z.dtype == torch.float64
    cdt = torch.float64 if f64 else torch.float32
    loss = torch.empty(N, dtype=cdt, device=z.device)
    nll = torch.empty_like(loss)
    bonus = torch.empty_like(loss)
    if N == 0:
        return loss, nll, bonus
    interpret = z.device.type == "cpu"
    a = _bonus_args(cfg)
    has_bonus = cfg.rho != 0.0
    dense = has_bonus and (soft or eps_b > 0.0)
    t_stride = tgt.stride(0) if soft else 0
    write_grad = grad is not None
    g_arg, g_stride = (grad, grad.stride(0)) if write_grad else (loss, 0)  # dummy: never read or written
    _el_fwd_kernel[(N,)](
        z, z.stride(0), tgt, t_stride, g_arg, g_stride,
        loss, nll, bonus, _params(a, eps, eps_b, cfg.rho, cdt, z.device),
        V, int(ignore_index),
        BLOCK=block or _block_size(V, interpret), SOFT=bool(soft), KIND=KIND_CODES[cfg.kind],
        HAS_LE=a["has_le"], HAS_START=a["has_start"], HAS_BONUS=has_bonus, DENSE=dense, F64=f64,
        WRITE_GRAD=write_grad, num_warps=1 if interpret else (8 if V >= 8192 else 4),
    )
    return loss, nll, bonus


@triton.jit
def _bonus_probe_kernel(lp_ptr, b_ptr, g_ptr, n, prm_ptr, BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_LE: tl.constexpr,
                        HAS_START: tl.constexpr):
    log_end = tl.load(prm_ptr + 3)
    log_log_end = tl.load(prm_ptr + 4)
    le_const = tl.load(prm_ptr + 5)
    log_start = tl.load(prm_ptr + 6)
    b_start = tl.load(prm_ptr + 7)
    gamma = tl.load(prm_ptr + 8)
    LP_MAX = tl.load(prm_ptr + 9)
    LOG_CLAMP = tl.load(prm_ptr + 10)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lp = tl.load(lp_ptr + offs, mask=mask, other=-1.0)
    b = _bonus_b(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const, log_start, b_start, gamma,
                 LP_MAX, LOG_CLAMP)
    g = _bonus_g(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
    tl.store(b_ptr + offs, b, mask=mask)
    tl.store(g_ptr + offs, g, mask=mask)


def bonus_triton(lp: torch.Tensor, cfg: BonusConfig):
    """``(b, g)`` of a 1-D tensor of log-probabilities through the kernel's bonus
    functions, to pin them to :mod:`encouraging_loss.bonus` in the tests."""
    lp = lp.contiguous()
    b = torch.empty_like(lp)
    g = torch.empty_like(lp)
    a = _bonus_args(cfg)
    BLOCK = 64
    _bonus_probe_kernel[(triton.cdiv(lp.numel(), BLOCK),)](
        lp, b, g, lp.numel(), _params(a, 0.0, 0.0, 1.0, lp.dtype, lp.device), BLOCK=BLOCK, KIND=KIND_CODES[cfg.kind], HAS_LE=a["has_le"],
        HAS_START=a["has_start"],
    )
    return b, g
