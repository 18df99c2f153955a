"""Triton kernels of the fused Encouraging Loss (EL_SPEC 3).

Two kernels, one program per row of ``N x V`` logits:

* :func:`_el_stats_kernel` (forward) computes the per-row loss, plain NLL and
  bonus term, and the row statistics the gradient needs:
  ``m`` (row max), ``log s`` (``log p = (z - m) - log s``), ``coef`` and
  ``yx`` with ``dEL/dz_j = p_j coef - w_j + rho u_j g_j`` (bonus at every
  class) or ``p_j coef - w_j + [j = y] yx`` (bonus at the target only).
  When the padded row fits in one block (``SINGLE``, ``V <= MAX_SINGLE``) the
  row is read from memory once and kept on chip: log-sum-exp, ``b`` and ``g``
  come from the same registers. Longer rows are streamed: one online
  log-sum-exp pass, and a second pass only when the bonus is needed at every
  class (soft targets, or bonus smoothing ``eps_b > 0``).
* :func:`_el_grad_kernel` (backward) reads the logits once more and writes
  ``grad_output[row] * dEL/dz`` once, so applying ``grad_output`` costs no
  extra pass; it may write into the logits' own storage (``inplace``: zero
  extra memory).

Per-class weights ``c`` (``F.cross_entropy``'s ``weight``) are a compile-time
variant of both kernels (``WEIGHTED``, the weights at ``w_ptr``): every
target weight is multiplied by its class's weight, ``w c`` and ``u c``, in the
same closed form (``sum(w) != 1``; the weights are read beside the logits).
Unweighted, ``w_ptr`` is the constant None and the kernels are the same
machine code as without the option.

The forward pass therefore stores no ``N x V`` tensor (the logits are kept for
the backward pass instead of a gradient buffer). Traffic: the stats kernel
reads the logits once (twice for long rows with a dense bonus), the gradient
kernel reads them once and writes the gradient once.

The bonus at every element is evaluated with the cheap form for ``p <= 1/2``
(``b = log(1 - p)``, ``g = -p / (1 - p)``: one log, one division; ``b`` is
only ever summed with weights adding up to at most 1, so its absolute error,
~1e-7 with the hardware's approximate ``log2`` on float32 GPUs, is the
loss's; ``g`` keeps full relative accuracy): in a row only the maximum can
have ``p > 1/2``, and its
``log p = -log s`` is known per row, so the accurate ``log1mexp`` branch
(:func:`_bonus_b` / :func:`_bonus_g`, several ``exp`` / ``log``) runs once
per row, as a scalar, and replaces the elements equal to the row maximum.

The bonus maths MIRRORS :func:`encouraging_loss.bonus.bonus_value` and
:func:`encouraging_loss.bonus.bonus_grad` (same branches, same clamp, same
``log1mexp`` split at ``-ln 2``), re-expressed in Triton language because a
Triton kernel cannot call PyTorch. ``tests/core/ops/test_triton_kernels.py`` pins the
two together; change both or neither. ``expm1`` / ``log1p`` of the scalar
forms are written with ``exp`` / ``log`` only (Kahan's accurate forms). The
one libdevice call, the fast ``log2`` of the row form, sits behind the
``FAST`` constexpr (float32 on a GPU), so the kernels also run under
Triton's CPU interpreter. ``python -m encouraging_loss.tools.kernel_sass`` counts
the machine instructions per element of both kernels for sm_90, no GPU
needed.

Scalar parameters travel in a small device tensor cached per (settings,
dtype, device): no host-to-device copy per call (one, non-blocking from
pinned memory, per new setting, e.g. once per epoch of a bonus schedule).

Importing this module raises ImportError when Triton is not installed.
Set ``TRITON_INTERPRET=1`` *before* importing it to run the kernels on CPU
tensors (Triton reads the variable when ``@triton.jit`` decorates).
"""
import functools
import math
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..bonus import LOG_CLAMP, LP_MAX, BonusConfig, bonus_value

__all__ = [
    "KIND_CODES",
    "MAX_SINGLE",
    "STREAM_BLOCK",
    "bonus_triton",
    "el_grad_triton",
    "el_rows_triton",
    "el_stats_triton",
    "kernel_constexprs",
    "launch_config",
]

KIND_CODES = {"log": 0, "power": 1, "cosine": 2}
#: rows whose padded length (next power of 2 of V) is at most this are held on
#: chip in one block (``EL_TRITON_MAX_SINGLE`` overrides; 0 always streams).
MAX_SINGLE = 16384
#: block of the streaming path (rows longer than :data:`MAX_SINGLE`).
STREAM_BLOCK = 4096
#: block cap under the CPU interpreter (small blocks: tests exercise both paths).
INTERPRET_BLOCK = 64


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
    """b(p) from lp = log p, accurate everywhere; mirrors bonus.bonus_value."""
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
    """g(p) = b'(p) p from lp = log p, accurate everywhere; mirrors bonus.bonus_grad."""
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
def _fexp(x, FAST: tl.constexpr):
    """exp of a row block: FAST (float32 on a GPU) without the denormal fix-ups
    (results below 2^-126 flush to 0, which no sum or gradient here can see)."""
    if FAST:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _fdiv(a, b, FAST: tl.constexpr):
    """a / b of a row block whose |b| is in [2^-126, 2^126]: FAST, the hardware's
    approximate division (2 ulp) without the range fix-ups of a full division."""
    if FAST:
        return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def _bonus_row(lp, p, top, b0, g0, KIND: tl.constexpr, HAS_LE: tl.constexpr, HAS_START: tl.constexpr,
               log_end, log_log_end, le_const, log_start, b_start, gamma, FAST: tl.constexpr = False):
    """(b, g) at every element of a row block: ``p = exp(lp)``; ``top`` marks the
    elements equal to the row maximum, which take ``b0`` / ``g0`` (the accurate
    scalar values at the maximum's ``log p``). Every other element has
    ``p < 1/2``, where ``-p / (1 - p)`` is accurate, ``log(1 - p)`` accurate to
    ~1e-7 absolute (enough for a term that is only summed, see below) and the
    clamp cannot be active. The values of _bonus_b / _bonus_g, to that accuracy."""
    if KIND == 1:
        e = tl.exp(gamma * lp)
        b = -e
        g = -gamma * e
    elif KIND == 2:
        b = tl.cos(3.141592653589793 * p) - 1.0
        g = -3.141592653589793 * tl.sin(3.141592653589793 * p) * p
    else:
        # log(1 - p), 1 - p in [1/2, 1]: the row form is only summed, with weights that add up to at
        # most 1 (eps_b / V each, or the soft-target weights), so an absolute error of ~1e-7 per element
        # stays ~1e-7 in the loss (no accurate log1p needed; the gradient does not use b). FAST
        # (float32 on a GPU): the hardware's approximate log2 (one instruction, not libdevice's ~20)
        if FAST:
            b = libdevice.fast_log2f(1.0 - p) * 0.6931471805599453
        else:
            b = tl.log2(1.0 - p) * 0.6931471805599453
        g = _fdiv(-p, 1.0 - p, FAST)  # 1 - p in [1/2, 1]
        if HAS_LE:
            above = lp > log_log_end
            slope = 1.0 / (log_end - 1.0)  # once per row: a multiply per element, not a division
            b = tl.where(above, (p - log_end) * slope + le_const, b)
            g = tl.where(above, p * slope, g)
        if HAS_START:
            keep = lp >= log_start
            b = tl.where(keep, b - b_start, 0.0)
            g = tl.where(keep, g, 0.0)
        b = tl.where(top, b0, b)
        g = tl.where(top, g0, g)
    return b, g


@triton.jit
def _load_params(prm_ptr):
    """The scalar parameters, in the order of :func:`_params`."""
    return (tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3),
            tl.load(prm_ptr + 4), tl.load(prm_ptr + 5), tl.load(prm_ptr + 6), tl.load(prm_ptr + 7),
            tl.load(prm_ptr + 8), tl.load(prm_ptr + 9), tl.load(prm_ptr + 10))


@triton.jit
def _row_target(t_ptr, row, V, ignore_index):
    """``(y, valid, bad)`` of a row's class index: ``bad`` when out of ``[0, V)``
    and not ``ignore_index`` (NaN loss, zero gradient, never read); ``y`` is 0
    where not valid, so it can always be read."""
    y_in = tl.load(t_ptr + row).to(tl.int64)
    inside = (y_in >= 0) & (y_in < V)
    valid = (y_in != ignore_index) & inside
    bad = (y_in != ignore_index) & (inside == 0)
    return tl.where(valid, y_in, 0).to(tl.int32), valid, bad


@triton.jit
def _el_stats_kernel(
    z_ptr, z_stride, t_ptr, t_stride,
    loss_ptr, nll_ptr, bonus_ptr, stat_ptr, prm_ptr,
    V, ignore_index,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr, SOFT: tl.constexpr, KIND: tl.constexpr,
    HAS_LE: tl.constexpr, HAS_START: tl.constexpr, HAS_BONUS: tl.constexpr,
    DENSE: tl.constexpr, SMOOTH: tl.constexpr, F64: tl.constexpr, NEED_GRAD: tl.constexpr,
    FAST: tl.constexpr = False, w_ptr=None, WEIGHTED: tl.constexpr = False,
):
    """Per-row values and gradient statistics (see the module doc). ``WEIGHTED``:
    per-class weights ``c`` at ``w_ptr`` multiply every target weight, ``w c``
    and ``u c`` (``F.cross_entropy``'s ``weight``); unweighted, ``w_ptr`` is
    the constant None and none of that code exists in the kernel."""
    row = tl.program_id(0).to(tl.int64)
    eps, eps_b, rho, log_end, log_log_end, le_const, log_start, b_start, gamma, LP_MAX, LOG_CLAMP = \
        _load_params(prm_ptr)
    if F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    zrow = z_ptr + row * z_stride
    offs0 = tl.arange(0, BLOCK)
    Vf = V.to(CDT)
    zero = tl.zeros([], CDT)

    if SOFT:
        trow = t_ptr + row * t_stride
        valid = True
        bad = False
        y = 0
    else:
        y, valid, bad = _row_target(t_ptr, row, V, ignore_index)

    if not valid:
        out = tl.where(bad, float("nan"), 0.0).to(CDT)
        tl.store(loss_ptr + row, out)
        tl.store(nll_ptr + row, out)
        tl.store(bonus_ptr + row, zero)
        if NEED_GRAD:
            tl.store(stat_ptr + row * 4 + 0, zero)
            tl.store(stat_ptr + row * 4 + 1, zero)
            tl.store(stat_ptr + row * 4 + 2, zero)
            tl.store(stat_ptr + row * 4 + 3, zero)
    else:
        sum_lp = zero
        sum_q = zero
        sum_qlp = zero
        bsum = zero
        S = zero
        sum_c = zero  # weighted: sum_k c_k (the smoothing's total weight is eps / V sum_c)
        if WEIGHTED and not SOFT:
            c_y = tl.load(w_ptr + y).to(CDT)
        if SINGLE:
            # the whole row on chip: one read of the logits (and of q)
            mask = offs0 < V
            z = tl.load(zrow + offs0, mask=mask, other=float("-inf")).to(CDT)
            m = tl.max(z, 0)
            m_fin = tl.where(m == float("-inf"), 0.0, m)
            e = _fexp(z - m_fin, FAST)
            s = tl.sum(e, 0)
            log_s = tl.log(s)
            # log p = (z - m) - log s, in this order (as torch's log_softmax): accurate for p near 1
            lp = (z - m_fin) - log_s
            if WEIGHTED and (SMOOTH or SOFT or DENSE):
                c = tl.load(w_ptr + offs0, mask=mask, other=0.0).to(CDT)
            if SMOOTH:
                if WEIGHTED:
                    sum_lp = tl.sum(tl.where(mask, lp, 0.0) * c, 0)
                    sum_c = tl.sum(c, 0)
                else:
                    sum_lp = tl.sum(tl.where(mask, lp, 0.0), 0)
            if SOFT:
                q = tl.load(trow + offs0, mask=mask, other=0.0).to(CDT)
                if WEIGHTED:
                    q = q * c
                sum_q = tl.sum(q, 0)
                sum_qlp = tl.sum(tl.where(mask, q * lp, 0.0), 0)
            else:
                lp_y = (tl.load(zrow + y).to(CDT) - m_fin) - log_s
            if HAS_BONUS and DENSE:
                p = e * (1.0 / s)  # one division per row
                lp0 = -log_s
                b0 = _bonus_b(lp0, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                              log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
                g0 = _bonus_g(lp0, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
                b, g = _bonus_row(lp, p, z == m_fin, b0, g0, KIND, HAS_LE, HAS_START,
                                  log_end, log_log_end, le_const, log_start, b_start, gamma, FAST)
                if SOFT:
                    if WEIGHTED:
                        u = (1.0 - eps_b) * q + eps_b / Vf * c
                    else:
                        u = (1.0 - eps_b) * q + eps_b / Vf
                    bsum = tl.sum(tl.where(mask, u * b, 0.0), 0)
                    if NEED_GRAD:
                        S = tl.sum(tl.where(mask, u * g, 0.0), 0)
                elif WEIGHTED:
                    bsum = tl.sum(tl.where(mask, c * b, 0.0), 0) * (eps_b / Vf)
                    if NEED_GRAD:
                        S = tl.sum(tl.where(mask, c * g, 0.0), 0) * (eps_b / Vf)
                else:
                    bsum = tl.sum(tl.where(mask, b, 0.0), 0) * (eps_b / Vf)
                    if NEED_GRAD:
                        S = tl.sum(tl.where(mask, g, 0.0), 0) * (eps_b / Vf)
        else:
            # streamed: online log-sum-exp, with sum z and sum q z (the smoothing and
            # soft-target terms need no second pass: sum_k (z_k - m - log s) = sum z - V (m + log s))
            m = tl.full([], float("-inf"), CDT)
            s = zero
            sum_z = zero
            sum_qz = zero
            for v0 in range(0, V, BLOCK):
                offs = v0 + offs0
                mask = offs < V
                z = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(CDT)
                m_new = tl.maximum(m, tl.max(z, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(_fexp(z - m_safe, FAST), 0)
                m = m_new
                if WEIGHTED and (SMOOTH or SOFT):
                    c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(CDT)
                if SMOOTH:
                    if WEIGHTED:
                        sum_z += tl.sum(tl.where(mask, z, 0.0) * c, 0)
                        sum_c += tl.sum(c, 0)
                    else:
                        sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
                if SOFT:
                    q = tl.load(trow + offs, mask=mask, other=0.0).to(CDT)
                    if WEIGHTED:
                        q = q * c
                    sum_q += tl.sum(q, 0)
                    sum_qz += tl.sum(tl.where(mask, q * z, 0.0), 0)
            m_fin = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            if SMOOTH:
                if WEIGHTED:  # sum_k c_k log p_k = sum c z - sum c (m + log s)
                    sum_lp = (sum_z - sum_c * m_fin) - sum_c * log_s
                else:
                    sum_lp = (sum_z - Vf * m_fin) - Vf * log_s
            if SOFT:
                sum_qlp = (sum_qz - sum_q * m_fin) - sum_q * log_s
            else:
                lp_y = (tl.load(zrow + y).to(CDT) - m_fin) - log_s
            if HAS_BONUS and DENSE:
                lp0 = -log_s
                b0 = _bonus_b(lp0, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                              log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
                g0 = _bonus_g(lp0, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
                for v0 in range(0, V, BLOCK):
                    offs = v0 + offs0
                    mask = offs < V
                    z = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(CDT)
                    lp = (z - m_fin) - log_s
                    p = _fexp(lp, FAST)
                    b, g = _bonus_row(lp, p, z == m_fin, b0, g0, KIND, HAS_LE, HAS_START,
                                      log_end, log_log_end, le_const, log_start, b_start, gamma, FAST)
                    if WEIGHTED:
                        c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(CDT)
                    if SOFT:
                        q = tl.load(trow + offs, mask=mask, other=0.0).to(CDT)
                        if WEIGHTED:
                            q = q * c
                            u = (1.0 - eps_b) * q + eps_b / Vf * c
                        else:
                            u = (1.0 - eps_b) * q + eps_b / Vf
                        bsum += tl.sum(tl.where(mask, u * b, 0.0), 0)
                        if NEED_GRAD:
                            S += tl.sum(tl.where(mask, u * g, 0.0), 0)
                    elif WEIGHTED:
                        bsum += tl.sum(tl.where(mask, c * b, 0.0), 0)
                        if NEED_GRAD:
                            S += tl.sum(tl.where(mask, c * g, 0.0), 0)
                    else:
                        bsum += tl.sum(tl.where(mask, b, 0.0), 0)
                        if NEED_GRAD:
                            S += tl.sum(tl.where(mask, g, 0.0), 0)
                if not SOFT:
                    bsum = bsum * (eps_b / Vf)
                    S = S * (eps_b / Vf)

        # the target's share (hard targets), with the accurate scalar functions
        yx = zero
        if HAS_BONUS and not SOFT:
            b_y = _bonus_b(lp_y, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                           log_start, b_start, gamma, LP_MAX, LOG_CLAMP)
            if WEIGHTED:
                b_y = c_y * b_y
            bsum += (1.0 - eps_b) * b_y
            if NEED_GRAD:
                g_y = _bonus_g(lp_y, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
                if WEIGHTED:
                    g_y = c_y * g_y
                S += (1.0 - eps_b) * g_y
                if not DENSE:
                    yx = rho * g_y
        if SOFT:
            nll = -sum_qlp
            if WEIGHTED:
                sum_w = (1.0 - eps) * sum_q + eps / Vf * sum_c
            else:
                sum_w = (1.0 - eps) * sum_q + eps
        elif WEIGHTED:
            nll = -lp_y * c_y
            sum_w = (1.0 - eps) * c_y + eps / Vf * sum_c
        else:
            nll = -lp_y
            sum_w = tl.full([], 1.0, CDT)
        if SMOOTH:
            smoothed = (1.0 - eps) * nll - eps / Vf * sum_lp
        else:
            smoothed = nll
        bonus = rho * bsum
        tl.store(loss_ptr + row, smoothed + bonus)
        tl.store(nll_ptr + row, nll)
        tl.store(bonus_ptr + row, bonus)
        if NEED_GRAD:
            tl.store(stat_ptr + row * 4 + 0, m_fin)
            tl.store(stat_ptr + row * 4 + 1, log_s)
            tl.store(stat_ptr + row * 4 + 2, sum_w - rho * S)
            tl.store(stat_ptr + row * 4 + 3, yx)


@triton.jit
def _el_grad_kernel(
    z_ptr, z_stride, t_ptr, t_stride, g_ptr, g_stride, stat_ptr, go_ptr, go_stride, prm_ptr,
    V, ignore_index,
    BLOCK: tl.constexpr, SOFT: tl.constexpr, KIND: tl.constexpr,
    HAS_LE: tl.constexpr, HAS_START: tl.constexpr, HAS_BONUS: tl.constexpr,
    DENSE: tl.constexpr, F64: tl.constexpr, FAST: tl.constexpr = False, w_ptr=None, WEIGHTED: tl.constexpr = False,
):
    """grad_output[row] * dEL/dz for one row: one read of the logits (and q), one
    write; ``g_ptr`` may be ``z_ptr`` (each block is read before it is written).
    ``WEIGHTED``: per-class weights at ``w_ptr`` (as the stats kernel)."""
    row = tl.program_id(0).to(tl.int64)
    eps, eps_b, rho, log_end, log_log_end, le_const, log_start, b_start, gamma, LP_MAX, LOG_CLAMP = \
        _load_params(prm_ptr)
    if F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    zrow = z_ptr + row * z_stride
    grow = g_ptr + row * g_stride
    offs0 = tl.arange(0, BLOCK)
    Vf = V.to(CDT)
    if SOFT:
        trow = t_ptr + row * t_stride
        valid = True
        y = 0
    else:
        y, valid, bad = _row_target(t_ptr, row, V, ignore_index)
    if not valid:
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            tl.store(grow + offs, tl.zeros([BLOCK], dtype=CDT).to(g_ptr.dtype.element_ty), mask=offs < V)
    else:
        go = tl.load(go_ptr + row * go_stride).to(CDT)
        m = tl.load(stat_ptr + row * 4 + 0)
        log_s = tl.load(stat_ptr + row * 4 + 1)
        coef = tl.load(stat_ptr + row * 4 + 2)
        yx = tl.load(stat_ptr + row * 4 + 3)
        b0 = tl.zeros([], CDT)
        g0 = tl.zeros([], CDT)
        if HAS_BONUS and DENSE:
            g0 = _bonus_g(-log_s, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
        if WEIGHTED and not SOFT:
            c_y = tl.load(w_ptr + y).to(CDT)
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            mask = offs < V
            z = tl.load(zrow + offs, mask=mask, other=0.0).to(CDT)
            lp = (z - m) - log_s
            p = _fexp(lp, FAST)
            if WEIGHTED:
                c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(CDT)
            if SOFT:
                q = tl.load(trow + offs, mask=mask, other=0.0).to(CDT)
                if WEIGHTED:
                    q = q * c
                    w = (1.0 - eps) * q + eps / Vf * c
                else:
                    w = (1.0 - eps) * q + eps / Vf
            elif WEIGHTED:
                w = tl.where(offs == y, (1.0 - eps) * c_y, 0.0) + eps / Vf * c
            else:
                w = tl.where(offs == y, 1.0 - eps + eps / Vf, eps / Vf)
            grad = p * coef - w
            if HAS_BONUS:
                if DENSE:
                    b, g = _bonus_row(lp, p, z == m, b0, g0, KIND, HAS_LE, HAS_START,
                                      log_end, log_log_end, le_const, log_start, b_start, gamma, FAST)
                    if SOFT:
                        if WEIGHTED:
                            u = (1.0 - eps_b) * q + eps_b / Vf * c
                        else:
                            u = (1.0 - eps_b) * q + eps_b / Vf
                    elif WEIGHTED:
                        u = tl.where(offs == y, (1.0 - eps_b) * c_y, 0.0) + eps_b / Vf * c
                    else:
                        u = tl.where(offs == y, 1.0 - eps_b + eps_b / Vf, eps_b / Vf)
                    grad += rho * u * g
                else:
                    grad += tl.where(offs == y, yx, 0.0)
            tl.store(grow + offs, (grad * go).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bonus_probe_kernel(lp_ptr, b_ptr, g_ptr, bf_ptr, gf_ptr, n, prm_ptr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                        HAS_LE: tl.constexpr, HAS_START: tl.constexpr, FAST: tl.constexpr):
    """The kernels' bonus functions on a list of log-probabilities: the accurate
    scalar forms (b, g) and the row form (bf, gf, every element taken as not
    the row maximum: valid for p <= 1/2)."""
    eps, eps_b, rho, log_end, log_log_end, le_const, log_start, b_start, gamma, LP_MAX, LOG_CLAMP = \
        _load_params(prm_ptr)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lp = tl.load(lp_ptr + offs, mask=mask, other=-1.0)
    b = _bonus_b(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const, log_start, b_start, gamma,
                 LP_MAX, LOG_CLAMP)
    g = _bonus_g(lp, KIND, HAS_LE, HAS_START, log_end, log_log_end, log_start, gamma, LP_MAX)
    top = offs < 0
    bf, gf = _bonus_row(lp, tl.exp(lp), top, b, g, KIND, HAS_LE, HAS_START, log_end, log_log_end, le_const,
                        log_start, b_start, gamma, FAST)
    tl.store(b_ptr + offs, b, mask=mask)
    tl.store(g_ptr + offs, g, mask=mask)
    tl.store(bf_ptr + offs, bf, mask=mask)
    tl.store(gf_ptr + offs, gf, mask=mask)


# --------------------------------------------------------------------------------------
# host side


@functools.lru_cache(maxsize=256)
def _bonus_args(cfg: BonusConfig) -> dict:
    """Scalar arguments of the kernels' bonus functions (cached: the loss calls
    this every step with the same frozen config). Read only."""
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


_PARAMS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PARAMS_MAX = 64


def _params(a: dict, eps, eps_b, rho, dtype, device) -> torch.Tensor:
    """The kernels' scalar parameters as a device tensor, cached: a host-to-device
    copy (non-blocking, from pinned memory on CUDA) only for settings not seen
    recently, never a synchronisation."""
    vals = tuple(float(v) for v in (eps, eps_b, rho, a["log_end"], a["log_log_end"], a["le_const"],
                                    a["log_start"], a["b_start"], a["gamma"], LP_MAX, LOG_CLAMP))
    device = torch.device(device)
    key = (vals, dtype, device)
    hit = _PARAMS.get(key)
    if hit is not None:
        _PARAMS.move_to_end(key)
        return hit[0]
    host = torch.tensor(vals, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
    else:
        dev = host
    _PARAMS[key] = (dev, host)  # the pinned source stays alive until the copy has surely run
    while len(_PARAMS) > _PARAMS_MAX:
        _PARAMS.popitem(last=False)
    return dev


@triton.jit
def _loop_probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    for v0 in range(0, n, BLOCK):
        tl.store(x_ptr + v0 + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """``None`` when Triton's CPU interpreter runs a loop with a run-time bound,
    as the kernels do; else why not (Triton 3.6's interpreter fails so under
    recent NumPy: ``only 0-dimensional arrays can be converted to Python
    scalars``). Probed once, with a tiny kernel."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_loop_probe_kernel, InterpretedFunction):
        return ("the EL kernels got CPU tensors, but Triton's interpreter is off: set TRITON_INTERPRET=1 before "
                "importing encouraging_loss, or pass CUDA tensors")
    x = torch.ones(4, dtype=torch.float32)
    try:
        _loop_probe_kernel[(1,)](x, 4, BLOCK=2)
    except Exception as exc:  # the interpreter wraps what failed in its own error
        return (f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run the EL kernels "
                f"here: a loop with a run-time bound fails ({type(exc).__name__}: {exc}). Use a newer Triton "
                "(3.8 works) or run on a GPU; EL_FUSED_BACKEND=eager / compiled work on CPU.")
    if bool((x != 0).any()):
        return f"Triton {triton.__version__}'s CPU interpreter ran a loop with a run-time bound wrongly"
    return None


def _interpreting(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return False
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(problem)
    return True


def _fast(t: torch.Tensor, cdt: torch.dtype) -> bool:
    """The hardware's approximate exp, log2 and division in the per-element code
    (FAST): float32 on a GPU (the interpreter cannot call libdevice; float64
    keeps the accurate functions)."""
    return t.device.type != "cpu" and cdt == torch.float32


def _max_single() -> int:
    value = os.environ.get("EL_TRITON_MAX_SINGLE", "").strip()
    return int(value) if value else MAX_SINGLE


def launch_config(V: int, interpret: bool = False, block=None, single=None, warps=None):
    """``(BLOCK, SINGLE, num_warps)`` of the stats kernel for rows of ``V`` classes:
    the whole padded row in one block up to :data:`MAX_SINGLE`, else streamed in
    blocks of :data:`STREAM_BLOCK`. Warps grow with the block (a table, see
    ``python -m encouraging_loss.tools.benchmark --device cuda --tune`` to re-measure it).
    ``block`` / ``single`` / ``warps`` override (tests, tuning)."""
    padded = max(16, triton.next_power_of_2(V))
    cap = INTERPRET_BLOCK if interpret else None
    if single is None:
        single = padded <= (cap if cap else _max_single())
    if block is None:
        block = padded if single else (cap if cap else STREAM_BLOCK)
    if single and block < V:
        raise ValueError(f"a single block of {block} cannot hold rows of {V} classes")
    if warps is None:
        warps = 1 if interpret else 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 8192 else 32
    return block, bool(single), warps


def _grad_launch(V: int, interpret: bool, block=None, warps=None):
    """``(BLOCK, num_warps)`` of the gradient kernel (it streams every row)."""
    if block is None:
        block = INTERPRET_BLOCK if interpret else min(max(16, triton.next_power_of_2(V)), STREAM_BLOCK)
    if warps is None:
        warps = 1 if interpret else (4 if block <= 1024 else 8 if block <= 2048 else 16)
    return block, warps


@functools.lru_cache(maxsize=256)
def kernel_constexprs(cfg: BonusConfig, eps_b: float, soft: bool, f64: bool, fast: bool,
                      weighted: bool = False) -> dict:
    """The compile-time arguments both kernels share, as the wrappers launch them
    (also what :mod:`encouraging_loss.tools.kernel_sass` and the sm_90 compile test
    compile); cached per setting, read only. Unweighted, the weight pointer
    ``w_ptr`` is the constant None (no argument at run time); ``weighted``: the
    caller passes ``w_ptr``."""
    a = _bonus_args(cfg)
    has_bonus = cfg.rho != 0.0
    out = dict(SOFT=bool(soft), KIND=KIND_CODES[cfg.kind], HAS_LE=a["has_le"], HAS_START=a["has_start"],
               HAS_BONUS=has_bonus, DENSE=has_bonus and (bool(soft) or eps_b > 0.0), F64=bool(f64),
               FAST=bool(fast), WEIGHTED=bool(weighted))
    if not weighted:
        out["w_ptr"] = None
    return out


def _weight_arg(weight, cdt):
    """``{"w_ptr": ...}`` of the per-class weights, in the compute dtype and contiguous (``{}`` for None)."""
    if weight is None:
        return {}
    return {"w_ptr": weight if (weight.dtype == cdt and weight.is_contiguous()) else weight.to(cdt).contiguous()}


def el_stats_triton(z, tgt, cfg: BonusConfig, eps, eps_b, ignore_index, soft, need_grad, block=None, single=None,
                    warps=None, *, weight=None):
    """Per-row ``(loss, nll, bonus, stats)`` of 2-D ``z`` (``N x V``, rows contiguous);
    ``weight``: per-class weights (1-D, ``V``, on ``z``'s device) or None.

    ``stats`` (``N x 4``: ``m, log s, coef, yx``) is what :func:`el_grad_triton`
    needs, ``None`` without ``need_grad``. Values are float32 (float64 for
    float64 ``z``). A class index outside ``[0, V)`` (other than
    ``ignore_index``) gives a NaN loss and a zero gradient for its row."""
    N, V = z.shape
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=cdt, device=z.device)
    nll = torch.empty_like(loss)
    bonus = torch.empty_like(loss)
    stats = torch.empty((N, 4), dtype=cdt, device=z.device) if need_grad else None
    if N == 0:
        return loss, nll, bonus, stats
    BLOCK, SINGLE, warps = launch_config(V, _interpreting(z), block, single, warps)
    _el_stats_kernel[(N,)](
        z, z.stride(0), tgt, tgt.stride(0) if soft else 0,
        loss, nll, bonus, stats if need_grad else loss, _params(_bonus_args(cfg), eps, eps_b, cfg.rho, cdt, z.device),
        V, int(ignore_index),
        BLOCK=BLOCK, SINGLE=SINGLE, SMOOTH=eps > 0.0, NEED_GRAD=bool(need_grad),
        **kernel_constexprs(cfg, float(eps_b), bool(soft), cdt == torch.float64, _fast(z, cdt), weight is not None),
        **_weight_arg(weight, cdt), num_warps=warps,
    )
    return loss, nll, bonus, stats


def el_grad_triton(z, tgt, cfg: BonusConfig, eps, eps_b, ignore_index, soft, stats, grad_output, out, block=None,
                   warps=None, *, weight=None):
    """Write ``grad_output[:, None] * dEL/dz`` into ``out`` (``N x V``, rows
    contiguous; may be ``z`` itself). ``grad_output``: ``(N,)``, any stride
    (an expanded scalar has stride 0). ``weight``: as :func:`el_stats_triton`'s."""
    N, V = z.shape
    if N == 0:
        return out
    cdt = stats.dtype
    go = grad_output if grad_output.dtype == cdt else grad_output.to(cdt)
    BLOCK, warps = _grad_launch(V, _interpreting(z), block, warps)
    _el_grad_kernel[(N,)](
        z, z.stride(0), tgt, tgt.stride(0) if soft else 0, out, out.stride(0), stats, go, go.stride(0),
        _params(_bonus_args(cfg), eps, eps_b, cfg.rho, cdt, z.device), V, int(ignore_index),
        BLOCK=BLOCK,
        **kernel_constexprs(cfg, float(eps_b), bool(soft), cdt == torch.float64, _fast(z, cdt), weight is not None),
        **_weight_arg(weight, cdt), num_warps=warps,
    )
    return out


def el_rows_triton(z, tgt, cfg: BonusConfig, eps, eps_b, ignore_index, soft, grad, block=None, single=None, *,
                   weight=None):
    """Per-row ``(loss, nll, bonus)``, and with ``grad`` (``N x V``, may be ``z``)
    the unscaled gradient written into it (stats kernel, then the gradient
    kernel with ``grad_output = 1``); ``grad=None``: values only. ``weight``:
    per-class weights or None."""
    loss, nll, bonus, stats = el_stats_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, grad is not None,
                                              block, single, weight=weight)
    if grad is not None and z.shape[0]:
        one = torch.ones((), dtype=stats.dtype, device=z.device).expand(z.shape[0])
        el_grad_triton(z, tgt, cfg, eps, eps_b, ignore_index, soft, stats, one, grad, block=block, weight=weight)
    return loss, nll, bonus


def bonus_triton(lp: torch.Tensor, cfg: BonusConfig):
    """``(b, g, b_row, g_row)`` of a 1-D tensor of log-probabilities through the
    kernels' bonus functions (accurate scalar form, row form), to pin them to
    :mod:`encouraging_loss.bonus` in the tests."""
    lp = lp.contiguous()
    outs = [torch.empty_like(lp) for _ in range(4)]
    a = _bonus_args(cfg)
    BLOCK = 64
    _bonus_probe_kernel[(triton.cdiv(lp.numel(), BLOCK),)](
        lp, *outs, lp.numel(), _params(a, 0.0, 0.0, 1.0, lp.dtype, lp.device), BLOCK=BLOCK,
        KIND=KIND_CODES[cfg.kind], HAS_LE=a["has_le"], HAS_START=a["has_start"], FAST=_fast(lp, lp.dtype),
    )
    return tuple(outs)
