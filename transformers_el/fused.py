"""The memory path of a causal LM: output projection and Encouraging Loss fused, the logits never stored.

In a language model's training step the (tokens x vocabulary) logits are the largest tensor: 8 sequences of
2048 tokens at a 128k vocabulary are 8.6 GB in float32, held from the forward to the backward pass, and
transformers' loss upcasts them to a float32 copy first. :func:`enable_fused_el` makes a ``*ForCausalLM``
model compute its training loss with :func:`encouraging_loss.fused_linear_encouraging_loss` instead: the
projection ``hidden @ W^T (+ b)`` and the token-level EL (EL_SPEC 2.3; Zhao et al., AAAI 2022, Eq. 6 with label
smoothing) are computed chunk by chunk of tokens, each chunk's logits turned at once into the gradients of the
hidden states and of ``W`` (EL_SPEC 3), so that only a chunk of logits exists at any time (the idea of
Liger-Kernel's fused linear cross-entropy, here with the bonus).

How: the model's own ``forward`` still runs (every model-specific input, the decoder, the final norm, any
scaling of the hidden states before the head), with ``labels`` withheld; when it calls its output embeddings
(``model.get_output_embeddings()``, an ``nn.Linear``, tied to the input embeddings or not), the call is taken
over: the loss is computed from the hidden states it receives and the head's weight and bias, and an empty
tensor is returned in place of the logits. The model then returns its usual output class with ``loss`` set
and ``logits=None``. Only the instance's ``forward`` is wrapped (the original is kept and restored by
:func:`disable_fused_el`); no library file is changed.

The fused path is taken in training mode when ``labels`` are given; in eval mode, without labels (generation)
or with ``logits_to_keep`` the original forward runs unchanged and returns logits.
"""
import inspect
import types
from typing import Optional

import torch
from torch import nn

from encouraging_loss.ops.fused_linear import linear_el_checked

from .loss import EncouragingLMLoss, check_num_items, lm_targets, per_item

__all__ = ["disable_fused_el", "enable_fused_el", "fused_el_settings", "is_fused_el_enabled"]

#: configuration fields of transformers' causal LMs that post-process the logits after the output
#: projection (the fused path would skip it), with the values that change nothing.
LOGIT_POSTPROCESSING = (
    ("final_logit_softcapping", (None,), "soft-caps the logits (Gemma 2/3/4, Nanochat, Inkling 2)"),
    ("output_logit_soft_cap", (None,), "soft-caps the logits (xLSTM)"),
    ("logit_scale", (None, 1, 1.0), "scales the logits (Cohere)"),
    ("logits_scaling", (None, 1, 1.0), "scales the logits (Granite, HyperCLOVA X, MiniCPM3)"),
    ("lm_head_multiplier", (None, 1, 1.0), "scales the logits (Falcon-H1)"),
)


def _refusal(model) -> Optional[str]:
    """Why the fused path cannot serve ``model`` (one line), or None."""
    name = type(model).__name__
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_output_embeddings", None)):
        return f"model must be a transformers *ForCausalLM model, got {name}"
    config = getattr(model, "config", None)
    if config is None:
        return f"{name} has no config: enable_fused_el needs a transformers *ForCausalLM model"
    if getattr(config, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model (labels aligned with the decoder's inputs, not shifted): "
                "the fused path serves causal LMs; use "
                "Trainer(compute_loss_func=EncouragingLMLoss(shift_labels=False))")
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    loss_type = getattr(model, "loss_type", None)
    mapped = LOSS_MAPPING.get(loss_type) if isinstance(loss_type, str) else None
    if mapped is not None and mapped is not ForCausalLMLoss:
        return (f"{name} is trained with transformers' {loss_type} loss, not a causal-LM loss: "
                "the fused path serves *ForCausalLM models")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return (f"{name}'s output embeddings (get_output_embeddings()) must be an nn.Linear for the fused path, "
                f"got {type(head).__name__}")
    if not head.weight.is_floating_point():
        return (f"{name}'s output embeddings hold {head.weight.dtype} weights (quantized?): "
                "the fused path needs floating point")
    for field, neutral, what in LOGIT_POSTPROCESSING:
        value = getattr(config, field, None)
        if not any(value is n or (n is not None and value == n) for n in neutral):
            return (f"{name} {what} after the output projection ({field}={value!r}): the fused path would skip it; "
                    "use Trainer(compute_loss_func=EncouragingLMLoss(...)) on the logits instead")
    unpadded = getattr(config, "unpadded_vocab_size", None)
    if unpadded is not None and unpadded != getattr(config, "vocab_size", unpadded):
        return (f"{name} drops padded vocabulary entries from its logits (unpadded_vocab_size={unpadded!r}): "
                "the fused path would score them; use Trainer(compute_loss_func=EncouragingLMLoss(...)) instead")
    return None


def _position(signature, name) -> Optional[int]:
    """Index of parameter ``name`` among the positional parameters of ``signature`` (None: keyword only / absent)."""
    for i, p in enumerate(signature.parameters.values()):
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


def _take(args, kwargs, position, name, default=None):
    """``(value, args, kwargs)``: the argument ``name`` given by keyword or at ``position``, removed from both."""
    if position is not None and len(args) > position:
        value = args[position]
        return value, args[:position] + (None,) + args[position + 1:], kwargs
    if name in kwargs:
        kwargs = dict(kwargs)
        return kwargs.pop(name), args, kwargs
    return default, args, kwargs


class _FusedForward:
    """The forward of a model with the fused path on: ``model.forward`` (an instance attribute).

    ``__wrapped__`` is the original forward, so that ``inspect.signature(model.forward)`` (what ``Trainer``
    and ``generate`` inspect) still shows the model's own parameters. A plain object holding the model
    (not a closure), so that ``copy.deepcopy(model)`` gives a copy whose forward serves the copy."""

    def __init__(self, model, settings: EncouragingLMLoss, inner, chunk_rows):
        self.model = model
        self.settings = settings
        self.inner = inner  # an instance-level forward that was there before (another wrapper), or None
        self.chunk_rows = chunk_rows
        self._positions = None

    @property
    def __wrapped__(self):
        return self.inner if self.inner is not None else types.MethodType(type(self.model).forward, self.model)

    def original(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        model = self.model
        if not model.training:
            return self.original(*args, **kwargs)
        if self._positions is None:
            sig = inspect.signature(self.__wrapped__)
            self._positions = (_position(sig, "labels"), _position(sig, "logits_to_keep"))
        labels_at, keep_at = self._positions
        labels, args_nl, kwargs_nl = _take(args, kwargs, labels_at, "labels")
        keep = args[keep_at] if keep_at is not None and len(args) > keep_at else kwargs.get("logits_to_keep", 0)
        keep_all = isinstance(keep, int) and not isinstance(keep, bool) and keep == 0
        if labels is None or not keep_all:
            return self.original(*args, **kwargs)
        return self._fused(labels, args_nl, kwargs_nl)

    def _fused(self, labels, args, kwargs):
        model = self.model
        settings = self.settings
        kwargs = dict(kwargs)
        num_items = check_num_items(kwargs.pop("num_items_in_batch", None))
        shifted = kwargs.pop("shift_labels", None)  # labels already shifted by a collator / context parallelism
        target = shifted if isinstance(shifted, torch.Tensor) else lm_targets(labels, settings.ignore_index, True)
        want_tuple = False
        if "return_dict" in kwargs or not getattr(model.config, "return_dict", True):
            given = kwargs.pop("return_dict", None)
            want_tuple = not (getattr(model.config, "return_dict", True) if given is None else given)
            kwargs["return_dict"] = True
        head = model.get_output_embeddings()
        losses = []

        def take_over(hidden, *unused, **unused_kw):
            # called in place of head.forward (the head's hooks still run around it, so its weight is where
            # its pre-forward hooks put it): the loss from the hidden states, an empty tensor as the logits
            losses.append(self._loss(head, hidden, target, num_items))
            return hidden.new_empty(hidden.shape[:-1] + (0,))

        had, before = "forward" in head.__dict__, head.__dict__.get("forward")
        head.forward = take_over
        try:
            out = self.original(*args, **kwargs)
        finally:
            if had:
                head.forward = before
            else:
                del head.forward
        if len(losses) != 1:
            raise RuntimeError(
                f"{type(model).__name__}'s forward called its output embeddings {len(losses)} times (once expected): "
                "the fused path cannot take over its logits; disable_fused_el(model) and use "
                "Trainer(compute_loss_func=EncouragingLMLoss(...))"
            )
        loss = losses[0]
        aux = out.get("aux_loss") if isinstance(out, dict) else None
        coef = getattr(model, "router_aux_loss_coef", None)
        if aux is not None and coef is not None:  # MoE load balancing, added to the loss as the model does
            loss = loss + coef * aux.to(loss.device)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        result = type(out)(loss=loss, **fields)
        return result.to_tuple() if want_tuple else result

    def _loss(self, head, hidden, target, num_items):
        s = self.settings
        weight, bias = head.weight, head.bias
        if hidden.shape[:-1] != target.shape:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (the model's tokens), "
                             f"got {tuple(target.shape)}")
        dev = weight.device
        hidden, target = hidden.to(dev), target.to(dev)
        dtype = weight.dtype
        if torch.is_autocast_enabled(dev.type):  # what the head's nn.Linear would compute in under autocast
            dtype = torch.get_autocast_dtype(dev.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        reduction = "mean" if num_items is None else "sum"
        with torch.autocast(dev.type, enabled=False):
            loss = linear_el_checked(hidden, weight, bias, target, s.cfg, s.smoothing, s.bonus_smoothing,
                                     s.ignore_index, reduction, False, self.chunk_rows, s.names)
        return per_item(loss, num_items)


def _wrapper(model) -> Optional[_FusedForward]:
    forward = model.__dict__.get("forward") if isinstance(model, nn.Module) else None
    return forward if isinstance(forward, _FusedForward) else None


def enable_fused_el(
    model,
    *,
    log_end: float = 0.75,
    bonus: str = "log",
    bonus_start: float = 0.0,
    bonus_gamma: float = 1.0,
    bonus_rho: float = 1.0,
    smoothing: float = 0.0,
    bonus_smoothing: Optional[float] = None,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
):
    """Make the causal LM ``model`` compute its training loss as token-level EL (EL_SPEC 2.3) with the output
    projection fused in (EL_SPEC 3): the (tokens x vocabulary) logits are never materialised. Returns ``model``.

    In training mode with ``labels``, ``model(...)`` returns the model's usual output class with ``loss`` set
    (the sum over the target tokens divided by ``num_items_in_batch`` when ``Trainer`` passes it, else the mean,
    as transformers' ``ForCausalLMLoss``) and ``logits=None``; in eval mode, without labels (generation) or
    with ``logits_to_keep`` the original forward runs unchanged. With ``bonus_rho=0`` the loss is the
    library's (label-smoothed) cross-entropy, to float rounding.

    Args:
        model: a transformers ``*ForCausalLM`` whose ``get_output_embeddings()`` is an ``nn.Linear`` (tied to
            the input embeddings or not).
        log_end, bonus, bonus_start, bonus_gamma, bonus_rho, smoothing, bonus_smoothing, ignore_index: the EL
            settings, as :func:`transformers_el.loss.encouraging_lm_loss`.
        chunk_rows: tokens per chunk (default: a chunk of logits about the size of the hidden states).

    Calling it again on an enabled model replaces the settings. ``fused_el_settings(model)`` returns the live
    settings (``fused_el_settings(model).bonus_rho = 0.5`` between steps). ``ValueError`` (one line) for a
    model it cannot serve: output embeddings that are not a floating-point ``nn.Linear``, logits
    post-processed after the projection (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``,
    ``lm_head_multiplier``, ``output_logit_soft_cap``, ``unpadded_vocab_size``), encoder-decoder models.
    """
    problem = _refusal(model)
    if problem is not None:
        raise ValueError(problem)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an integer >= 1 or None, got {chunk_rows!r}")
    settings = EncouragingLMLoss(log_end=log_end, bonus=bonus, bonus_start=bonus_start, bonus_gamma=bonus_gamma,
                                 bonus_rho=bonus_rho, smoothing=smoothing, bonus_smoothing=bonus_smoothing,
                                 ignore_index=ignore_index, shift_labels=True)
    wrapper = _wrapper(model)
    if wrapper is not None:
        wrapper.settings, wrapper.chunk_rows = settings, chunk_rows
        return model
    model.forward = _FusedForward(model, settings, model.__dict__.get("forward"), chunk_rows)
    return model


def disable_fused_el(model):
    """Undo :func:`enable_fused_el`: the model's forward is the one it had before. Returns ``model``
    (unchanged when the fused path is off)."""
    wrapper = _wrapper(model)
    if wrapper is not None:
        if wrapper.inner is not None:
            model.forward = wrapper.inner
        else:
            del model.forward
    return model


def is_fused_el_enabled(model) -> bool:
    """Whether :func:`enable_fused_el` is in force on ``model``."""
    return _wrapper(model) is not None


def fused_el_settings(model) -> Optional[EncouragingLMLoss]:
    """The live EL settings of the fused path of ``model`` (an :class:`EncouragingLMLoss`: assign
    ``bonus_rho`` and the others between steps, checked on assignment), or None when it is off."""
    wrapper = _wrapper(model)
    return None if wrapper is None else wrapper.settings
