"""``nn.Module`` wrapper of :func:`encouraging_loss.functional.encouraging_loss`."""
import dataclasses
from typing import Mapping, Optional

import torch
from torch import nn

from .bonus import BonusConfig
from .checks import (
    DEFAULT_IMPL,
    IMPLS,
    REDUCTIONS,
    check_choice,
    check_index,
    check_probability,
    check_settings,
    check_weight_values,
    param_names,
)
from .functional import el_checked

__all__ = ["EncouragingLoss", "CheckedLossSettings", "weight_repr"]


class CheckedLossSettings(nn.Module):
    """The settings every loss module of the core shares (``smoothing``,
    ``ignore_index``, ``reduction``), as properties whose every assignment is
    checked and names the parameter (``self.names``); a bad value never takes effect.

    ``weight`` (per-class weights, ``F.cross_entropy``'s meaning) is a buffer,
    as in ``nn.CrossEntropyLoss``: it follows the module's ``.to(device)``,
    and ``loss_fn.weight = tensor`` or ``= None`` switches it at any time (DRW
    does so between epochs), checked like the constructor's argument (its
    length and device against the logits at the next call)."""

    def _init_weight(self, weight) -> None:
        self.register_buffer("weight", check_weight_values(weight, self.names))

    def __setattr__(self, name, value):
        if name == "weight" and "weight" in self.__dict__.get("_buffers", ()):
            value = check_weight_values(value, self.names)
        super().__setattr__(name, value)

    @property
    def smoothing(self) -> float:
        """Label smoothing, in [0, 1)."""
        return self._smoothing

    @smoothing.setter
    def smoothing(self, value) -> None:
        self._smoothing = check_probability(value, "smoothing", self.names)

    @property
    def ignore_index(self) -> int:
        """Class-index target that counts for nothing."""
        return self._ignore_index

    @ignore_index.setter
    def ignore_index(self, value) -> None:
        self._ignore_index = check_index(value, "ignore_index", self.names)

    @property
    def reduction(self) -> str:
        """none, mean or sum."""
        return self._reduction

    @reduction.setter
    def reduction(self, value) -> None:
        self._reduction = check_choice(value, REDUCTIONS, "reduction", self.names)


def _bonus_field(field: str, doc: str):
    """A property for one :class:`BonusConfig` field; setting it re-validates."""

    def get(self):
        return getattr(self.cfg, field)

    def set_(self, value):
        self.cfg = dataclasses.replace(self.cfg, **{field: value})

    return property(get, set_, doc=doc)


class EncouragingLoss(CheckedLossSettings):
    """Encouraging Loss (Zhao et al., "Well-Classified Examples are
    Underestimated in Classification with Deep Neural Networks", AAAI 2022).

    Cross-entropy plus a bonus ``b(p_y) = log(1 - p_y)`` (or its conservative,
    aggressive, power or cosine variants) that keeps rewarding examples the
    model already classifies well.

    Args:
        log_end: conservative bonus end point in ``(0, 1]`` (``1``: normal bonus).
        bonus: ``"log"``, ``"power"`` or ``"cosine"``.
        bonus_start: aggressive bonus threshold in ``[0, 1)``.
        bonus_gamma: exponent of the power bonus.
        bonus_rho: bonus weight (schedules change it during training).
        smoothing: label smoothing in ``[0, 1)``.
        bonus_smoothing: smoothing of the bonus term (``None``: ``smoothing``).
        ignore_index: class-index target to ignore (an integer).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        impl: implementation, see :func:`encouraging_loss.functional.encouraging_loss`.
        inplace_backward: CUDA only: the backward pass writes the logits' gradient into
            the logits' storage (no extra memory; see :func:`encouraging_loss.functional.encouraging_loss`).
        names: display names of the parameters in error messages.
        weight: per-class weights (a 1-D floating-point tensor of ``V`` finite
            values ``>= 0``, or None), with ``F.cross_entropy``'s meaning; see
            :func:`encouraging_loss.functional.encouraging_loss`. A buffer, as in
            ``nn.CrossEntropyLoss``.

    Every setting is an attribute that can be changed after construction
    (``loss.bonus_rho = 0.5``, ``loss.smoothing = 0.1``); each assignment is
    checked like the constructor's arguments, so a bad value fails where it is
    set, with the parameter's name, and never reaches a training step;
    ``loss.weight = w`` (or ``None``) switches the class weights.

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
        inplace_backward: bool = False,
        weight: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        #: CUDA (Triton): the backward pass writes the gradient into the logits' storage
        self.inplace_backward = bool(inplace_backward)
        self.names = param_names(names)
        cfg = BonusConfig(bonus, log_end, bonus_start, bonus_gamma, bonus_rho)
        cfg, eps, eps_b, ignore_index = check_settings(
            cfg, smoothing, bonus_smoothing, ignore_index, reduction, impl, self.names
        )
        self._cfg, self._smoothing, self._bonus_smoothing = cfg, eps, eps_b
        self._ignore_index, self._reduction, self._impl = ignore_index, reduction, impl
        self._init_weight(weight)

    # -- settings: every assignment is checked ---------------------------------
    @property
    def cfg(self) -> BonusConfig:
        """The bonus configuration (a validated :class:`BonusConfig`)."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: BonusConfig) -> None:
        if not isinstance(cfg, BonusConfig):
            raise ValueError(f"cfg must be a BonusConfig, got {type(cfg).__name__}")
        self._cfg = cfg.validate(self.names)

    log_end = _bonus_field("log_end", "Conservative bonus end point, in (0, 1].")
    bonus = _bonus_field("kind", "Bonus kind: log, power or cosine.")
    bonus_start = _bonus_field("bonus_start", "Aggressive bonus threshold, in [0, 1).")
    bonus_gamma = _bonus_field("gamma", "Exponent of the power bonus, > 0.")
    bonus_rho = _bonus_field("rho", "Weight of the bonus, >= 0.")

    @property
    def bonus_smoothing(self) -> Optional[float]:
        """Smoothing of the bonus term, in [0, 1); None follows :attr:`smoothing`."""
        return self._bonus_smoothing

    @bonus_smoothing.setter
    def bonus_smoothing(self, value) -> None:
        self._bonus_smoothing = check_probability(value, "bonus_smoothing", self.names, allow_none=True)

    @property
    def impl(self) -> str:
        """fused or reference."""
        return self._impl

    @impl.setter
    def impl(self, value) -> None:
        self._impl = check_choice(value, IMPLS, "impl", self.names)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, return_parts: bool = False):
        return el_checked(
            logits, target, self._cfg, self._smoothing, self._bonus_smoothing, self._ignore_index,
            self._reduction, return_parts, self._impl, self.names, self.inplace_backward, self.weight,
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"bonus={c.kind!r}, log_end={c.log_end}, bonus_start={c.bonus_start}, gamma={c.gamma}, "
            f"rho={c.rho}, smoothing={self.smoothing}, bonus_smoothing={self.bonus_smoothing}, "
            f"reduction={self.reduction!r}, impl={self.impl!r}{weight_repr(self.weight)}"
        )


def weight_repr(weight) -> str:
    """``", weight=..."`` for a module's ``extra_repr`` (nothing when None):
    short vectors in full, long ones by their length and range."""
    if weight is None:
        return ""
    if weight.numel() <= 8:
        return f", weight={[round(float(v), 4) for v in weight]}"
    return (f", weight=<{weight.numel()} classes, min {float(weight.min()):.4g}, "
            f"max {float(weight.max()):.4g}>")
