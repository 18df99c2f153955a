"""Output projection and Encouraging Loss fused: ``hidden @ W^T (+ b) -> EL``
without the ``N x V`` logits ever stored in full.

For large vocabularies the logits (and their gradient) dominate the memory of
a training step: 8192 tokens x 32000 classes are 1 GB in float32, held from
the forward pass to the backward pass. Here the rows are processed in chunks
of ``C`` rows: the chunk's logits are computed, the fused EL kernel
(:mod:`encouraging_loss.ops.fused`, EL_SPEC 3) turns them into the loss and,
in place, into their gradient, and that gradient is folded at once into the
gradients of the hidden states (``dL/dh = G W``) and of the weight
(``dL/dW += G^T h``, accumulated in float32). What is kept for the backward
pass is ``N x H + V x H``, not ``N x V``; the backward pass only scales
them by ``grad_output`` (a scalar: the loss is reduced to a sum or a mean,
which is what makes the early gradients valid).

Cost: the same three matrix products as the unfused step, plus the fused
EL on chunks; memory: one ``C x V`` chunk of logits instead of ``N x V``
logits and gradient. The default ``C`` makes a chunk about as large as the
hidden states (``C = ceil(N / ceil(V / H))``), as in Liger-Kernel's fused
linear cross-entropy; on CPU it is rounded up to a multiple of the compiled
back end's fixed chunk.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..bonus import BonusConfig, _name
from ..checks import PENDING, check_choice, check_settings, check_target_range, deferred_check, param_names
from ..reference import reference_rows
from .fused import (
    COMPILED_ROWS,
    _compute_dtype,
    _forward_rows,
    _needs_plain_graph,
    _not_differentiable_again,
    select_backend,
)

__all__ = ["LinearELParts", "FusedLinearELFunction", "fused_linear_encouraging_loss", "linear_el_checked",
           "default_chunk_rows"]

#: reductions of the fused projection: the gradients are formed in the forward
#: pass, which needs the same ``grad_output`` for every row.
LINEAR_REDUCTIONS = ("mean", "sum")


class LinearELParts(NamedTuple):
    """The loss, its two logged terms (as :class:`encouraging_loss.functional.ELParts`,
    reduced like the loss), and the number of non-ignored rows whose arg-max is
    the target (a tensor; fairseq's ``--report-accuracy``)."""

    loss: torch.Tensor
    nll_loss: torch.Tensor
    bonus: torch.Tensor
    n_correct: torch.Tensor


def default_chunk_rows(N: int, V: int, H: int, device: str = "cuda") -> int:
    """Rows per chunk: a chunk of logits about the size of the hidden states; on
    CPU a multiple of the compiled back end's fixed chunk (:data:`COMPILED_ROWS`
    rows: smaller chunks would be padded to it)."""
    rows = max(1, min(N, math.ceil(N / max(1, math.ceil(V / max(H, 1))))))
    if device == "cpu":
        rows = min(N, math.ceil(rows / COMPILED_ROWS) * COMPILED_ROWS)
    return rows


class FusedLinearELFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, target, cfg, eps, eps_b, ignore_index, mean, chunk_rows)``
    on 2-D ``hidden`` (``N x H``), ``weight`` (``V x H``), ``bias`` (``V``) or
    None, class indices ``target`` (``N``); returns ``(loss, nll, bonus,
    n_correct)``, scalars, summed (or averaged over the non-ignored rows with
    ``mean``); only ``loss`` is differentiable (first order only)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, cfg, eps, eps_b, ignore_index, mean, chunk_rows):
        N, H = hidden.shape
        V = weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        want = need_h or need_w or need_b
        cdt = _compute_dtype(hidden.dtype)
        dev = hidden.device
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        h = hidden if hidden.is_contiguous() else hidden.contiguous()
        t = target if target.is_contiguous() else target.contiguous()
        sums = torch.zeros(3, dtype=cdt, device=dev)  # loss, nll, bonus
        n_correct = torch.zeros((), dtype=torch.int64, device=dev)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros((V, H), dtype=acc, device=dev) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=dev) if (need_b and bias is not None) else None
        C = int(chunk_rows) if chunk_rows else default_chunk_rows(N, V, H, dev.type)
        backend = None
        for r0 in range(0, N, C):
            r1 = min(N, r0 + C)
            hc, tc = h[r0:r1], t[r0:r1]
            logits = F.linear(hc, weight, bias)
            if backend is None:
                backend = select_backend(logits)
            hit = (logits.argmax(-1) == tc) & (tc != ignore_index)
            n_correct += hit.sum()
            (lo, nl, bo), g = _forward_rows(
                logits, tc, cfg, eps, eps_b, ignore_index, False, backend, need_grad=want,
                out=logits if (want and backend == "triton") else None,  # Triton: the gradient replaces the logits
            )
            sums += torch.stack([lo.sum(), nl.sum(), bo.sum()])
            if want:
                if need_h:
                    torch.mm(g, weight, out=grad_h[r0:r1])
                if need_w:
                    if g.dtype == acc:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w.add_(torch.mm(g.t(), hc))
                if grad_b is not None:
                    grad_b.add_(g.sum(0, dtype=acc))
            del logits, g
        if mean:
            count = (t != ignore_index).sum().clamp(min=1)
            scale = 1.0 / count.to(cdt)
        else:
            scale = torch.ones((), dtype=cdt, device=dev)
        out = sums * scale
        loss, nll, bonus = out[0].clone(), out[1].clone(), out[2].clone()
        # the loss (an output) anchors a second differentiation
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale, loss)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(nll, bonus, n_correct)
        return loss, nll, bonus, n_correct

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_h, grad_w, grad_b, scale, anchor = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        create_graph = torch.is_grad_enabled()
        hd, wd, bd = ctx.dtypes
        with torch.no_grad():
            s = grad_loss.to(scale.dtype) * scale
            dh = (grad_h * s.to(grad_h.dtype)) if grad_h is not None else None
            dw = (grad_w * s.to(grad_w.dtype)).to(wd) if grad_w is not None else None
            db = (grad_b * s.to(grad_b.dtype)).to(bd) if grad_b is not None else None
        if create_graph:
            dh, dw, db = _not_differentiable_again((dh, dw, db), anchor)
        return (dh, dw, db) + (None,) * 7


def _check_linear_inputs(hidden, weight, bias, target, ignore_index, names):
    for label, value in (("hidden", hidden), ("weight", weight), (_name(names, "target"), target)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{label} must be a tensor, got {type(value).__name__}")
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden must be a floating-point tensor of shape (..., H), "
                         f"got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with H = {hidden.shape[-1]} (the hidden size), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight and hidden must have the same dtype, got {weight.dtype} and {hidden.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != weight.dtype):
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor of dtype {weight.dtype}, got {got}")
    tname = _name(names, "target")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise ValueError(
            f"{tname} must hold class indices (an integer tensor) for the fused projection, got dtype {target.dtype} "
            "(soft targets: compute the logits and use encouraging_loss)"
        )
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"{tname} must have shape {tuple(hidden.shape[:-1])} (hidden without its last dimension), "
                         f"got {tuple(target.shape)}")
    check_target_range(target, weight.shape[0], ignore_index, tname, deferred_check(hidden, select_backend(hidden)))


def linear_el_checked(hidden, weight, bias, target, cfg, smoothing, bonus_smoothing, ignore_index, reduction,
                      return_parts=False, chunk_rows=None, names=None):
    """:func:`fused_linear_encouraging_loss` with settings already checked by
    :func:`encouraging_loss.functional.check_settings` (what the fairseq
    criterion calls every step; the tensors are still checked)."""
    names = param_names(names)
    PENDING.poll()
    check_choice(reduction, LINEAR_REDUCTIONS, "reduction", names)
    _check_linear_inputs(hidden, weight, bias, target, ignore_index, names)
    eps = smoothing
    eps_b = eps if bonus_smoothing is None else bonus_smoothing
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    t = target.reshape(-1)
    if _needs_plain_graph(h, weight, *(() if bias is None else (bias,))):
        logits = F.linear(h, weight, bias)  # torch.func / forward AD: the plain formula
        loss, nll, bonus, valid = reference_rows(logits, t, cfg, eps, eps_b, ignore_index, False)
        n_correct = ((logits.argmax(-1) == t) & valid).sum()
        count = valid.sum().clamp(min=1) if reduction == "mean" else 1
        parts = LinearELParts(loss.sum() / count, nll.sum() / count, bonus.sum() / count, n_correct)
    else:
        parts = LinearELParts(*FusedLinearELFunction.apply(
            h, weight, bias, t, cfg, float(eps), float(eps_b), int(ignore_index), reduction == "mean", chunk_rows,
        ))
    return parts if return_parts else parts.loss


def fused_linear_encouraging_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
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
    chunk_rows: Optional[int] = None,
    names=None,
):
    """Encouraging Loss of ``hidden @ weight.T + bias`` against class indices
    ``target`` (EL_SPEC 2.3), the logits computed and consumed chunk by chunk.

    Args:
        hidden: ``(..., H)`` features (a decoder's last hidden states).
        weight: ``(V, H)`` output projection (an ``nn.Linear``'s weight, or
            shared input embeddings); same dtype as ``hidden``.
        target: class indices of shape ``hidden.shape[:-1]``.
        bias: ``(V,)`` or None.
        reduction: ``"mean"`` (over non-ignored rows) or ``"sum"``;
            ``"none"`` is not available (the gradients are formed in the
            forward pass).
        return_parts: return :class:`LinearELParts` (loss, NLL, bonus, number
            of correct arg-max predictions).
        chunk_rows: rows per chunk (default :func:`default_chunk_rows`).

    The other settings are those of
    :func:`encouraging_loss.functional.encouraging_loss`. Same value and
    gradients as ``encouraging_loss(F.linear(hidden, weight, bias), target, ...)``
    up to rounding; first-order gradients only.
    """
    names = param_names(names)
    cfg = BonusConfig(kind=bonus, log_end=log_end, bonus_start=bonus_start, gamma=bonus_gamma, rho=bonus_rho)
    check_choice(reduction, LINEAR_REDUCTIONS, "reduction", names)
    cfg, eps, eps_b, ignore_index = check_settings(
        cfg, smoothing, bonus_smoothing, ignore_index, "mean", "fused", names)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"{_name(names, 'chunk_rows')} must be an integer >= 1 or None, got {chunk_rows!r}")
    return linear_el_checked(hidden, weight, bias, target, cfg, eps, eps_b, ignore_index, reduction,
                             return_parts, chunk_rows, names)
