"""Encouraging Loss (Zhao et al., AAAI 2022), framework-free core.

Three parts, one per place:

* **the loss** (here): ``encouraging_loss`` / ``EncouragingLoss`` compute it;
  the bonus formula is in :mod:`encouraging_loss.bonus` (its only home), the
  checks of settings and inputs in :mod:`encouraging_loss.checks`, the formula
  under autograd in :mod:`encouraging_loss.reference`, the paper's companion
  losses (focal, Halted Focal Loss, MSE with the mirror bonus) in
  :mod:`encouraging_loss.companion`;
* **its fast implementations**, :mod:`encouraging_loss.ops`: the fused
  closed-form gradient (``ops.fused``), the Triton kernels
  (``ops.triton_kernels``) and the fused output projection
  (``ops.fused_linear``);
* **the tools around experiments**, :mod:`encouraging_loss.tools`: result
  tables and plots, analysis (margins, energy, calibration, OOD), the test and
  benchmark data, benchmarks, the kernels' machine-code report, and what every
  command shares (argument parsing, safe file handling).

Imports point down: tools -> loss API -> ops -> checks / reference -> bonus.
The names below are imported on first use, so that the project's commands
that need no torch (``el-results``, the data preparation) start at once.
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
    "check_targets": "checks",
    "encouraging_loss": "functional",
    "LinearELParts": "ops.fused_linear",
    "fused_linear_encouraging_loss": "ops.fused_linear",
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
