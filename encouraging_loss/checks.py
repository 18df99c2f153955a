"""The checks of the loss's settings and inputs, shared by every entry point
(:func:`encouraging_loss.encouraging_loss`, the module, the fused projection, the
companion losses and the plugins): each bad value is refused where it enters,
named as the caller spelled it. Class indices on CUDA are checked on the device
and reported on a later call (:func:`check_targets`), so the check never
stalls the GPU.
"""
import collections
import os
import weakref
from typing import Mapping, Optional

import torch

from .bonus import BonusConfig, _name, as_integer, as_real

__all__ = [
    "CORE_NAMES",
    "DEFAULT_IMPL",
    "IMPLS",
    "PENDING",
    "REDUCTIONS",
    "check_choice",
    "check_index",
    "check_inputs",
    "check_probability",
    "check_settings",
    "check_target_range",
    "check_targets",
    "check_weight",
    "check_weight_values",
    "deferred_check",
    "param_names",
    "under_transform",
]

REDUCTIONS = ("none", "mean", "sum")
#: ``fused``: loss and closed-form gradient in one pass, no N x V temporaries
#: (:mod:`encouraging_loss.ops.fused`; a Triton kernel on CUDA). ``reference``: the
#: formula written with torch ops and differentiated by autograd, kept as the
#: reference the fused implementation is tested against.
IMPLS = ("fused", "reference")
DEFAULT_IMPL = "fused"

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


def _weight_meta(weight, key: str) -> None:
    """What can be checked of per-class weights without reading their values."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{key} must be None or a 1-D floating-point tensor of per-class weights, "
                         f"got {type(weight).__name__}")
    if weight.dim() != 1:
        raise ValueError(f"{key} must be a 1-D tensor of per-class weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{key} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{key} must not require grad (the loss is not differentiated with respect to the "
                         "class weights, as in F.cross_entropy): pass weight.detach()")


def _weight_finite(weight, key: str) -> None:
    """Finite values >= 0: read once per tensor and in-place version (a synchronisation on CUDA)."""
    if under_transform(weight) or _WEIGHTS_SEEN.seen(weight):
        return
    bad = ~torch.isfinite(weight) | (weight < 0)
    if bool(bad.any()):
        k = int(bad.to(torch.int8).argmax())
        raise ValueError(f"{key} must hold finite values >= 0, got {float(weight[k])} for class {k}")
    if weight.device.type != "cpu":  # a check on CPU costs nothing worth remembering
        _WEIGHTS_SEEN.add(weight)


def check_weight_values(weight, names: Optional[Mapping[str, str]] = None):
    """The checks of per-class weights that need no logits: ``None``, or a 1-D
    floating-point tensor of finite values ``>= 0`` that does not require grad
    (as ``F.cross_entropy``, the loss is not differentiated with respect to
    the weights). Returns ``weight``; ``ValueError`` naming ``weight`` (or
    ``names["weight"]``) otherwise. What a module checks on assignment."""
    if weight is None:
        return None
    key = _name(names, "weight")
    _weight_meta(weight, key)
    if weight.device.type != "meta":
        _weight_finite(weight, key)
    return weight


def check_weight(weight, logits, names: Optional[Mapping[str, str]] = None):
    """Per-class weights of the loss, with ``F.cross_entropy``'s meaning:
    ``None``, or a 1-D floating-point tensor of ``V`` (the logits' last
    dimension) finite values ``>= 0`` on the logits' device. Returns
    ``weight``; ``ValueError`` naming ``weight`` (or ``names["weight"]``).

    The values are read (a synchronisation on CUDA) once per tensor and
    in-place version: a weight set once and used on every step costs one
    read, not one per step."""
    if weight is None:
        return None
    key = _name(names, "weight")
    _weight_meta(weight, key)
    V = logits.shape[-1]
    if weight.shape[0] != V:
        raise ValueError(f"{key} must hold one weight per class, {V} (the logits' last dimension), "
                         f"got {weight.shape[0]}")
    if weight.device != logits.device:
        raise ValueError(f"{key} must be on the logits' device {logits.device}, got {weight.device}")
    _weight_finite(weight, key)
    return weight


class _SeenWeights:
    """Weight tensors whose values were checked, by identity and in-place
    version (an in-place change, ``w.mul_(2)``, is checked again); a few
    recent ones, held weakly."""

    def __init__(self, size=8):
        self._seen = collections.OrderedDict()
        self._size = size

    def seen(self, weight) -> bool:
        hit = self._seen.get(id(weight))
        return hit is not None and hit[0]() is weight and hit[1] == weight._version

    def add(self, weight) -> None:
        try:
            self._seen[id(weight)] = (weakref.ref(weight), weight._version)
        except TypeError:  # a tensor subclass that refuses weak references: checked every time
            return
        self._seen.move_to_end(id(weight))
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)


_WEIGHTS_SEEN = _SeenWeights()


def check_inputs(logits, target, ignore_index, names, deferred=False) -> bool:
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
        raise ValueError(f"{_name(names, 'target')} must hold class indices (an integer tensor), "
                         f"got dtype {target.dtype}")
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
        PENDING.submit(bad, target, V, ignore_index, name)
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


PENDING = _PendingChecks()


def check_targets() -> None:
    """Wait for the class-index checks still in flight (CUDA) and raise the
    ``ValueError`` of the first bad target. The loss reports them itself on
    its next call; call this at the end of a run, or before reading results,
    to be sure none is left (it synchronises with the GPU)."""
    PENDING.poll(wait=True)


def _check_mode() -> str:
    mode = os.environ.get("EL_CHECK_TARGETS", "").strip().lower() or "auto"
    if mode not in ("auto", "sync", "deferred"):
        raise ValueError(f"EL_CHECK_TARGETS must be auto, sync or deferred, got {mode!r}")
    return mode


def deferred_check(logits, backend) -> bool:
    """Whether class indices are checked on the device and reported later (no
    stall): tensors going through the Triton kernel (``backend``), which reads
    no bad index (NaN loss, zero gradient for such a row), on CUDA (anywhere
    with ``EL_CHECK_TARGETS=deferred``); everywhere else the check is
    immediate (free on CPU, and needed before a gather on the device)."""
    if backend != "triton":
        return False
    mode = _check_mode()
    return mode == "deferred" or (mode == "auto" and logits.is_cuda)



def under_transform(*tensors) -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) wraps any of ``tensors``."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in tensors)
