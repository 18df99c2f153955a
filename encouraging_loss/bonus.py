"""Bonus functions of the Encouraging Loss.

From "Well-Classified Examples are Underestimated in Classification with Deep
Neural Networks" (Zhao et al., AAAI 2022, arXiv 2110.06537), EL_SPEC section 2.1.

This module is the only place where the bonus formula is written. Everything
else (the reference loss, the fused kernels, the fairseq and timm plugins)
calls :func:`bonus_value` / :func:`bonus_grad` / :func:`bonus_value_and_grad`
or the :class:`BonusConfig` (the Triton kernel mirrors them, see
``triton_kernels.py``).

Every function takes ``log p`` rather than ``p``: ``log(1 - p)`` is computed as
``log1mexp(log p)``, which stays accurate when ``p`` is close to 1, exactly the
well-classified examples EL is about.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

__all__ = [
    "BONUS_KINDS",
    "BONUS_SCHEDULES",
    "CLAMP",
    "BonusConfig",
    "LOG_CLAMP",
    "LP_MAX",
    "bonus_value",
    "bonus_grad",
    "bonus_value_and_grad",
    "bonus_rows",
    "bonus_rho_at",
    "as_integer",
    "as_real",
    "check_schedule",
    "log1mexp",
]

#: bonus kinds: ``log`` covers the normal, conservative and aggressive bonuses.
BONUS_KINDS = ("log", "power", "cosine")
#: ramps of the bonus weight over training (EL_SPEC 2.1).
BONUS_SCHEDULES = ("none", "linear", "cosine", "exp")
#: floor inside ``log(max(1 - p, CLAMP))`` (part of the definition).
CLAMP = 1e-5
#: ``log(CLAMP)``: the smallest value of the log bonus.
LOG_CLAMP = math.log(CLAMP)
#: ``log p`` above which ``1 - p < CLAMP``: the clamp region, where ``b`` is constant.
LP_MAX = math.log1p(-CLAMP)
_LN2 = math.log(2.0)


def _name(names: Optional[Mapping[str, str]], key: str) -> str:
    return names.get(key, key) if names else key


def as_real(value) -> Optional[float]:
    """``value`` as a Python float when it is a real number: ``int``, ``float``,
    a numpy integer or floating scalar, or a 0-dim real tensor; ``None`` for
    anything else (``bool`` included, so that ``True`` is never taken for 1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (np.integer, np.floating)):
        return float(value)
    if (
        isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
        and not value.is_complex()
    ):
        return float(value.item())
    return None


def as_integer(value) -> Optional[int]:
    """``value`` as a Python int when it is an integer (``int``, numpy integer,
    0-dim integer tensor); ``None`` otherwise (floats and ``bool`` included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value.item())
    return None


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
        """The configuration with its numbers as Python floats (numpy scalars
        and 0-dim tensors are numbers too); ``ValueError`` naming the parameter
        and the value as given when one is bad (``names`` maps a field to the
        name the user typed, e.g. ``{"log_end": "--log-end"}``)."""
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
        numbers = {}
        for field, ok, what in checks:
            value = getattr(self, field)
            number = as_real(value)
            if number is None or not ok(number):
                raise ValueError(f"{_name(names, field)} must be {what}, got {value!r}")
            numbers[field] = number
        return dataclasses.replace(self, **numbers)

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


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _log_bonus_scalar(p: float, log_end: float) -> float:
    if p <= log_end:
        return math.log(max(1.0 - p, CLAMP))
    return (p - log_end) / (log_end - 1.0) + math.log1p(-log_end)


def _bonus_parts(lp: torch.Tensor, cfg: BonusConfig, want_b: bool, want_g: bool, p=None, low=False):
    """``(b, g)`` of ``p = exp(lp)`` (``None`` for the one not wanted), sharing
    every common subexpression. The one place where the bonus formula is written.

    ``p``, when given, must be ``torch.exp(lp)`` (the caller's copy is reused).
    ``low``: the caller guarantees ``p <= 1/2`` wherever the result is used,
    so that ``log(1 - p) = log1p(-p)`` and ``1 - p`` are exact and the clamp
    is inactive (one log and one division instead of ``log1mexp``)."""
    b = g = None
    if cfg.kind == "power":
        e = torch.exp(cfg.gamma * lp)  # p ** gamma
        if want_b:
            b = -e
        if want_g:
            g = (-cfg.gamma) * e
        return b, g
    if p is None and (cfg.kind == "cosine" or cfg.log_end < 1.0):
        p = torch.exp(lp)
    if cfg.kind == "cosine":
        x = math.pi * p
        if want_b:
            b = torch.cos(x) - 1.0
        if want_g:
            g = -math.pi * torch.sin(x) * p
        return b, g
    le = cfg.log_end
    if low:
        if p is None:
            p = torch.exp(lp)
        one_m = 1.0 - p  # exact enough for p <= 1/2
        if want_b and _compiling():
            # log1p(-p) in Kahan's form log(u) * (-p) / (u - 1), u = 1 - p: as accurate, and
            # vectorised where torch.compile's CPU code calls a scalar log1p (about 10x slower)
            b = torch.where(one_m == 1.0, -p, torch.log(one_m) * (-p) / (one_m - 1.0))
        elif want_b:
            b = torch.log1p(-p)  # eager: one fast kernel
        if want_g:
            g = -p / one_m
    else:
        # log bonus: log(1 - p), clamped at CLAMP; clamping lp (not 1 - p) keeps the
        # unused gradient finite in the clamp region
        lpc = torch.clamp(lp, max=LP_MAX)
        l1m = log1mexp(lpc)
        if want_b:
            b = torch.clamp(l1m, min=LOG_CLAMP)
        if want_g:
            # -p / (1 - p), and 0 in the clamp region where b is constant (a conservative
            # bonus replaces the whole clamp region by its tangent below: no mask needed)
            g = -torch.exp(lpc - l1m)
            if not (le < 1.0 and math.log(le) <= LP_MAX):
                g = torch.where(lp > LP_MAX, 0.0, g)
    if le < 1.0:  # conservative: the tangent at p = LE above it
        below = lp <= math.log(le)
        if want_b:
            b = torch.where(below, b, (p - le) / (le - 1.0) + math.log1p(-le))
        if want_g:
            g = torch.where(below, g, p / (le - 1.0))
    if cfg.bonus_start > 0.0:  # aggressive: nothing below s, shifted to start at 0
        s = cfg.bonus_start
        above = lp >= math.log(s)
        if want_b:
            b = torch.where(above, b - _log_bonus_scalar(s, le), 0.0)
        if want_g:
            g = torch.where(above, g, 0.0)
    return b, g


def bonus_value(lp: torch.Tensor, cfg: BonusConfig) -> torch.Tensor:
    """``b(p)`` element-wise, from ``lp = log p`` (EL_SPEC 2.1), without ``rho``.

    Differentiable: autograd through it gives ``b'(p)``."""
    return _bonus_parts(lp, cfg, True, False)[0]


def bonus_grad(lp: torch.Tensor, cfg: BonusConfig) -> torch.Tensor:
    """``g(p) = b'(p) * p`` element-wise, from ``lp = log p`` (EL_SPEC 3),
    without ``rho``. With ``S = sum_k u_k g_k`` the gradient of
    ``sum_k u_k b(p_k)`` with respect to logit ``j`` is ``u_j g_j - p_j S``."""
    return _bonus_parts(lp, cfg, False, True)[1]


def bonus_value_and_grad(lp: torch.Tensor, cfg: BonusConfig, p: Optional[torch.Tensor] = None):
    """``(bonus_value(lp, cfg), bonus_grad(lp, cfg))`` at about the cost of one:
    the shared subexpressions (``exp(lp)``, ``log1mexp``, the branch masks) are
    computed once. ``p``, when given, must be ``torch.exp(lp)``; it is reused."""
    return _bonus_parts(lp, cfg, True, True, p)


def bonus_rows(lp: torch.Tensor, cfg: BonusConfig, want_b: bool = True, want_g: bool = True,
               p: Optional[torch.Tensor] = None, top_lp: Optional[torch.Tensor] = None):
    """``(b, g)`` (``None`` for the one not wanted) of whole rows of
    log-probabilities (classes on the last dimension), as
    :func:`bonus_value_and_grad` but cheaper for the log bonus: in a row only
    the maximum can have ``p > 1/2``, so every other element takes the exact
    low-``p`` form (``log1p(-p)``, ``-p / (1 - p)``) and each row's maximum the
    ``log1mexp`` form. ``top_lp``: each row's largest ``lp`` (``keepdim``),
    when the caller has it (``-log s`` after a log-sum-exp); ``p``: ``exp(lp)``."""
    if cfg.kind != "log":
        return _bonus_parts(lp, cfg, want_b, want_g, p)
    if top_lp is None:
        top_lp = lp.amax(-1, keepdim=True)
    b_top, g_top = _bonus_parts(top_lp, cfg, want_b, want_g)
    b, g = _bonus_parts(lp, cfg, want_b, want_g, p, low=True)
    top = lp == top_lp
    if want_b:
        b = torch.where(top, b_top, b)
    if want_g:
        g = torch.where(top, g_top, g)
    return b, g


def check_schedule(
    defer_start: int = 0,
    schedule: str = "none",
    max_epoch: int = 0,
    exp_rate: float = 5.0,
    names: Optional[Mapping[str, str]] = None,
):
    """Check the settings of :func:`bonus_rho_at`; return them normalised
    (``(defer_start, schedule, max_epoch, exp_rate)`` as int, str, int, float).

    ``ValueError`` names the parameter (``names`` maps ``defer_start``,
    ``schedule``, ``max_epoch``, ``exp_rate`` to what the user typed)."""
    d = as_integer(defer_start)
    if d is None or d < 0:
        raise ValueError(f"{_name(names, 'defer_start')} must be an integer >= 0, got {defer_start!r}")
    if schedule not in BONUS_SCHEDULES:
        raise ValueError(f"{_name(names, 'schedule')} must be one of {', '.join(BONUS_SCHEDULES)}, got {schedule!r}")
    m = as_integer(max_epoch) if max_epoch is not None else 0
    if m is None or m < 0:
        raise ValueError(f"{_name(names, 'max_epoch')} must be an integer >= 0, got {max_epoch!r}")
    if schedule != "none" and m <= 0:
        raise ValueError(
            f"{_name(names, 'schedule')} {schedule} ramps the bonus over epochs and needs "
            f"{_name(names, 'max_epoch')} > 0, got {max_epoch!r}"
        )
    r = as_real(exp_rate)
    if r is None or not (math.isfinite(r) and r > 0.0):
        raise ValueError(f"{_name(names, 'exp_rate')} must be a finite number > 0, got {exp_rate!r}")
    return d, str(schedule), m, r


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
    defer_start, schedule, max_epoch, exp_rate = check_schedule(defer_start, schedule, max_epoch, exp_rate)
    if epoch <= defer_start:
        return 0.0
    if schedule == "none":
        return rho
    t = min(max(epoch / max_epoch, 0.0), 1.0)
    if schedule == "linear":
        ramp = t
    elif schedule == "cosine":
        ramp = (math.cos(math.pi * (1.0 + t)) + 1.0) / 2.0
    else:
        ramp = math.exp((t - 1.0) * exp_rate)
    return rho * ramp
