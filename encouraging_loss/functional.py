"""Encouraging Loss, functional form.

``EL = -log p_y + rho * b(p_y)`` (Zhao et al., AAAI 2022, Eq. 6), with label
smoothing applied to both terms (EL_SPEC 2.3) and soft targets for Mixup /
CutMix (EL_SPEC 2.4). The bonus ``b`` is defined in :mod:`encouraging_loss.bonus`.
"""
import collections
import os
from typing import Mapping, NamedTuple, Optional

import torch

from .bonus import BonusConfig, _name, as_integer, as_real, bonus_value
from .fused import fused_el_rows, select_backend, under_transform

__all__ = [
    "ELParts",
    "encouraging_loss",
    "check_choice",
    "check_index",
    "check_probability",
    "check_settings",
    "check_target_range",
    "check_targets",
    "el_checked",
    "reference_rows",
    "param_names",
    "REDUCTIONS",
    "IMPLS",
    "DEFAULT_IMPL",
    "CORE_NAMES",
]

REDUCTIONS = ("none", "mean", "sum")
#: ``fused``: loss and closed-form gradient in one pass, no N x V temporaries
#: (:mod:`encouraging_loss.fused`; a Triton kernel on CUDA). ``reference``: the
#: formula written with torch ops and differentiated by autograd, kept as the
#: reference the fused implementation is tested against.
IMPLS = ("fused", "reference")
DEFAULT_IMPL = "fused"


class ELParts(NamedTuple):
    """The loss and the two terms worth logging, reduced like the loss.

    ``loss = smoothed NLL + bonus``; ``nll_loss`` is the plain, unsmoothed
    ``-log p_y`` (``sum_k q_k (-log p_k)`` for soft targets), as fairseq logs
    it; ``bonus`` is ``rho`` times the (smoothed) bonus term, ``<= 0``.
    """

    loss: torch.Tensor
    nll_loss: torch.Tensor
    bonus: torch.Tensor


#: how the public API spells the :class:`~encouraging_loss.bonus.BonusConfig`
#: fields in error messages (``encouraging_loss(bonus=..., bonus_gamma=..., bonus_rho=...)``).
CORE_NAMES = {"kind": "bonus", "gamma": "bonus_gamma", "rho": "bonus_rho"}


def param_names(names: Optional[Mapping[str, str]] = None) -> dict:
    """The display names of the parameters: :data:`CORE_NAMES` overridden by ``names``."""
    return {**CORE_NAMES, **(names or {})}


def check_choice(value, choices, key: str, names: Optional[Mapping[str, str]] = None):
    """``value`` must be one of ``choices`` (a reduction, an implementation)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{_name(names, key)} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_probability(value, key: str, names: Optional[Mapping[str, str]] = None, allow_none=False):
    """``value`` must be a real number in ``[0, 1)`` (a smoothing value); returns
    it as a float (``None`` stays ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    number = as_real(value)
    if number is None or not 0.0 <= number < 1.0:
        raise ValueError(f"{_name(names, key)} must be in [0, 1), got {value!r}")
    return number


def check_index(value, key: str, names: Optional[Mapping[str, str]] = None) -> int:
    """``value`` must be an integer (a class index such as ``ignore_index``); returns it as an int."""
    number = as_integer(value)
    if number is None:
        raise ValueError(f"{_name(names, key)} must be an integer, got {value!r}")
    return number


def check_settings(cfg, smoothing, bonus_smoothing, ignore_index, reduction, impl, names=None):
    """Validate every setting of the loss at once, naming the parameter as the
    caller spelled it (``names``, over :data:`CORE_NAMES`). Returns
    ``(cfg, smoothing, bonus_smoothing, ignore_index)`` normalised to Python
    numbers; ``ValueError`` on the first bad one."""
    names = param_names(names)
    if not isinstance(cfg, BonusConfig):
        raise ValueError(f"cfg must be a BonusConfig, got {type(cfg).__name__}")
    cfg = cfg.validate(names)
    eps = check_probability(smoothing, "smoothing", names)
    eps_b = check_probability(bonus_smoothing, "bonus_smoothing", names, allow_none=True)
    ignore_index = check_index(ignore_index, "ignore_index", names)
    check_choice(reduction, REDUCTIONS, "reduction", names)
    check_choice(impl, IMPLS, "impl", names)
    return cfg, eps, eps_b, ignore_index


def _check_inputs(logits, target, ignore_index, names, deferred=False) -> bool:
    """Validate tensors; return True for soft (dense) targets. ``deferred``:
    the class-index range check runs on the device and is reported later
    (:class:`_PendingChecks`)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(
            f"logits and {_name(names, 'target')} must be tensors, got "
            f"{type(logits).__name__} and {type(target).__name__}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    V = logits.shape[-1]
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft {_name(names, 'target')} must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"{_name(names, 'target')} must hold class indices (an integer tensor), got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"{_name(names, 'target')} of class indices must have shape {tuple(logits.shape[:-1])} "
            f"(the logits' shape without the class dimension), got {tuple(target.shape)}"
        )
    if under_transform(target):  # vmap: no data-dependent check possible (gather still refuses)
        return False
    check_target_range(target, V, ignore_index, _name(names, "target"), deferred)
    return False


def check_target_range(target, V: int, ignore_index: int, name: str, deferred: bool) -> None:
    """Class indices must be in ``[0, V)`` or ``ignore_index``: ``ValueError``
    naming the first bad one, at once, or (``deferred``) from a later call
    without stalling the device (:class:`_PendingChecks`)."""
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if deferred:
        _PENDING.submit(bad, target, V, ignore_index, name)
    elif bool(bad.any()):
        raise ValueError(_bad_target_message(name, int(target[bad].flatten()[0]), V, ignore_index))


def _bad_target_message(name, value, V, ignore_index, later=False) -> str:
    msg = f"{name} holds class index {value}, outside [0, {V}) and not ignore_index ({ignore_index})"
    if later:
        msg += (
            " (found by the check of an earlier call: on CUDA class indices are checked on the device "
            "and reported on the next call, so that the check never stalls the GPU; that call's loss "
            "was NaN and its gradient zero for the row. EL_CHECK_TARGETS=sync checks at once)"
        )
    return msg


class _PendingChecks:
    """Target range checks computed on the device and read back without a
    synchronisation: the verdict (any bad index, the first one) is copied to
    pinned host memory asynchronously behind an event; each later call looks
    at the finished ones (``Event.query``, no wait) and raises for a bad one.
    :func:`check_targets` waits for all of them."""

    def __init__(self):
        self._queue = collections.deque()

    def submit(self, bad, target, V, ignore_index, name):
        flat = bad.reshape(-1)
        first = flat.to(torch.int32).argmax().view(1)
        value = torch.gather(target.reshape(-1), 0, first).to(torch.int64)
        info = torch.cat([flat.any().view(1).to(torch.int64), value])
        if info.is_cuda:
            host = torch.empty(2, dtype=torch.int64, pin_memory=True)
            host.copy_(info, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = info, None
        self._queue.append((host, event, V, ignore_index, name))

    def poll(self, wait=False):
        while self._queue:
            host, event, V, ignore_index, name = self._queue[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._queue.popleft()
            if int(host[0]):
                self._queue.clear()
                raise ValueError(_bad_target_message(name, int(host[1]), V, ignore_index, later=True))


_PENDING = _PendingChecks()


def check_targets() -> None:
    """Wait for the class-index checks still in flight (CUDA) and raise the
    ``ValueError`` of the first bad target. The loss reports them itself on
    its next call; call this at the end of a run, or before reading results,
    to be sure none is left (it synchronises with the GPU)."""
    _PENDING.poll(wait=True)


def _check_mode() -> str:
    mode = os.environ.get("EL_CHECK_TARGETS", "").strip().lower() or "auto"
    if mode not in ("auto", "sync", "deferred"):
        raise ValueError(f"EL_CHECK_TARGETS must be auto, sync or deferred, got {mode!r}")
    return mode


def _deferred_check(logits, backend) -> bool:
    """Whether class indices are checked on the device and reported later (no
    stall): tensors going through the Triton kernel (``backend``), which reads
    no bad index (NaN loss, zero gradient for such a row), on CUDA (anywhere
    with ``EL_CHECK_TARGETS=deferred``); everywhere else the check is
    immediate (free on CPU, and needed before a gather on the device)."""
    if backend != "triton":
        return False
    mode = _check_mode()
    return mode == "deferred" or (mode == "auto" and logits.is_cuda)


def _reduce(x: torch.Tensor, reduction: str, count) -> torch.Tensor:
    if reduction == "none":
        return x
    total = x.sum()
    if reduction == "sum":
        return total
    return total / count


def reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft):
    """Per-row ``(loss, nll, bonus, valid)`` written as formulas under autograd
    (EL_SPEC 2.3 and 2.4): the reference the fused implementation is tested
    against, and what it falls back to under ``torch.func`` transforms."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(x, dim=-1)
    V = lp.shape[-1]
    need_bonus = not cfg.is_zero
    if soft:
        q = target.to(lp.dtype)
        nll = -(q * lp).sum(-1)
        w = q if eps == 0 else (1.0 - eps) * q + eps / V
        smoothed = nll if eps == 0 else -(w * lp).sum(-1)
        if need_bonus:
            u = q if eps_b == 0 else (1.0 - eps_b) * q + eps_b / V
            bonus = (u * bonus_value(lp, cfg)).sum(-1)
        valid = None
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, torch.zeros_like(target)).long()
        lp_y = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = -lp_y
        smoothed = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * lp.sum(-1)
        if need_bonus:
            bonus = bonus_value(lp_y, cfg)
            if eps_b > 0:
                bonus = (1.0 - eps_b) * bonus + (eps_b / V) * bonus_value(lp, cfg).sum(-1)
    if need_bonus:
        bonus = cfg.rho * bonus
    else:
        bonus = torch.zeros_like(nll)
    loss = smoothed + bonus
    if valid is not None:
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
    return loss, nll, bonus, valid


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
            no ``N x V`` temporaries; see :mod:`encouraging_loss.fused` for its
            Triton / torch.compile / eager back ends) or ``"reference"`` (the
            plain formula under autograd).
        names: display names for parameters in error messages, e.g.
            ``{"log_end": "--log-end"}``.
        inplace_backward: with ``impl="fused"`` on CUDA (Triton), the
            backward pass writes the logits' gradient into the logits' own
            storage: no extra memory, but the logits hold the gradient
            afterwards (an error is raised if autograd still needs them).
            Ignored by the CPU back ends.

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
        reduction, return_parts, impl, names, inplace_backward,
    )


def el_checked(logits, target, cfg, smoothing, bonus_smoothing, ignore_index, reduction, return_parts, impl, names=None,
               inplace_backward=False):
    """:func:`encouraging_loss` with settings already checked by :func:`check_settings`
    (what the module and the plugins call on every step; the tensors are still checked).

    ``cfg`` is a validated :class:`~encouraging_loss.bonus.BonusConfig`,
    ``smoothing`` / ``bonus_smoothing`` floats (``bonus_smoothing`` may be
    ``None``: same as ``smoothing``), ``ignore_index`` an int."""
    _PENDING.poll()  # a bad target found on the device by an earlier call (CUDA): no wait
    backend = select_backend(logits) if impl == "fused" and isinstance(logits, torch.Tensor) else None
    soft = _check_inputs(logits, target, ignore_index, param_names(names), _deferred_check(logits, backend))
    eps = smoothing
    eps_b = eps if bonus_smoothing is None else bonus_smoothing
    if impl == "fused":
        loss, nll, bonus, valid = fused_el_rows(logits, target, cfg, eps, eps_b, ignore_index, soft,
                                                inplace_backward=inplace_backward, backend=backend)
    else:
        loss, nll, bonus, valid = reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft)
    # mean over the targets that count; all ignored gives 0, not NaN
    count = max(loss.numel(), 1) if valid is None else valid.sum().clamp(min=1)
    out = ELParts(*(_reduce(v, reduction, count) for v in (loss, nll, bonus)))
    return out if return_parts else out.loss
