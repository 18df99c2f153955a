"""``nn.Module`` wrapper of :func:`encouraging_loss.functional.encouraging_loss`."""
from typing import Mapping, Optional

import torch
from torch import nn

from .bonus import BonusConfig
from .functional import DEFAULT_IMPL, IMPLS, REDUCTIONS, _el, check_choice, check_probability

__all__ = ["EncouragingLoss"]


class EncouragingLoss(nn.Module):
    """Encouraging Loss (Zhao et al., "Well-Classified Examples are
    Underestimated in Classification with Deep Neural Networks", AAAI 2022).

    Cross-entropy plus a bonus ``b(p_y) = log(1 - p_y)`` (or its conservative,
    aggressive, power or cosine variants) that keeps rewarding examples the
    model already classifies well. The configuration is checked once, here.

    Args:
        log_end: conservative bonus end point in ``(0, 1]`` (``1``: normal bonus).
        bonus: ``"log"``, ``"power"`` or ``"cosine"``.
        bonus_start: aggressive bonus threshold in ``[0, 1)``.
        bonus_gamma: exponent of the power bonus.
        bonus_rho: bonus weight; settable later through :attr:`bonus_rho`.
        smoothing: label smoothing in ``[0, 1)``.
        bonus_smoothing: smoothing of the bonus term (``None``: ``smoothing``).
        ignore_index: class-index target to ignore.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        impl: implementation, see :func:`encouraging_loss.functional.encouraging_loss`.
        names: display names of the parameters in error messages.

    ``forward(logits, target, return_parts=False)`` takes class indices or soft
    targets, like the functional form.
    """

    def __init__(
        self,
        log_end: float = 1.0,
        bonus: str = "log",
        bonus_start: float = 0.0,
        bonus_gamma: float = 1.0,
        bonus_rho: float = 1.0,
        smoothing: float = 0.0,
        bonus_smoothing: Optional[float] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        impl: str = DEFAULT_IMPL,
        names: Optional[Mapping[str, str]] = None,
    ):
        super().__init__()
        self.names = dict(names or {})
        self.cfg = BonusConfig(bonus, log_end, bonus_start, bonus_gamma, bonus_rho).validate(self.names)
        check_probability(smoothing, "smoothing", self.names)
        check_probability(bonus_smoothing, "bonus_smoothing", self.names, allow_none=True)
        check_choice(reduction, REDUCTIONS, "reduction", self.names)
        check_choice(impl, IMPLS, "impl", self.names)
        self.smoothing = smoothing
        self.bonus_smoothing = bonus_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.impl = impl

    @property
    def bonus_rho(self) -> float:
        return self.cfg.rho

    @bonus_rho.setter
    def bonus_rho(self, rho: float) -> None:
        self.cfg = BonusConfig(self.cfg.kind, self.cfg.log_end, self.cfg.bonus_start, self.cfg.gamma, rho).validate(
            {"rho": self.names.get("rho", "bonus_rho")}
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor, return_parts: bool = False):
        return _el(
            logits, target, self.cfg, self.smoothing, self.bonus_smoothing, self.ignore_index,
            self.reduction, return_parts, self.impl, self.names,
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"bonus={c.kind!r}, log_end={c.log_end}, bonus_start={c.bonus_start}, gamma={c.gamma}, "
            f"rho={c.rho}, smoothing={self.smoothing}, bonus_smoothing={self.bonus_smoothing}, "
            f"reduction={self.reduction!r}, impl={self.impl!r}"
        )
