"""Encouraging Loss (Zhao et al., AAAI 2022), framework-free core.

``encouraging_loss`` / ``EncouragingLoss`` compute the loss; the bonus
functions live in :mod:`encouraging_loss.bonus`. The paper's companion losses
(focal, Halted Focal Loss, MSE with the mirror bonus) are in
:mod:`encouraging_loss.companion`.

The names below are imported on first use, so that the project's commands
that need no torch (``python -m encouraging_loss.results``, the data
preparation) start at once.
"""
import importlib

__version__ = "0.1.0"

_HOME = {
    "BONUS_KINDS": "bonus",
    "BONUS_SCHEDULES": "bonus",
    "BonusConfig": "bonus",
    "bonus_grad": "bonus",
    "bonus_rho_at": "bonus",
    "bonus_value": "bonus",
    "ELParts": "functional",
    "check_targets": "functional",
    "encouraging_loss": "functional",
    "LinearELParts": "fused_linear",
    "fused_linear_encouraging_loss": "fused_linear",
    "EncouragingLoss": "modules",
    "CompanionParts": "companion",
    "FocalLoss": "companion",
    "HaltedFocalLoss": "companion",
    "MirrorMSELoss": "companion",
    "focal_loss": "companion",
    "halted_focal_loss": "companion",
    "mirror_mse_loss": "companion",
}

__all__ = sorted(_HOME)


def __getattr__(name):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
