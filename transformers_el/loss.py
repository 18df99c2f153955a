"""Token-level Encouraging Loss with transformers' language-model conventions (EL_SPEC 2.3).

Zhao et al., "Well-Classified Examples are Underestimated in Classification with Deep Neural Networks",
AAAI 2022, Eq. 6 with label smoothing applied to both terms (the loss of the paper's translation results),
over every target token. What transformers does around its own cross-entropy
(``transformers.loss.loss_utils.ForCausalLMLoss``) is done here the same way:

* causal LMs: the labels are padded at the end by one ``ignore_index`` and shifted left, so that the
  logits at position ``t`` are scored against the label at ``t + 1`` (``shift_labels=False``: labels already
  aligned with the logits, as for seq2seq decoders and token classification);
* labels equal to ``ignore_index`` (``-100``) count for nothing;
* reduction: the sum over the tokens divided by ``num_items_in_batch`` when it is given (``Trainer`` counts
  the target tokens of all the micro-batches of one optimizer step, so that gradient accumulation gives the
  gradient of one big batch), else the mean over the non-ignored tokens.

With ``bonus_rho=0`` the loss is the library's (label-smoothed) cross-entropy. Half-precision logits are
not copied to float32 first: the core computes them in float32 chunk by chunk (the library upcasts the
whole logits tensor).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from encouraging_loss import EncouragingLoss
from encouraging_loss.bonus import as_real
from encouraging_loss.functional import el_checked
from encouraging_loss.tools.el_flags import EL_FLAG_DEFAULTS

__all__ = ["EL_DEFAULTS", "EncouragingLMLoss", "encouraging_lm_loss", "check_num_items", "lm_targets", "per_item"]

#: the EL keyword arguments of :func:`encouraging_lm_loss`, :class:`EncouragingLMLoss` and
#: :func:`transformers_el.fused.enable_fused_el`, with their defaults.
#: The bonus settings' defaults are the commands' (:data:`encouraging_loss.tools.el_flags.EL_FLAG_DEFAULTS`).
EL_DEFAULTS = {
    **{name: value for name, value in EL_FLAG_DEFAULTS.items() if name != "defer_start"},
    "smoothing": 0.0,
    "ignore_index": -100,
}

#: the loss's target is called ``labels`` in transformers
_NAMES = {"target": "labels"}


def _check_shift(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"shift_labels must be True or False, got {value!r}")
    return value


def check_num_items(num_items_in_batch):
    """``num_items_in_batch`` as ``Trainer`` passes it: ``None``, a number ``> 0`` or a one-element tensor
    (its value is not read: no synchronisation with the device). ``ValueError`` naming it otherwise."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be a number > 0 or a one-element tensor, got a "
                             f"{num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(())
    number = as_real(num_items_in_batch)
    if number is None or not number > 0 or number == float("inf"):
        raise ValueError(f"num_items_in_batch must be a number > 0 or a one-element tensor, got {num_items_in_batch!r}")
    return number


def lm_targets(labels: torch.Tensor, ignore_index: int, shift_labels: bool) -> torch.Tensor:
    """The target of each position: ``labels`` padded by one ``ignore_index`` at the end and shifted left
    (``shift_labels``, causal LMs: position ``t`` predicts token ``t + 1``; the last position predicts
    nothing), as ``ForCausalLMLoss`` does; ``labels`` unchanged otherwise."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        got = f"dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of token ids (ignore_index {ignore_index} ignored), "
                         f"got {got}")
    if not shift_labels:
        return labels
    if labels.dim() < 1:
        raise ValueError("labels must have a sequence dimension to be shifted (shift_labels=True), got a 0-d tensor")
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _lm_loss(logits, labels, num_items, shift, cfg, eps, eps_b, ignore_index, impl="fused", weight=None, names=None):
    """:func:`encouraging_lm_loss` with the settings already checked."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    target = lm_targets(labels, ignore_index, shift).to(logits.device)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (the logits' shape without the "
                         f"vocabulary dimension), got {tuple(labels.shape)}")
    num_items = check_num_items(num_items)
    reduction = "mean" if num_items is None else "sum"
    loss = el_checked(logits, target, cfg, eps, eps_b, ignore_index, reduction, False, impl, names, weight=weight)
    return per_item(loss, num_items)


def per_item(loss: torch.Tensor, num_items) -> torch.Tensor:
    """A summed loss divided by ``num_items`` (checked by :func:`check_num_items`; ``None``: ``loss`` is
    already a mean and comes back as it is): ``Trainer``'s normalisation under gradient accumulation."""
    if num_items is None:
        return loss
    return loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)


def encouraging_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    shift_labels: bool = True,
    ignore_index: int = -100,
    log_end: float = 0.75,
    bonus: str = "log",
    bonus_start: float = 0.0,
    bonus_gamma: float = 1.0,
    bonus_rho: float = 1.0,
    smoothing: float = 0.0,
    bonus_smoothing: Optional[float] = None,
) -> torch.Tensor:
    """Token-level Encouraging Loss (EL_SPEC 2.3; Zhao et al. 2022, Eq. 6 with label smoothing) of a language
    model's ``logits`` against ``labels``, with transformers' conventions.

    Args:
        logits: ``(batch, seq, vocab)`` (or any ``(..., vocab)``) scores, any floating dtype.
        labels: token ids of shape ``logits.shape[:-1]``; ``ignore_index`` marks positions without a target.
        num_items_in_batch: the number of target tokens the loss is normalised by (``Trainer`` passes it;
            with gradient accumulation it counts the whole accumulated batch): the loss is the sum over the
            tokens divided by it. ``None``: the mean over the non-ignored tokens.
        shift_labels: causal LM (default): position ``t`` is scored against ``labels[t + 1]``, as
            ``ForCausalLMLoss``; ``False``: labels already aligned with the logits.
        ignore_index: label value that counts for nothing.
        log_end, bonus, bonus_start, bonus_gamma, bonus_rho, smoothing, bonus_smoothing: the EL settings of
            :func:`encouraging_loss.encouraging_loss` (``log_end`` defaults to 0.75, the conservative bonus).

    Returns:
        A float32 scalar. With ``bonus_rho=0`` it equals transformers' loss (``ForCausalLMLoss``, the model's
        ``outputs.loss``) with ``label_smoothing=smoothing``.
    """
    settings = EncouragingLMLoss(log_end=log_end, bonus=bonus, bonus_start=bonus_start, bonus_gamma=bonus_gamma,
                                 bonus_rho=bonus_rho, smoothing=smoothing, bonus_smoothing=bonus_smoothing,
                                 ignore_index=ignore_index, shift_labels=shift_labels)
    return settings.lm_loss(logits, labels, num_items_in_batch)


class EncouragingLMLoss(EncouragingLoss):
    """Token-level Encouraging Loss for ``Trainer(compute_loss_func=EncouragingLMLoss(...))`` (EL_SPEC 2.3).

    Called as ``Trainer`` calls its ``compute_loss_func``: ``loss_fn(outputs, labels, num_items_in_batch=None)``,
    where ``outputs`` is the model's output (its ``logits`` are read) and ``labels`` the batch's labels; the
    loss is :func:`encouraging_lm_loss` of them with this object's settings.

    Args:
        log_end, bonus, bonus_start, bonus_gamma, bonus_rho, smoothing, bonus_smoothing, ignore_index: as
            :func:`encouraging_lm_loss` (and :class:`encouraging_loss.EncouragingLoss`).
        shift_labels: ``True`` for causal LMs (labels shifted inside, as the library does), ``False`` for
            labels already aligned with the logits (seq2seq, token classification).

    Every setting is an attribute, checked on construction and on every assignment with a one-line
    ``ValueError`` naming the parameter: a callback may set ``loss_fn.bonus_rho`` between steps (bonus
    schedules, EL_SPEC 2.1). The same object holds the settings of the fused path
    (:func:`transformers_el.fused.fused_el_settings`).
    """

    def __init__(
        self,
        *,
        log_end: float = 0.75,
        bonus: str = "log",
        bonus_start: float = 0.0,
        bonus_gamma: float = 1.0,
        bonus_rho: float = 1.0,
        smoothing: float = 0.0,
        bonus_smoothing: Optional[float] = None,
        ignore_index: int = -100,
        shift_labels: bool = True,
    ):
        super().__init__(log_end=log_end, bonus=bonus, bonus_start=bonus_start, bonus_gamma=bonus_gamma,
                         bonus_rho=bonus_rho, smoothing=smoothing, bonus_smoothing=bonus_smoothing,
                         ignore_index=ignore_index, reduction="mean", names=_NAMES)
        self.shift_labels = shift_labels

    @property
    def shift_labels(self) -> bool:
        """True: causal-LM labels, shifted inside; False: labels aligned with the logits."""
        return self._shift_labels

    @shift_labels.setter
    def shift_labels(self, value) -> None:
        self._shift_labels = _check_shift(value)

    @property
    def reduction(self) -> str:
        """Fixed: the mean over the non-ignored tokens, or the sum over ``num_items_in_batch``."""
        return "mean"

    @reduction.setter
    def reduction(self, value) -> None:
        if value != "mean":
            raise ValueError(f"reduction of EncouragingLMLoss is fixed (mean over the target tokens, or sum / "
                             f"num_items_in_batch), got {value!r}")

    @property
    def settings(self) -> dict:
        """The EL keyword arguments (:data:`EL_DEFAULTS`' keys) as they are now."""
        c = self.cfg
        return {"log_end": c.log_end, "bonus": c.kind, "bonus_start": c.bonus_start, "bonus_gamma": c.gamma,
                "bonus_rho": c.rho, "smoothing": self.smoothing, "bonus_smoothing": self.bonus_smoothing,
                "ignore_index": self.ignore_index}

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """:func:`encouraging_lm_loss` of ``logits`` and ``labels`` with this object's settings."""
        return _lm_loss(logits, labels, num_items_in_batch, self._shift_labels, self._cfg, self._smoothing,
                        self._bonus_smoothing, self._ignore_index, self._impl, self.weight, self.names)

    def forward(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The loss of the model output ``outputs`` (a ``ModelOutput`` or dict with ``logits``, a tuple whose
        first element is the logits, or the logits tensor) against ``labels``."""
        if labels is None:
            raise ValueError("labels must be given to EncouragingLMLoss, got None (the batch has no 'labels')")
        return self.lm_loss(_logits_of(outputs), labels, num_items_in_batch)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"log_end={c.log_end}, bonus={c.kind!r}, bonus_start={c.bonus_start}, bonus_gamma={c.gamma}, "
                f"bonus_rho={c.rho}, smoothing={self.smoothing}, bonus_smoothing={self.bonus_smoothing}, "
                f"ignore_index={self.ignore_index}, shift_labels={self.shift_labels}")


def _logits_of(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):  # ModelOutput is an OrderedDict
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    else:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the model output holds no logits (got {type(outputs).__name__} without a 'logits' tensor): "
            "EncouragingLMLoss scores outputs.logits; a model with the fused path on (enable_fused_el) returns "
            "its loss itself and no logits in training"
        )
    return logits
