"""Encouraging Loss (Zhao et al., AAAI 2022), framework-free core.

``encouraging_loss`` / ``EncouragingLoss`` compute the loss; the bonus
functions live in :mod:`encouraging_loss.bonus`.
"""
from .bonus import BONUS_KINDS, BONUS_SCHEDULES, BonusConfig, bonus_grad, bonus_rho_at, bonus_value
from .functional import ELParts, encouraging_loss
from .modules import EncouragingLoss

__version__ = "0.1.0"

__all__ = [
    "BONUS_KINDS",
    "BONUS_SCHEDULES",
    "BonusConfig",
    "ELParts",
    "EncouragingLoss",
    "bonus_grad",
    "bonus_rho_at",
    "bonus_value",
    "encouraging_loss",
]
