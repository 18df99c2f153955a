"""Bonus functions of the Encouraging Loss.

From "Well-Classified Examples are Underestimated in Classification with Deep
Neural Networks" (Zhao et al., AAAI 2022, arXiv 2110.06537), EL_SPEC section 2.1.

This module is the only place where the bonus formula is written. Everything
else (the reference loss, the fused kernels, the fairseq and timm plugins)
calls :func:`bonus_value` / :func:`bonus_grad` or the :class:`BonusConfig`.

Every function takes ``log p`` rather than ``p``: ``log(1 - p)`` is computed as
``log1mexp(log p)``, which stays accurate when ``p`` is close to 1, exactly the
well-classified examples EL is about.
"""
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

__all__ = [
    "BONUS_KINDS",
    "BONUS_SCHEDULES",
    "CLAMP",
    "BonusConfig",
    "bonus_value",
    "bonus_grad",
    "bonus_rho_at",
    "log1mexp",
]

#: bonus kinds: ``log`` covers the normal, conservative and aggressive bonuses.
BONUS_KINDS = ("log", "power", "cosine")
#: ramps of the bonus weight over training (EL_SPEC 2.1).
BONUS_SCHEDULES = ("none", "linear", "cosine", "exp")
#: floor inside ``log(max(1 - p, CLAMP))`` (part of the definition).
CLAMP = 1e-5
_LOG_CLAMP = math.log(CLAMP)
# log p above which 1 - p < CLAMP: the clamp region, where b is constant.
_LP_MAX = math.log1p(-CLAMP)
_LN2 = math.log(2.0)


def _name(names: Optional[Mapping[str, str]], key: str) -> str:
    return names.get(key, key) if names else key


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class BonusConfig:
    """Which bonus ``b(p)`` to add to the negative log-likelihood.

    Args:
        kind: ``"log"`` (``log(1 - p)``, with ``log_end`` and ``bonus_start``),
            ``"power"`` (``-p**gamma``) or ``"cosine"`` (``cos(pi p) - 1``).
        log_end: ``LE`` of the conservative bonus: ``log(1 - p)`` up to
            ``p = LE``, its tangent above. ``1`` is the normal bonus.
            Must be in ``(0, 1]``. Only used by ``kind="log"``.
        bonus_start: ``s`` of the aggressive bonus: no bonus below ``p = s``,
            the log bonus shifted to start at 0 above. ``0`` turns it off.
            Must be in ``[0, 1)``. Only used by ``kind="log"``.
        gamma: exponent of the power bonus, ``> 0``.
        rho: weight of the bonus term (``0`` gives plain cross-entropy).
    """

    kind: str = "log"
    log_end: float = 1.0
    bonus_start: float = 0.0
    gamma: float = 1.0
    rho: float = 1.0

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "BonusConfig":
        """Raise ``ValueError`` naming the parameter (``names`` maps a field
        to the name the user typed, e.g. ``{"log_end": "--log-end"}``)."""
        if self.kind not in BONUS_KINDS:
            raise ValueError(
                f"{_name(names, 'kind')} must be one of {', '.join(BONUS_KINDS)}, got {self.kind!r}"
            )
        checks = (
            ("log_end", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("bonus_start", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("gamma", lambda v: v > 0.0 and math.isfinite(v), "a finite number > 0"),
            ("rho", lambda v: v >= 0.0 and math.isfinite(v), "a finite number >= 0"),
        )
        for field, ok, what in checks:
            value = getattr(self, field)
            if not _is_number(value) or not ok(float(value)):
                raise ValueError(f"{_name(names, field)} must be {what}, got {value!r}")
        return self

    @property
    def is_zero(self) -> bool:
        """True when the bonus contributes nothing (plain cross-entropy)."""
        return self.rho == 0.0


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range
    (Maechler 2012): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below -ln 2.
    Both branches get inputs where they are finite, so gradients never see
    ``0 * inf``."""
    near = torch.log(-torch.expm1(torch.clamp(x, min=-_LN2)))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def _log_bonus(lp: torch.Tensor, log_end: float) -> torch.Tensor:
    """Normal (``log_end == 1``) or conservative log bonus of ``p = exp(lp)``."""
    # clamping lp (not 1 - p) keeps the unused gradient finite in the clamp region
    b = torch.clamp(log1mexp(torch.clamp(lp, max=_LP_MAX)), min=_LOG_CLAMP)
    if log_end < 1.0:
        linear = (torch.exp(lp) - log_end) / (log_end - 1.0) + math.log1p(-log_end)
        b = torch.where(lp <= math.log(log_end), b, linear)
    return b


def _log_bonus_scalar(p: float, log_end: float) -> float:
    if p <= log_end:
        return math.log(max(1.0 - p, CLAMP))
    return (p - log_end) / (log_end - 1.0) + math.log1p(-log_end)


def bonus_value(lp: torch.Tensor, cfg: BonusConfig) -> torch.Tensor:
    """``b(p)`` element-wise, from ``lp = log p`` (EL_SPEC 2.1), without ``rho``.

    Differentiable: autograd through it gives ``b'(p)``."""
    if cfg.kind == "power":
        return -torch.exp(cfg.gamma * lp)
    if cfg.kind == "cosine":
        return torch.cos(math.pi * torch.exp(lp)) - 1.0
    b = _log_bonus(lp, cfg.log_end)
    if cfg.bonus_start > 0.0:
        s = cfg.bonus_start
        shifted = b - _log_bonus_scalar(s, cfg.log_end)
        b = torch.where(lp >= math.log(s), shifted, torch.zeros_like(b))
    return b


def bonus_grad(lp: torch.Tensor, cfg: BonusConfig) -> torch.Tensor:
    """``g(p) = b'(p) * p`` element-wise, from ``lp = log p`` (EL_SPEC 3),
    without ``rho``. With ``S = sum_k u_k g_k`` the gradient of
    ``sum_k u_k b(p_k)`` with respect to logit ``j`` is ``u_j g_j - p_j S``."""
    p = torch.exp(lp)
    if cfg.kind == "power":
        return -cfg.gamma * torch.exp(cfg.gamma * lp)
    if cfg.kind == "cosine":
        return -math.pi * torch.sin(math.pi * p) * p
    lpc = torch.clamp(lp, max=_LP_MAX)
    # -p / (1 - p), and 0 in the clamp region where b is constant
    g = torch.where(lp > _LP_MAX, torch.zeros_like(p), -torch.exp(lpc - log1mexp(lpc)))
    if cfg.log_end < 1.0:
        g = torch.where(lp <= math.log(cfg.log_end), g, p / (cfg.log_end - 1.0))
    if cfg.bonus_start > 0.0:
        g = torch.where(lp >= math.log(cfg.bonus_start), g, torch.zeros_like(g))
    return g


def bonus_rho_at(
    rho: float,
    epoch: int,
    *,
    defer_start: int = 0,
    schedule: str = "none",
    max_epoch: int = 0,
    exp_rate: float = 5.0,
) -> float:
    """The bonus weight in force during ``epoch`` (1-based), EL_SPEC 2.1.

    The bonus is off while ``epoch <= defer_start``. With a schedule, ``rho``
    is ramped by ``t = epoch / max_epoch``: linear ``t``, cosine
    ``(cos(pi (1 + t)) + 1) / 2``, exp ``exp((t - 1) r)``.
    """
    if epoch <= defer_start:
        return 0.0
    if schedule == "none":
        return rho
    if schedule not in BONUS_SCHEDULES:
        raise ValueError(f"bonus schedule must be one of {', '.join(BONUS_SCHEDULES)}, got {schedule!r}")
    if max_epoch <= 0:
        raise ValueError(f"bonus schedule {schedule!r} needs max_epoch > 0, got {max_epoch!r}")
    t = min(max(epoch / max_epoch, 0.0), 1.0)
    if schedule == "linear":
        ramp = t
    elif schedule == "cosine":
        ramp = (math.cos(math.pi * (1.0 + t)) + 1.0) / 2.0
    else:
        ramp = math.exp((t - 1.0) * exp_rate)
    return rho * ramp
