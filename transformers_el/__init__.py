"""Encouraging Loss for Hugging Face transformers: token-level EL for language-model fine-tuning.

Zhao et al., "Well-Classified Examples are Underestimated in Classification with Deep Neural Networks",
AAAI 2022 (arXiv 2110.06537). EL's translation result is token-level classification over a vocabulary
(EL_SPEC 2.3); this package brings that loss to ``transformers`` models and ``Trainer``. The loss itself is
the core's (``encouraging_loss``); this package holds only what needs transformers' conventions:

* :mod:`transformers_el.loss`: :func:`encouraging_lm_loss` (logits and labels, with the library's label shift,
  ``-100`` ignored and ``num_items_in_batch`` normalisation) and :class:`EncouragingLMLoss`, a callable for
  ``Trainer(compute_loss_func=...)``;
* :mod:`transformers_el.fused`: :func:`enable_fused_el` / :func:`disable_fused_el` /
  :func:`is_fused_el_enabled` / :func:`fused_el_settings`: a causal LM's training forward computes the output
  projection and EL together from the last hidden states (``encouraging_loss.fused_linear_encouraging_loss``),
  so the (tokens x vocabulary) logits are never materialised.

Install with ``pip install -e .[transformers]``. Importing this package imports neither torch nor
transformers; the names below are imported on first use.
"""
import importlib

_HOME = {
    "EL_DEFAULTS": "loss",
    "EncouragingLMLoss": "loss",
    "encouraging_lm_loss": "loss",
    "disable_fused_el": "fused",
    "enable_fused_el": "fused",
    "fused_el_settings": "fused",
    "is_fused_el_enabled": "fused",
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
