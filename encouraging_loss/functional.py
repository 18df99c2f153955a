"""Encouraging Loss, functional form.

``EL = -log p_y + rho * b(p_y)`` (Zhao et al., AAAI 2022, Eq. 6), with label
smoothing applied to both terms (EL_SPEC 2.3) and soft targets for Mixup /
CutMix (EL_SPEC 2.4). The bonus ``b`` is defined in :mod:`encouraging_loss.bonus`,
the checks of settings and inputs in :mod:`encouraging_loss.checks`, the
reference formula in :mod:`encouraging_loss.reference` and the fused paths in
:mod:`encouraging_loss.ops`.
"""
from typing import Mapping, NamedTuple, Optional

import torch

from .bonus import BonusConfig
from .checks import (
    DEFAULT_IMPL,
    PENDING,
    check_inputs,
    check_settings,
    check_targets,
    check_weight,
    deferred_check,
    param_names,
)
from .ops.fused import fused_el_rows, select_backend
from .reference import reduce_rows, reference_rows, row_count

__all__ = ["ELParts", "check_targets", "el_checked", "encouraging_loss"]


class ELParts(NamedTuple):
    """The loss and the two terms worth logging, reduced like the loss.

    ``loss = smoothed NLL + bonus``; ``nll_loss`` is the plain, unsmoothed
    ``-log p_y`` (``sum_k q_k (-log p_k)`` for soft targets), as fairseq logs
    it; ``bonus`` is ``rho`` times the (smoothed) bonus term, ``<= 0``.

    With class weights ``c`` (``weight=``) both terms are weighted like the
    loss, ``c_y (-log p_y)`` (``sum_k c_k q_k (-log p_k)``) and the weighted
    bonus, and reduced like it (``"mean"``: over the sum of ``c_y`` of the
    non-ignored targets), so that ``loss = smoothed NLL + bonus`` still holds.
    """

    loss: torch.Tensor
    nll_loss: torch.Tensor
    bonus: torch.Tensor


def encouraging_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    log_end: float = 1.0,
    bonus: str = "log",
    bonus_start: float = 0.0,
    bonus_gamma: float = 1.0,
    bonus_rho: float = 1.0,
    smoothing: float = 0.0,
    bonus_smoothing: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
    impl: str = DEFAULT_IMPL,
    names: Optional[Mapping[str, str]] = None,
    inplace_backward: bool = False,
    weight: Optional[torch.Tensor] = None,
):
    """Encouraging Loss of ``logits`` against ``target``.

    Args:
        logits: ``(..., V)`` unnormalised scores, any floating dtype; float16
            and bfloat16 are computed in float32, the result is float32.
        target: class indices of shape ``logits.shape[:-1]`` (entries equal to
            ``ignore_index`` contribute nothing), or a dense distribution of
            shape ``(..., V)`` (Mixup / CutMix soft targets).
        log_end: conservative bonus end point ``LE`` in ``(0, 1]``; ``1`` is
            the normal bonus ``log(1 - p)``, the paper uses 0.75 for images and
            0.5 for translation.
        bonus: ``"log"``, ``"power"`` or ``"cosine"`` (EL_SPEC 2.1).
        bonus_start: aggressive bonus threshold ``s`` in ``[0, 1)``.
        bonus_gamma: exponent of the ``"power"`` bonus.
        bonus_rho: weight of the bonus; ``0`` gives (label-smoothed) cross-entropy.
        smoothing: label smoothing ``eps`` in ``[0, 1)``; the target weights
            are ``1 - eps + eps / V`` on the target and ``eps / V`` elsewhere.
        bonus_smoothing: smoothing of the bonus term; ``None`` uses ``smoothing``.
        ignore_index: target value to ignore (class-index targets only).
        reduction: ``"none"``, ``"mean"`` (over non-ignored targets) or ``"sum"``.
        return_parts: also return the plain NLL and the bonus term, as :class:`ELParts`.
        impl: ``"fused"`` (default: loss and closed-form gradient in one pass,
            no ``N x V`` temporaries; see :mod:`encouraging_loss.ops.fused` for its
            Triton / torch.compile / eager back ends) or ``"reference"`` (the
            plain formula under autograd).
        names: display names for parameters in error messages, e.g.
            ``{"log_end": "--log-end"}``.
        inplace_backward: with ``impl="fused"`` on CUDA (Triton), the
            backward pass writes the logits' gradient into the logits' own
            storage: no extra memory, but the logits hold the gradient
            afterwards (an error is raised if autograd still needs them).
            Ignored by the CPU back ends.
        weight: per-class weights ``c``, a 1-D floating-point tensor of ``V``
            finite values ``>= 0`` on the logits' device (``None``: all 1),
            with ``torch.nn.functional.cross_entropy``'s meaning: each target
            weight is multiplied by its class's weight. Class indices ``y``:
            ``(1 - eps) c_y (-log p_y) + eps/V sum_k c_k (-log p_k)
            + rho [(1 - eps_b) c_y b(p_y) + eps_b/V sum_k c_k b(p_k)]``, and
            ``"mean"`` divides by the sum of ``c_y`` over the non-ignored
            targets; soft targets ``q``: ``-sum_k c_k q~_k log p_k + rho sum_k
            c_k u~_k b(p_k)`` (``q~``, ``u~`` smoothed by ``eps``, ``eps_b``),
            ``"mean"`` divides by the number of rows. With ``bonus_rho=0`` this
            is ``F.cross_entropy(logits, target, weight=c, label_smoothing=eps)``.
            Deferred re-weighting (DRW, Cao et al. 2019) sets it from an epoch
            on. Not differentiated (a weight that requires grad is refused).

    Returns:
        The loss, or :class:`ELParts` when ``return_parts``.

    Non-finite logits are not an error: a row with a NaN or +inf logit gets a
    NaN loss (as with ``torch.nn.functional.cross_entropy``) so that NaN
    detection and fp16 loss scaling see it; other rows are unaffected.

    A class index outside ``[0, V)`` raises ``ValueError``. On CUDA (Triton)
    the check runs on the device without stalling it: that call's loss is
    NaN and the error is raised by the next call (or :func:`check_targets`);
    ``EL_CHECK_TARGETS=sync`` checks at once, at the price of a
    synchronisation per call.
    """
    cfg = BonusConfig(kind=bonus, log_end=log_end, bonus_start=bonus_start, gamma=bonus_gamma, rho=bonus_rho)
    return el_checked(
        logits, target, *check_settings(cfg, smoothing, bonus_smoothing, ignore_index, reduction, impl, names),
        reduction, return_parts, impl, names, inplace_backward, weight,
    )


def el_checked(logits, target, cfg, smoothing, bonus_smoothing, ignore_index, reduction, return_parts, impl, names=None,
               inplace_backward=False, weight=None):
    """:func:`encouraging_loss` with settings already checked by :func:`check_settings`
    (what the module and the plugins call on every step; the tensors are still checked).

    ``cfg`` is a validated :class:`~encouraging_loss.bonus.BonusConfig`,
    ``smoothing`` / ``bonus_smoothing`` floats (``bonus_smoothing`` may be
    ``None``: same as ``smoothing``), ``ignore_index`` an int; ``weight`` the
    per-class weights or ``None`` (checked here, against the logits)."""
    PENDING.poll()  # a bad target found on the device by an earlier call (CUDA): no wait
    backend = select_backend(logits) if impl == "fused" and isinstance(logits, torch.Tensor) else None
    names = param_names(names)
    soft = check_inputs(logits, target, ignore_index, names, deferred_check(logits, backend))
    eps = smoothing
    eps_b = eps if bonus_smoothing is None else bonus_smoothing
    if weight is not None:  # class weights: one branch here, the unweighted path below is untouched
        check_weight(weight, logits, names)
        if impl == "fused":
            rows = fused_el_rows(logits, target, cfg, eps, eps_b, ignore_index, soft,
                                 inplace_backward=inplace_backward, backend=backend, weight=weight)
        else:
            rows = reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, weight=weight)
        count = row_count(rows[0], rows[3], target, weight)
        out = ELParts(*(reduce_rows(v, reduction, count) for v in rows[:3]))
        return out if return_parts else out.loss
    if impl == "fused":
        loss, nll, bonus, valid = fused_el_rows(logits, target, cfg, eps, eps_b, ignore_index, soft,
                                                inplace_backward=inplace_backward, backend=backend)
    else:
        loss, nll, bonus, valid = reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft)
    # mean over the targets that count; all ignored gives 0, not NaN
    count = max(loss.numel(), 1) if valid is None else valid.sum().clamp(min=1)
    out = ELParts(*(reduce_rows(v, reduction, count) for v in (loss, nll, bonus)))
    return out if return_parts else out.loss
