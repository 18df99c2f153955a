"""Companion losses of the Encouraging Loss paper (Zhao et al., AAAI 2022,
appendix; EL_SPEC 2.5): the focal loss, the Halted Focal Loss (Eq. 12) and
MSE / MSE + sigmoid with the mirror bonus (Table 5).

Like :func:`encouraging_loss.encouraging_loss`, each loss takes logits and
class-index targets (``ignore_index`` entries count for nothing) or dense soft
targets (Mixup / CutMix), label smoothing, and ``reduction`` ``"none"``,
``"mean"`` (over the targets that count) or ``"sum"``.

Per example, with target weights ``w`` (one-hot ``y``; with label smoothing
``eps`` the smoothed distribution ``(1 - eps) y + eps / V``, as EL_SPEC 2.3;
soft targets ``q`` are smoothed the same way):

* focal / halted focal: ``sum_k w_k f(p_k)`` with ``f`` the focal term
  ``-(1 - p)**gamma log p`` or its halted form (:func:`focal_value`), ``p``
  the softmax. Without smoothing and with class indices that is ``f(p_y)``.
* MSE with the mirror bonus: the *mean over the V classes* of
  ``w_k (1 - u_k)**2 + (1 - w_k) u_k**2 - rho (w_k u_k**g + (1 - w_k) (1 - u_k)**g)``
  with ``u`` the softmax (or, for "MSE + sigmoid", the element-wise sigmoid)
  of the logits; the batch reduction then takes the mean (or sum) of these
  per-example values.

Everything is computed from ``log u`` and ``log(1 - u)`` (``-expm1`` /
``log1mexp`` of ``log_softmax``, ``logsigmoid`` of ``-z``), so well-classified
examples (``p`` near 1) keep accurate values and gradients. The mirror bonus
is the power bonus of :mod:`encouraging_loss.bonus` (``-x**g``) applied to
``u`` for the target and to ``1 - u`` for the other classes. float16 and
bfloat16 logits are computed in float32; the result is float32.

Per-class weights ``c`` (``weight=``, a buffer of the modules) have
``F.cross_entropy``'s meaning, as in :func:`encouraging_loss.encouraging_loss`:
focal / halted focal take ``sum_k c_k w_k f(p_k)`` (``c_y f(p_y)`` for plain
class indices); the MSE row is multiplied by ``sum_k c_k w_k`` (``c_y``); the
``"mean"`` reduction divides by the sum of ``c_y`` over the targets that count
(by the number of rows for soft targets), and the logged NLL is weighted the
same way.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import torch

from .bonus import BonusConfig, _name, as_real, bonus_value, log1mexp
from .checks import REDUCTIONS, check_choice, check_index, check_inputs, check_probability, check_weight
from .modules import CheckedLossSettings, weight_repr
from .reference import reduce_rows, row_count

__all__ = [
    "ACTIVATIONS",
    "CompanionParts",
    "FocalConfig",
    "FocalLoss",
    "HaltedFocalLoss",
    "MirrorMSEConfig",
    "MirrorMSELoss",
    "check_companion_settings",
    "companion_checked",
    "focal_loss",
    "focal_value",
    "halted_focal_loss",
    "mirror_mse_loss",
    "mirror_mse_terms",
]

#: output activations of the MSE loss: ``softmax`` (Table 5 "MSE") or the
#: element-wise ``sigmoid`` ("MSE + sigmoid").
ACTIVATIONS = ("softmax", "sigmoid")


class CompanionParts(NamedTuple):
    """The loss and the plain NLL, reduced like the loss.

    ``nll_loss`` is the unsmoothed ``-log p_y`` of the softmax of the logits
    (``sum_k q_k (-log p_k)`` for soft targets), whatever the loss, so that a
    run logs a comparable likelihood (fairseq's ``nll_loss`` / ``ppl``)."""

    loss: torch.Tensor
    nll_loss: torch.Tensor


def _number(value, key, ok, what, names):
    number = as_real(value)
    if number is None or not ok(number):
        raise ValueError(f"{_name(names, key)} must be {what}, got {value!r}")
    return number


@dataclass(frozen=True)
class FocalConfig:
    """The focal loss (``halt=None``) or the Halted Focal Loss (Eq. 12).

    Args:
        gamma: focusing exponent, a finite number ``>= 0`` (``0``: cross-entropy;
            2 as in Lin et al., 2017).
        halt: halting point ``h`` in ``(0, 1)``: above ``p = h`` the loss is the
            cross-entropy shifted to be continuous at ``h`` (the paper takes 0.5);
            ``None`` gives the plain focal loss.
    """

    gamma: float = 2.0
    halt: Optional[float] = None

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "FocalConfig":
        """The configuration with Python floats; ``ValueError`` naming the
        parameter (through ``names``) and the value as given when one is bad."""
        gamma = _number(self.gamma, "gamma", lambda v: math.isfinite(v) and v >= 0.0, "a finite number >= 0", names)
        halt = None
        if self.halt is not None:
            halt = _number(self.halt, "halt", lambda v: 0.0 < v < 1.0, "in (0, 1)", names)
        return dataclasses.replace(self, gamma=gamma, halt=halt)


@dataclass(frozen=True)
class MirrorMSEConfig:
    """MSE (softmax or sigmoid outputs) with the mirror bonus (Table 5).

    Args:
        activation: ``"softmax"`` or ``"sigmoid"`` ("MSE + sigmoid").
        mirror_rho: weight ``rho`` of the mirror bonus, a finite number ``>= 0``
            (``0``: plain MSE).
        mirror_gamma: exponent ``g`` of the mirror bonus, a finite number ``> 0``
            (2 in the paper).
    """

    activation: str = "softmax"
    mirror_rho: float = 1.0
    mirror_gamma: float = 2.0

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "MirrorMSEConfig":
        """The configuration with Python floats; ``ValueError`` naming the
        parameter (through ``names``) and the value as given when one is bad."""
        check_choice(self.activation, ACTIVATIONS, "activation", names)
        rho = _number(self.mirror_rho, "mirror_rho", lambda v: math.isfinite(v) and v >= 0.0,
                      "a finite number >= 0", names)
        gamma = _number(self.mirror_gamma, "mirror_gamma", lambda v: math.isfinite(v) and v > 0.0,
                        "a finite number > 0", names)
        return dataclasses.replace(self, mirror_rho=rho, mirror_gamma=gamma)


def _pow(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x ** gamma`` for ``x >= 0`` whose gradient is finite (0) at ``x = 0``."""
    if gamma == 0.0:
        return torch.ones_like(x)
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)) ** gamma, torch.zeros_like(x))


def focal_value(lp: torch.Tensor, gamma: float = 2.0, halt: Optional[float] = None) -> torch.Tensor:
    """The focal term element-wise, from ``lp = log p``: ``-(1 - p)**gamma log p``
    (Lin et al., 2017), or with ``halt = h`` the Halted Focal Loss of Eq. 12
    (Zhao et al., AAAI 2022, appendix; EL_SPEC 2.5)::

        -(1 - p)**gamma log p                      p <  h
        -log p + log h - (1 - h)**gamma log h      p >= h   (the CE, shifted)

    which is continuous at ``p = h``. ``1 - p`` is ``-expm1(lp)``: accurate near
    ``p = 1``. Differentiable; the arguments are not checked (see :class:`FocalConfig`)."""
    if halt is None:
        return -_pow(-torch.expm1(lp), gamma) * lp
    lh = math.log(halt)
    lpf = torch.clamp(lp, max=lh)  # the focal branch only ever sees p <= h
    focal = -_pow(-torch.expm1(lpf), gamma) * lpf
    shifted = -lp + (lh - (1.0 - halt) ** gamma * lh)
    return torch.where(lp < lh, focal, shifted)


def _log_u(x: torch.Tensor, activation: str, lp: torch.Tensor):
    """``(log u, log(1 - u))`` of the softmax or sigmoid outputs ``u`` of logits ``x``
    (``lp``: their ``log_softmax``)."""
    if activation == "sigmoid":
        return torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    lu = lp
    # 1 - u >= the smallest normal number: log(1 - u) finite (and its gradient) even where u rounds to 1
    return lu, log1mexp(torch.clamp(lu, max=-torch.finfo(lu.dtype).tiny))


def mirror_mse_terms(lu: torch.Tensor, l1mu: torch.Tensor, y: torch.Tensor, mirror_gamma: float = 2.0):
    """The two element-wise terms of Table 5 (Zhao et al., AAAI 2022; EL_SPEC 2.5)
    from ``lu = log u``, ``l1mu = log(1 - u)`` and target weights ``y``:
    ``(y (1 - u)**2 + (1 - y) u**2,  -(y u**g + (1 - y) (1 - u)**g))``, the squared
    error and the (unweighted) mirror bonus. The mirror bonus is the power bonus
    ``b(x) = -x**g`` of :mod:`encouraging_loss.bonus` of ``u`` (target) and ``1 - u``
    (other classes). Not reduced; the loss is ``mean_k(mse + rho * mirror)``."""
    mse = y * torch.exp(2.0 * l1mu) + (1.0 - y) * torch.exp(2.0 * lu)
    power = BonusConfig(kind="power", gamma=mirror_gamma)
    mirror = y * bonus_value(lu, power) + (1.0 - y) * bonus_value(l1mu, power)
    return mse, mirror


def _targets(lp, target, ignore_index, soft):
    """``(q, valid, t)``: soft targets as a distribution ``q`` (``t`` None), or
    class indices ``t`` with their mask (``q`` None)."""
    if soft:
        return target.to(lp.dtype), None, None
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    return None, valid, t


def _weights(lp, q, t, eps):
    """The (smoothed) target distribution, ``(..., V)``."""
    V = lp.shape[-1]
    w = q if q is not None else torch.nn.functional.one_hot(t, V).to(lp.dtype)
    return w if eps == 0 else (1.0 - eps) * w + eps / V


def _rows(logits, target, cfg, eps, ignore_index, soft, weight=None):
    """Per-row ``(loss, nll, valid)``; ``weight``: per-class weights or None."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(x, dim=-1)
    q, valid, t = _targets(lp, target, ignore_index, soft)
    c = None if weight is None else weight.to(lp.dtype)
    if q is not None:
        nll = -(q * lp).sum(-1) if c is None else -(q * c * lp).sum(-1)
    else:
        lp_y = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = -lp_y if c is None else -c[t] * lp_y
    if isinstance(cfg, FocalConfig):
        if q is None and eps == 0:  # only the target's term: no N x V temporaries
            loss = focal_value(lp_y, cfg.gamma, cfg.halt)
            if c is not None:
                loss = c[t] * loss
        else:
            w = _weights(lp, q, t, eps)
            loss = ((w if c is None else w * c) * focal_value(lp, cfg.gamma, cfg.halt)).sum(-1)
    else:
        lu, l1mu = _log_u(x, cfg.activation, lp)
        y = _weights(lp, q, t, eps)
        mse, mirror = mirror_mse_terms(lu, l1mu, y, cfg.mirror_gamma)
        per_class = mse if cfg.mirror_rho == 0 else mse + cfg.mirror_rho * mirror
        loss = per_class.mean(-1)
        if c is not None:  # the row's class weight: c_y, or sum_k c_k y_k for smoothed / soft targets
            loss = loss * (y * c).sum(-1)
    if valid is not None:
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss, nll = torch.where(valid, loss, zero), torch.where(valid, nll, zero)
    return loss, nll, valid


def check_companion_settings(cfg, smoothing, ignore_index, reduction, names=None):
    """Validate every setting of a companion loss at once, naming the parameter
    as the caller spelled it (``names``). ``cfg`` is a :class:`FocalConfig` or a
    :class:`MirrorMSEConfig`. Returns ``(cfg, smoothing, ignore_index)``
    normalised to Python numbers; ``ValueError`` on the first bad one."""
    if not isinstance(cfg, (FocalConfig, MirrorMSEConfig)):
        raise ValueError(f"cfg must be a FocalConfig or a MirrorMSEConfig, got {type(cfg).__name__}")
    cfg = cfg.validate(names)
    eps = check_probability(smoothing, "smoothing", names)
    ignore_index = check_index(ignore_index, "ignore_index", names)
    check_choice(reduction, REDUCTIONS, "reduction", names)
    return cfg, eps, ignore_index


def companion_checked(logits, target, cfg, smoothing, ignore_index, reduction, return_parts=False, names=None,
                      weight=None):
    """A companion loss with settings already checked by :func:`check_companion_settings`
    (what the modules and the plugins call on every step; the tensors are still
    checked): the focal / halted focal loss (Eq. 12) for a :class:`FocalConfig`,
    MSE with the mirror bonus (Table 5) for a :class:`MirrorMSEConfig`;
    ``weight``: per-class weights (see the module doc) or None."""
    soft = check_inputs(logits, target, ignore_index, names)
    if weight is not None:
        check_weight(weight, logits, names)
        loss, nll, valid = _rows(logits, target, cfg, smoothing, ignore_index, soft, weight)
        count = row_count(loss, valid, target, weight)
        out = CompanionParts(reduce_rows(loss, reduction, count), reduce_rows(nll, reduction, count))
        return out if return_parts else out.loss
    loss, nll, valid = _rows(logits, target, cfg, smoothing, ignore_index, soft)
    # mean over the targets that count; all ignored gives 0, not NaN
    count = max(loss.numel(), 1) if valid is None else valid.sum().clamp(min=1)
    out = CompanionParts(reduce_rows(loss, reduction, count), reduce_rows(nll, reduction, count))
    return out if return_parts else out.loss


_COMMON_DOC = """
        smoothing: label smoothing ``eps`` in ``[0, 1)``: the loss is taken
            against ``(1 - eps) y + eps / V`` (EL_SPEC 2.3; soft targets too).
        ignore_index: class-index target that counts for nothing.
        reduction: ``"none"``, ``"mean"`` (over non-ignored targets; over rows
            for soft targets) or ``"sum"``.
        return_parts: also return the plain NLL, as :class:`CompanionParts`.
        names: display names of the parameters in error messages, e.g.
            ``{"gamma": "--focal-gamma"}``.
        weight: per-class weights (1-D, ``V`` finite values ``>= 0``, on the
            logits' device) or None, with ``F.cross_entropy``'s meaning (see
            the module doc); ``"mean"`` then divides by the sum of ``c_y``.
"""


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
    names: Optional[Mapping[str, str]] = None,
    weight: Optional[torch.Tensor] = None,
):
    """Focal loss ``-(1 - p_y)**gamma log p_y`` (Lin et al., 2017), the loss the
    Halted Focal Loss (Eq. 12, Zhao et al., AAAI 2022) starts from.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        target: class indices of shape ``logits.shape[:-1]``, or a dense
            distribution ``(..., V)``: then ``sum_k q_k f(p_k)``.
        gamma: focusing exponent ``>= 0``; 0 gives cross-entropy.
    """
    cfg = FocalConfig(gamma=gamma)
    return companion_checked(
        logits, target, *check_companion_settings(cfg, smoothing, ignore_index, reduction, names),
        reduction, return_parts, names, weight,
    )


def halted_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    halt: float = 0.5,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
    names: Optional[Mapping[str, str]] = None,
    weight: Optional[torch.Tensor] = None,
):
    """Halted Focal Loss, Eq. 12 of Zhao et al., AAAI 2022 (EL_SPEC 2.5): the focal
    loss ``-(1 - p)**gamma log p`` below ``p = halt`` and above it the
    cross-entropy shifted to stay continuous, ``-log p + log h - (1 - h)**gamma log h``,
    so that well-classified examples keep CE's gradient instead of focal's vanishing one.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        target: class indices of shape ``logits.shape[:-1]``, or a dense
            distribution ``(..., V)``: then ``sum_k q_k f(p_k)``.
        gamma: focusing exponent ``>= 0``.
        halt: halting point ``h`` in ``(0, 1)``; the paper takes 0.5.
    """
    if halt is None:
        raise ValueError(f"{_name(names, 'halt')} must be in (0, 1), got None")
    cfg = FocalConfig(gamma=gamma, halt=halt)
    return companion_checked(
        logits, target, *check_companion_settings(cfg, smoothing, ignore_index, reduction, names),
        reduction, return_parts, names, weight,
    )


def mirror_mse_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    mirror_rho: float = 1.0,
    mirror_gamma: float = 2.0,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
    names: Optional[Mapping[str, str]] = None,
    weight: Optional[torch.Tensor] = None,
):
    """MSE with the mirror bonus, Table 5 of Zhao et al., AAAI 2022 (EL_SPEC 2.5).

    Per example, the mean over the ``V`` classes of
    ``y (1 - u)**2 + (1 - y) u**2 - rho (y u**g + (1 - y) (1 - u)**g)`` with
    ``y`` the one-hot (smoothed, or soft) target and ``u = softmax(z)``, or
    ``u = sigmoid(z)`` element-wise for "MSE + sigmoid"; then the batch
    reduction. ``mirror_rho=0`` gives the plain MSE rows of Table 5.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        target: class indices of shape ``logits.shape[:-1]``, or a dense
            distribution ``(..., V)`` used as ``y``.
        activation: ``"softmax"`` or ``"sigmoid"``.
        mirror_rho: weight of the mirror bonus, ``>= 0``.
        mirror_gamma: exponent ``g`` of the mirror bonus, ``> 0``.
    """
    cfg = MirrorMSEConfig(activation=activation, mirror_rho=mirror_rho, mirror_gamma=mirror_gamma)
    return companion_checked(
        logits, target, *check_companion_settings(cfg, smoothing, ignore_index, reduction, names),
        reduction, return_parts, names, weight,
    )


for _f in (focal_loss, halted_focal_loss, mirror_mse_loss):
    _f.__doc__ = _f.__doc__.rstrip() + "\n" + _COMMON_DOC.lstrip("\n") + """
    Returns:
        The loss (float32 for half-precision logits), or :class:`CompanionParts`
        when ``return_parts``.
    """
del _f


# ----------------------------------------------------------------------------- modules


def _cfg_field(field: str, doc: str):
    """A property for one field of the module's config; setting it re-validates."""

    def get(self):
        return getattr(self._cfg, field)

    def set_(self, value):
        self._cfg = dataclasses.replace(self._cfg, **{field: value}).validate(self.names)

    return property(get, set_, doc=doc)


class _CompanionLoss(CheckedLossSettings):
    """Shared settings of the companion loss modules: each assignment is checked
    like the constructor's arguments, naming the parameter."""

    def __init__(self, cfg, smoothing, ignore_index, reduction, names, weight=None):
        super().__init__()
        self.names = dict(names or {})
        self._cfg, self._smoothing, self._ignore_index = check_companion_settings(
            cfg, smoothing, ignore_index, reduction, self.names)
        self._reduction = reduction
        self._init_weight(weight)

    @property
    def cfg(self):
        """The loss's configuration (validated)."""
        return self._cfg

    def forward(self, logits: torch.Tensor, target: torch.Tensor, return_parts: bool = False):
        """The loss of ``logits`` against class indices or soft targets
        (:class:`CompanionParts` with the plain NLL when ``return_parts``)."""
        return companion_checked(logits, target, self._cfg, self._smoothing, self._ignore_index,
                                 self._reduction, return_parts, self.names, self.weight)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self._cfg).items() if v is not None)
        return f"{fields}, smoothing={self.smoothing}, reduction={self.reduction!r}{weight_repr(self.weight)}"


class FocalLoss(_CompanionLoss):
    """Focal loss ``-(1 - p_y)**gamma log p_y`` (Lin et al., 2017); see :func:`focal_loss`.

    Args: ``gamma`` (``>= 0``, default 2), ``smoothing``, ``ignore_index``,
    ``reduction``, ``names``, ``weight`` (per-class weights, a buffer). Every
    setting is an attribute whose assignment is checked.
    """

    def __init__(self, gamma: float = 2.0, smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", names: Optional[Mapping[str, str]] = None,
                 weight: Optional[torch.Tensor] = None):
        super().__init__(FocalConfig(gamma=gamma), smoothing, ignore_index, reduction, names, weight)

    gamma = _cfg_field("gamma", "Focusing exponent, >= 0.")


class HaltedFocalLoss(_CompanionLoss):
    """Halted Focal Loss, Eq. 12 of Zhao et al., AAAI 2022: focal below ``p = halt``,
    the continuous shifted cross-entropy above; see :func:`halted_focal_loss`.

    Args: ``gamma`` (``>= 0``, default 2), ``halt`` (in ``(0, 1)``, default 0.5),
    ``smoothing``, ``ignore_index``, ``reduction``, ``names``, ``weight``
    (per-class weights, a buffer). Every setting is an attribute whose
    assignment is checked.
    """

    def __init__(self, gamma: float = 2.0, halt: float = 0.5, smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", names: Optional[Mapping[str, str]] = None,
                 weight: Optional[torch.Tensor] = None):
        if halt is None:
            raise ValueError(f"{_name(names, 'halt')} must be in (0, 1), got None")
        super().__init__(FocalConfig(gamma=gamma, halt=halt), smoothing, ignore_index, reduction, names, weight)

    gamma = _cfg_field("gamma", "Focusing exponent, >= 0.")

    @property
    def halt(self) -> float:
        """Halting point, in (0, 1)."""
        return self._cfg.halt

    @halt.setter
    def halt(self, value) -> None:
        if value is None:
            raise ValueError(f"{_name(self.names, 'halt')} must be in (0, 1), got None")
        self._cfg = dataclasses.replace(self._cfg, halt=value).validate(self.names)


class MirrorMSELoss(_CompanionLoss):
    """MSE (softmax, or sigmoid outputs) with the mirror bonus, Table 5 of Zhao et
    al., AAAI 2022; see :func:`mirror_mse_loss`.

    Args: ``activation`` (``"softmax"`` / ``"sigmoid"``), ``mirror_rho`` (``>= 0``,
    default 1; 0 is plain MSE), ``mirror_gamma`` (``> 0``, default 2), ``smoothing``,
    ``ignore_index``, ``reduction``, ``names``, ``weight`` (per-class weights, a
    buffer). Every setting is an attribute whose assignment is checked.
    """

    def __init__(self, activation: str = "softmax", mirror_rho: float = 1.0, mirror_gamma: float = 2.0,
                 smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 names: Optional[Mapping[str, str]] = None, weight: Optional[torch.Tensor] = None):
        cfg = MirrorMSEConfig(activation=activation, mirror_rho=mirror_rho, mirror_gamma=mirror_gamma)
        super().__init__(cfg, smoothing, ignore_index, reduction, names, weight)

    activation = _cfg_field("activation", "Output activation: softmax or sigmoid.")
    mirror_rho = _cfg_field("mirror_rho", "Weight of the mirror bonus, >= 0.")
    mirror_gamma = _cfg_field("mirror_gamma", "Exponent of the mirror bonus, > 0.")
