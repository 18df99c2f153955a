""" Encouraging Loss w/ label smoothing or soft targets, for timm

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022 (arXiv 2110.06537).

The timm counterparts of ``LabelSmoothingCrossEntropy`` and
``SoftTargetCrossEntropy``: cross-entropy plus a bonus ``b(p) <= 0`` that keeps
rewarding examples the model already classifies well. Both classes are thin
subclasses of :class:`encouraging_loss.EncouragingLoss`; the bonus itself is
computed by :mod:`encouraging_loss.bonus` and is not written here.
"""
from typing import Optional

import torch

from encouraging_loss import EncouragingLoss
from encouraging_loss.modules import weight_repr

__all__ = ["EncouragingLabelSmoothingLoss", "EncouragingSoftTargetLoss"]

# Parameter names as the timm user types them, for the core's error messages
# (the core's BonusConfig calls them kind / gamma / rho).
_NAMES = {"kind": "bonus", "gamma": "bonus_gamma", "rho": "bonus_rho"}


def _impl_kwargs(impl) -> dict:
    """``impl=None`` leaves the choice (and its check) to the core."""
    return {} if impl is None else {'impl': impl}


class EncouragingLabelSmoothingLoss(EncouragingLoss):
    """ Encouraging Loss with label smoothing, for class-index targets.

    Zhao et al., "Well-Classified Examples are Underestimated in Classification
    with Deep Neural Networks", AAAI 2022. Per example::

        (1 - smoothing) * (-log p_y + b(p_y)) + smoothing / C * sum_k (-log p_k + b(p_k))

    averaged over the batch. With ``bonus_rho=0`` this is exactly timm's
    ``LabelSmoothingCrossEntropy`` (and ``nn.CrossEntropyLoss`` when
    ``smoothing=0``).

    Args:
        smoothing: Label smoothing factor in [0, 1), applied to the
            log-likelihood and (unless ``bonus_smoothing`` is set) to the bonus.
        log_end: Conservative bonus end point in (0, 1]: the bonus is
            ``log(1 - p)`` up to ``p = log_end`` and its tangent above.
            1 gives the normal bonus; 0.75 is the paper's setting for images.
        bonus: Bonus kind, 'log' (normal / conservative / aggressive),
            'power' (``-p ** bonus_gamma``) or 'cosine' (``cos(pi p) - 1``).
        bonus_start: Aggressive bonus threshold in [0, 1): no bonus below
            ``p = bonus_start``. 0 disables it ('log' bonus only).
        bonus_gamma: Exponent of the 'power' bonus, > 0.
        bonus_rho: Weight of the bonus, >= 0; 0 gives label-smoothed
            cross-entropy. Can be changed during training (bonus schedules).
        bonus_smoothing: Label smoothing of the bonus term in [0, 1);
            None uses ``smoothing``.
        impl: Implementation of the core loss (one of
            ``encouraging_loss.functional.IMPLS``); None uses the core's default.
        weight: Per-class weights (1-D float tensor of C values >= 0) or None,
            with ``nn.CrossEntropyLoss``'s meaning: the mean is then over the
            sum of the targets' weights. A buffer; ``loss_fn.weight = w`` (or
            None) switches it, e.g. for deferred re-weighting (DRW).
    """

    def __init__(
            self,
            smoothing: float = 0.1,
            log_end: float = 0.75,
            bonus: str = 'log',
            bonus_start: float = 0.,
            bonus_gamma: float = 1.,
            bonus_rho: float = 1.,
            bonus_smoothing: Optional[float] = None,
            impl: Optional[str] = None,
            weight: Optional[torch.Tensor] = None,
    ):
        super().__init__(
            log_end=log_end,
            bonus=bonus,
            bonus_start=bonus_start,
            bonus_gamma=bonus_gamma,
            bonus_rho=bonus_rho,
            smoothing=smoothing,
            bonus_smoothing=bonus_smoothing,
            reduction='mean',
            **_impl_kwargs(impl),
            names=_NAMES,
            weight=weight,
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor, return_parts: bool = False):
        """Mean loss over the batch (``ELParts`` of loss, NLL and bonus when ``return_parts``)."""
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            raise ValueError(
                f'{type(self).__name__} expects class-index targets, got floating-point targets of shape '
                f'{tuple(target.shape)}; use EncouragingSoftTargetLoss (soft_targets=True) with Mixup/CutMix')
        return super().forward(x, target, return_parts=return_parts)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"smoothing={self.smoothing}, bonus={c.kind!r}, log_end={c.log_end}, bonus_start={c.bonus_start}, "
            f"bonus_gamma={c.gamma}, bonus_rho={c.rho}, bonus_smoothing={self.bonus_smoothing}"
            f"{weight_repr(self.weight)}")


class EncouragingSoftTargetLoss(EncouragingLoss):
    """ Encouraging Loss for soft (dense) targets, e.g. from Mixup / CutMix.

    Zhao et al., "Well-Classified Examples are Underestimated in Classification
    with Deep Neural Networks", AAAI 2022. Per example, with target
    distribution ``q``::

        sum_k q_k * (-log p_k + b(p_k))

    averaged over the batch. There is no smoothing argument: Mixup / CutMix
    already smooth ``q``. With ``bonus_rho=0`` this is exactly timm's
    ``SoftTargetCrossEntropy``.

    Args:
        log_end: Conservative bonus end point in (0, 1]; 1 gives the normal
            bonus, 0.75 is the paper's setting for images.
        bonus: Bonus kind, 'log', 'power' or 'cosine'.
        bonus_start: Aggressive bonus threshold in [0, 1); 0 disables it.
        bonus_gamma: Exponent of the 'power' bonus, > 0.
        bonus_rho: Weight of the bonus, >= 0; 0 gives soft-target cross-entropy.
        impl: Implementation of the core loss (one of
            ``encouraging_loss.functional.IMPLS``); None uses the core's default.
        weight: Per-class weights (1-D float tensor of C values >= 0) or None,
            with ``F.cross_entropy``'s meaning for soft targets
            (``-sum_k w_k q_k log p_k``, batch mean over rows). A buffer;
            ``loss_fn.weight = w`` (or None) switches it.
    """

    def __init__(
            self,
            log_end: float = 0.75,
            bonus: str = 'log',
            bonus_start: float = 0.,
            bonus_gamma: float = 1.,
            bonus_rho: float = 1.,
            impl: Optional[str] = None,
            weight: Optional[torch.Tensor] = None,
    ):
        super().__init__(
            log_end=log_end,
            bonus=bonus,
            bonus_start=bonus_start,
            bonus_gamma=bonus_gamma,
            bonus_rho=bonus_rho,
            smoothing=0.,
            bonus_smoothing=None,
            reduction='mean',
            **_impl_kwargs(impl),
            names=_NAMES,
            weight=weight,
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor, return_parts: bool = False):
        """Mean loss over the batch (``ELParts`` of loss, NLL and bonus when ``return_parts``)."""
        if isinstance(target, torch.Tensor) and not target.is_floating_point():
            raise ValueError(
                f'{type(self).__name__} expects dense floating-point targets shaped like the logits '
                f'(Mixup/CutMix), got {target.dtype} targets of shape {tuple(target.shape)}; '
                f'use EncouragingLabelSmoothingLoss (soft_targets=False) for class indices')
        return super().forward(x, target, return_parts=return_parts)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"bonus={c.kind!r}, log_end={c.log_end}, bonus_start={c.bonus_start}, "
            f"bonus_gamma={c.gamma}, bonus_rho={c.rho}{weight_repr(self.weight)}")
