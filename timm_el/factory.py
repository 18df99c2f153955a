""" Encouraging Loss in timm's classification loss factory

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022.

:func:`install` adds ``'encouraging'`` to ``timm.loss.LOSS_TYPES`` and wraps
``timm.loss.create_classification_loss`` so that
``create_classification_loss(loss_type='encouraging', ...)`` returns
:class:`~timm_el.EncouragingLabelSmoothingLoss` (class-index targets) or
:class:`~timm_el.EncouragingSoftTargetLoss` (``soft_targets=True``, Mixup /
CutMix). Every other loss type goes to timm's own factory, unchanged.

It also adds the paper's companion losses (EL_SPEC 2.5, from
:mod:`encouraging_loss.companion`): ``loss_type='focal'`` and
``'halted_focal'`` (Eq. 12; options ``focal_gamma``, ``halt_point``), ``'mse'``
and ``'mse_sigmoid'`` (MSE with the mirror bonus, Table 5; options
``mirror_rho``, ``mirror_gamma``). They take class indices or, with
``soft_targets=True``, the dense targets of Mixup / CutMix.

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

from encouraging_loss.checks import check_probability
from encouraging_loss.companion import FocalLoss, HaltedFocalLoss, MirrorMSELoss

from .encouraging import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss

__all__ = [
    'LOSS_TYPE',
    'EL_KWARGS',
    'COMPANION_KWARGS',
    'COMPANION_LOSS_TYPES',
    'create_companion_loss',
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

#: the companion losses of the paper (EL_SPEC 2.5) as ``loss_type`` names, with the
#: options each accepts and their defaults (focal gamma 2 as Lin et al.; the paper's
#: halting point 0.5 and mirror bonus g = 2; mirror_rho=0 gives plain MSE).
COMPANION_KWARGS = {
    'focal': {'focal_gamma': 2.},
    'halted_focal': {'focal_gamma': 2., 'halt_point': 0.5},
    'mse': {'mirror_rho': 1., 'mirror_gamma': 2.},
    'mse_sigmoid': {'mirror_rho': 1., 'mirror_gamma': 2.},
}
COMPANION_LOSS_TYPES = tuple(COMPANION_KWARGS)

# every option the hook adds -> the loss types it applies to
_OPTION_TYPES = {name: (LOSS_TYPE,) for name in EL_KWARGS}
for _type, _options in COMPANION_KWARGS.items():
    for _option in _options:
        _OPTION_TYPES[_option] = _OPTION_TYPES.get(_option, ()) + (_type,)
del _type, _options, _option
# the option defaults, for the hook's signature
_OPTION_DEFAULTS = {**EL_KWARGS, **{k: v for options in COMPANION_KWARGS.values() for k, v in options.items()}}
# the loss types the hook builds itself
_OUR_TYPES = (LOSS_TYPE,) + COMPANION_LOSS_TYPES
# the core's parameter names -> the factory's, for the core's error messages
_COMPANION_NAMES = {'gamma': 'focal_gamma', 'halt': 'halt_point'}

# factory arguments that the Encouraging Loss (and the companion losses) use; every other timm option
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

    Companion losses of the paper (added by timm_el, EL_SPEC 2.5), single-label targets,
    class indices (with smoothing) or soft targets (soft_targets=True, Mixup/CutMix):
        loss_type='focal': focal loss -(1 - p)**focal_gamma log p.
        loss_type='halted_focal': Halted Focal Loss (Eq. 12): focal below p = halt_point,
            the cross-entropy shifted to stay continuous above.
        loss_type='mse', 'mse_sigmoid': MSE of the softmax (sigmoid) outputs plus the mirror
            bonus -mirror_rho * (y u**mirror_gamma + (1 - y) (1 - u)**mirror_gamma) (Table 5),
            averaged over the classes, then the batch.
        focal_gamma: Focusing exponent >= 0, default 2 ('focal', 'halted_focal').
        halt_point: Halting point in (0, 1), default 0.5 ('halted_focal').
        mirror_rho: Mirror bonus weight >= 0, default 1; 0 gives plain MSE ('mse', 'mse_sigmoid').
        mirror_gamma: Mirror bonus exponent > 0, default 2 ('mse', 'mse_sigmoid').
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


def create_companion_loss(
        loss_type: str,
        smoothing: float = 0.,
        soft_targets: bool = False,
        **options,
) -> nn.Module:
    """Create one of the paper's companion losses (EL_SPEC 2.5) the way timm's factory creates CE.

    Args:
        loss_type: 'focal', 'halted_focal' (Eq. 12), 'mse' or 'mse_sigmoid' (Table 5).
        smoothing: Label smoothing factor in [0, 1): the loss is taken against
            ``(1 - smoothing) y + smoothing / C``. Ignored (but checked) when
            soft_targets is set, since Mixup/CutMix already apply it (as in timm).
        soft_targets: Targets are dense distributions from Mixup/CutMix (the
            returned loss takes class indices too).
        **options: The loss type's options, see :data:`COMPANION_KWARGS`
            (``focal_gamma``, ``halt_point``, ``mirror_rho``, ``mirror_gamma``);
            ``ValueError`` for one that does not apply.

    Returns:
        :class:`encouraging_loss.FocalLoss`, :class:`~encouraging_loss.HaltedFocalLoss`
        or :class:`~encouraging_loss.MirrorMSELoss`, batch mean.
    """
    if loss_type not in COMPANION_KWARGS:
        raise ValueError(f"loss_type must be one of {', '.join(COMPANION_LOSS_TYPES)}, got {loss_type!r}")
    unknown = [k for k in options if k not in COMPANION_KWARGS[loss_type]]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} do{'es' if len(unknown) == 1 else ''} not apply to "
                         f"loss_type={loss_type!r} (it takes {', '.join(COMPANION_KWARGS[loss_type])}).")
    kw = {**COMPANION_KWARGS[loss_type], **options}
    smoothing = check_probability(smoothing, 'smoothing')
    if soft_targets:
        smoothing = 0.
    common = dict(smoothing=smoothing, reduction='mean', names=_COMPANION_NAMES)
    if loss_type == 'focal':
        return FocalLoss(gamma=kw['focal_gamma'], **common)
    if loss_type == 'halted_focal':
        return HaltedFocalLoss(gamma=kw['focal_gamma'], halt=kw['halt_point'], **common)
    activation = 'sigmoid' if loss_type == 'mse_sigmoid' else 'softmax'
    return MirrorMSELoss(activation=activation, mirror_rho=kw['mirror_rho'], mirror_gamma=kw['mirror_gamma'],
                         **common)


def _quoted_or(types) -> str:
    quoted = [f"'{t}'" for t in types]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


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
    el_params = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _OPTION_DEFAULTS.items()]

    @functools.wraps(original)
    def create_classification_loss(*args, **kwargs):
        ours = {k: kwargs.pop(k) for k in _OPTION_TYPES if k in kwargs}
        bound = sig.bind(*args, **kwargs)  # TypeError on unknown arguments, like timm
        loss_type = bound.arguments.get('loss_type')
        misplaced = [k for k in ours if loss_type not in _OPTION_TYPES[k]]
        if misplaced:
            types = _OPTION_TYPES[misplaced[0]]
            group = [k for k in misplaced if _OPTION_TYPES[k] == types]
            raise ValueError(
                f"{', '.join(group)} only appl{'ies' if len(group) == 1 else 'y'} to "
                f"loss_type={_quoted_or(types)}, got loss_type={loss_type!r}.")
        if loss_type not in _OUR_TYPES:
            return original(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if arguments['multi_label']:
            kind = 'sigmoid' if loss_type == 'mse_sigmoid' else 'softmax'
            raise ValueError(
                f"Loss type '{loss_type}' does not support multi-label targets (it is a {kind} loss over "
                f"single-label targets), expected one of {_multi_label_types()}.")
        unused = [
            name for name, param in sig.parameters.items()
            if name not in _EL_FACTORY_ARGS and not _at_default(arguments[name], param.default)
        ]
        if unused:
            options = EL_KWARGS if loss_type == LOSS_TYPE else COMPANION_KWARGS[loss_type]
            raise ValueError(
                f"{', '.join(unused)} do{'es' if len(unused) == 1 else ''} not apply to loss_type='{loss_type}' "
                f"(it takes smoothing, soft_targets and {', '.join(options)}).")
        if loss_type != LOSS_TYPE:
            return create_companion_loss(
                loss_type, smoothing=arguments['smoothing'], soft_targets=arguments['soft_targets'], **ours)
        return create_encouraging_loss(
            smoothing=arguments['smoothing'], soft_targets=arguments['soft_targets'], **ours)

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
    """Register ``loss_type='encouraging'`` (and the companion losses) with timm. Idempotent.

    Appends ``'encouraging'`` and :data:`COMPANION_LOSS_TYPES` to ``LOSS_TYPES`` and installs the wrapping
    ``create_classification_loss`` in every loaded ``timm`` module that
    refers to timm's original tuple or function. Called by ``import timm_el``.
    """
    import timm.loss._loss_factory as factory_module

    modules = _timm_modules()
    current = factory_module.create_classification_loss
    original = getattr(current, _ORIGINAL, current)
    hook = current if original is not current else _make_hook(original)
    old_types = factory_module.LOSS_TYPES
    missing = tuple(t for t in _OUR_TYPES if t not in old_types)
    new_types = tuple(old_types) + missing if missing else old_types
    _state.setdefault('original', original)
    _state.setdefault('loss_types', tuple(t for t in old_types if t not in _OUR_TYPES))

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
