""" Encouraging Loss in timm's classification loss factory

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022.

:func:`install` adds ``'encouraging'`` to ``timm.loss.LOSS_TYPES`` and wraps
``timm.loss.create_classification_loss`` so that
``create_classification_loss(loss_type='encouraging', ...)`` returns
:class:`~timm_el.EncouragingLabelSmoothingLoss` (class-index targets) or
:class:`~timm_el.EncouragingSoftTargetLoss` (``soft_targets=True``, Mixup /
CutMix). Every other loss type goes to timm's own factory, unchanged.

timm holds references to these names in several modules
(``timm.loss``, ``timm.loss._loss_factory``, ``timm.task``,
``timm.task.classification``, whose ``resolve_classification_loss`` builds the
criterion of ``ClassificationTask`` and the distillation tasks). :func:`install`
rebinds the name in every loaded ``timm`` module that refers to the original,
so the stock code paths reach the wrapper. Code outside timm that did
``from timm.loss import create_classification_loss`` *before* ``import timm_el``
keeps the original function; import ``timm_el`` first, or look the function up
through the module (``timm.loss.create_classification_loss``).
"""
import functools
import inspect
import sys
from typing import Optional

import torch
import torch.nn as nn

from encouraging_loss.functional import check_probability

from .encouraging import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss

__all__ = [
    'LOSS_TYPE',
    'EL_KWARGS',
    'create_encouraging_loss',
    'install',
    'uninstall',
    'is_installed',
]

#: the ``loss_type`` name of the Encouraging Loss in timm's factory.
LOSS_TYPE = 'encouraging'

#: Encouraging Loss options the hooked factory accepts, with their defaults
#: (``log_end=0.75`` as in the paper's image classification runs).
EL_KWARGS = {
    'log_end': 0.75,
    'bonus': 'log',
    'bonus_start': 0.,
    'bonus_gamma': 1.,
    'bonus_rho': 1.,
    'bonus_smoothing': None,
}

# factory arguments that the Encouraging Loss uses; every other timm option
# must stay at its default with loss_type='encouraging'.
_EL_FACTORY_ARGS = ('loss_type', 'multi_label', 'smoothing', 'soft_targets')

# attribute of the wrapper that holds timm's own factory
_ORIGINAL = '_timm_el_original'

# what install() replaced, for uninstall()
_state = {}

_DOC = """
    Encouraging Loss (added by timm_el, Zhao et al., AAAI 2022):
        loss_type='encouraging': cross-entropy plus a bonus for well-classified examples,
            single-label targets only. EncouragingLabelSmoothingLoss (class indices, uses
            smoothing) or EncouragingSoftTargetLoss (soft_targets=True, Mixup/CutMix).
            Keyword-only options, valid with loss_type='encouraging' only:
        log_end: Conservative bonus end point in (0, 1], default 0.75; 1 is the normal bonus.
        bonus: Bonus kind, 'log' (default), 'power' or 'cosine'.
        bonus_start: Aggressive bonus threshold in [0, 1), default 0 (off).
        bonus_gamma: Exponent of the 'power' bonus, default 1.
        bonus_rho: Bonus weight, default 1; 0 gives (label-smoothed / soft-target) CE.
        bonus_smoothing: Smoothing of the bonus term, default None (= smoothing); like
            smoothing, ignored when soft_targets is set.
"""


def create_encouraging_loss(
        smoothing: float = 0.,
        soft_targets: bool = False,
        log_end: float = 0.75,
        bonus: str = 'log',
        bonus_start: float = 0.,
        bonus_gamma: float = 1.,
        bonus_rho: float = 1.,
        bonus_smoothing: Optional[float] = None,
) -> nn.Module:
    """Create the Encouraging Loss criterion the way timm's factory creates CE.

    Args:
        smoothing: Label smoothing factor in [0, 1). Ignored when soft_targets is
            set, since Mixup/CutMix already apply it (as in timm).
        soft_targets: Targets are dense distributions from Mixup/CutMix.
        log_end: Conservative bonus end point in (0, 1]; 1 is the normal bonus.
        bonus: 'log', 'power' or 'cosine'.
        bonus_start: Aggressive bonus threshold in [0, 1); 0 disables it.
        bonus_gamma: Exponent of the 'power' bonus, > 0.
        bonus_rho: Weight of the bonus, >= 0.
        bonus_smoothing: Smoothing of the bonus term in [0, 1), None uses
            smoothing; ignored (but checked) with soft_targets.

    Returns:
        EncouragingSoftTargetLoss if soft_targets, else EncouragingLabelSmoothingLoss.
    """
    if soft_targets:
        # ignored, as timm ignores smoothing for soft targets, but still checked
        check_probability(smoothing, 'smoothing')
        check_probability(bonus_smoothing, 'bonus_smoothing', allow_none=True)
        return EncouragingSoftTargetLoss(
            log_end=log_end, bonus=bonus, bonus_start=bonus_start, bonus_gamma=bonus_gamma, bonus_rho=bonus_rho)
    return EncouragingLabelSmoothingLoss(
        smoothing=smoothing,
        log_end=log_end,
        bonus=bonus,
        bonus_start=bonus_start,
        bonus_gamma=bonus_gamma,
        bonus_rho=bonus_rho,
        bonus_smoothing=bonus_smoothing,
    )


def _at_default(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except Exception:  # e.g. numpy arrays
        return False


def _make_hook(original):
    """Wrap timm's ``create_classification_loss`` (``original``)."""
    sig = inspect.signature(original)
    el_params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in EL_KWARGS.items()]

    @functools.wraps(original)
    def create_classification_loss(*args, **kwargs):
        el_kwargs = {k: kwargs.pop(k) for k in EL_KWARGS if k in kwargs}
        bound = sig.bind(*args, **kwargs)  # TypeError on unknown arguments, like timm
        loss_type = bound.arguments.get('loss_type')
        if loss_type != LOSS_TYPE:
            if el_kwargs:
                raise ValueError(
                    f"{', '.join(el_kwargs)} only appl{'ies' if len(el_kwargs) == 1 else 'y'} to "
                    f"loss_type='{LOSS_TYPE}', got loss_type={loss_type!r}.")
            return original(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if arguments['multi_label']:
            raise ValueError(
                f"Loss type '{LOSS_TYPE}' does not support multi-label targets (it is a softmax loss over "
                f"single-label targets), expected one of {_multi_label_types()}.")
        unused = [
            name for name, param in sig.parameters.items()
            if name not in _EL_FACTORY_ARGS and not _at_default(arguments[name], param.default)
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} do{'es' if len(unused) == 1 else ''} not apply to loss_type='{LOSS_TYPE}' "
                f"(it takes smoothing, soft_targets and {', '.join(EL_KWARGS)}).")
        return create_encouraging_loss(
            smoothing=arguments['smoothing'], soft_targets=arguments['soft_targets'], **el_kwargs)

    create_classification_loss.__signature__ = sig.replace(parameters=list(sig.parameters.values()) + el_params)
    create_classification_loss.__doc__ = (original.__doc__ or '').rstrip() + '\n' + _DOC
    setattr(create_classification_loss, _ORIGINAL, original)
    return create_classification_loss


def _multi_label_types():
    import timm.loss._loss_factory as factory_module
    return factory_module.MULTI_LABEL_LOSS_TYPES


def _timm_modules():
    """Loaded timm modules, the ones known to hold the names first."""
    import timm.loss
    import timm.loss._loss_factory
    import timm.task
    import timm.task.classification
    known = [timm.loss._loss_factory, timm.loss, timm.task, timm.task.classification]
    others = [
        m for n, m in list(sys.modules.items())
        if m is not None and (n == 'timm' or n.startswith('timm.')) and all(m is not k for k in known)
    ]
    return known + others


def _rebind(modules, name, replace, new) -> None:
    for module in modules:
        namespace = getattr(module, '__dict__', None)
        if namespace is not None and name in namespace and replace(namespace[name]):
            setattr(module, name, new)


def is_installed() -> bool:
    """Whether timm's factory currently reaches the Encouraging Loss."""
    import timm.loss
    return hasattr(timm.loss.create_classification_loss, _ORIGINAL) and LOSS_TYPE in timm.loss.LOSS_TYPES


def install() -> None:
    """Register ``loss_type='encouraging'`` with timm. Idempotent.

    Appends ``'encouraging'`` to ``LOSS_TYPES`` and installs the wrapping
    ``create_classification_loss`` in every loaded ``timm`` module that
    refers to timm's original tuple or function. Called by ``import timm_el``.
    """
    import timm.loss._loss_factory as factory_module

    modules = _timm_modules()
    current = factory_module.create_classification_loss
    original = getattr(current, _ORIGINAL, current)
    hook = current if original is not current else _make_hook(original)
    old_types = factory_module.LOSS_TYPES
    new_types = old_types if LOSS_TYPE in old_types else tuple(old_types) + (LOSS_TYPE,)
    _state.setdefault('original', original)
    _state.setdefault('loss_types', tuple(t for t in old_types if t != LOSS_TYPE))

    _rebind(modules, 'create_classification_loss',
            lambda f: f is original or hasattr(f, _ORIGINAL), hook)
    _rebind(modules, 'LOSS_TYPES',
            lambda t: t is old_types or t is _state['loss_types'], new_types)


def uninstall() -> None:
    """Restore timm's own factory and ``LOSS_TYPES`` everywhere :func:`install` changed them."""
    if not _state:
        return
    import timm.loss._loss_factory as factory_module

    modules = _timm_modules()
    installed_types = factory_module.LOSS_TYPES
    _rebind(modules, 'create_classification_loss', lambda f: hasattr(f, _ORIGINAL), _state['original'])
    _rebind(modules, 'LOSS_TYPES',
            lambda t: t is installed_types or (isinstance(t, tuple) and LOSS_TYPE in t), _state['loss_types'])
