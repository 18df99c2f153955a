"""The loss written as formulas under autograd: the reference that the fused
implementations (:mod:`encouraging_loss.ops`) are tested against and fall back
to under ``torch.func`` transforms, and the reduction of per-row losses.
Below both the functional API and the fused paths (no import circle).
"""
import torch

from .bonus import bonus_value

__all__ = ["reduce_rows", "reference_rows", "row_count"]


def reduce_rows(x: torch.Tensor, reduction: str, count) -> torch.Tensor:
    """``x`` reduced: as is (``"none"``), its sum, or its sum over ``count``
    (``"mean"``; a number, or a tensor from :func:`row_count`)."""
    if reduction == "none":
        return x
    total = x.sum()
    if reduction == "sum":
        return total
    if isinstance(count, tuple):  # weighted: (denominator, denominator > 0)
        den, positive = count
        return total / den * positive
    return total / count


def row_count(loss, valid, target=None, weight=None):
    """The denominator of ``reduction="mean"``, as ``F.cross_entropy`` takes it:
    the number of rows (soft targets), of non-ignored rows (class indices), or
    with class weights ``weight`` the sum of ``weight[y]`` over the
    non-ignored rows. All ignored (or a weight sum of 0) gives a mean of 0,
    not NaN. Without weights a number or tensor; with weights a pair that
    :func:`reduce_rows` reads, computed on the device (no synchronisation)."""
    if valid is None:
        return max(loss.numel(), 1)
    if weight is None:
        return valid.sum().clamp(min=1)
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    w_y = torch.where(valid, weight.to(loss.dtype)[t], torch.zeros((), dtype=loss.dtype, device=loss.device))
    den = w_y.sum()
    positive = den > 0
    return torch.where(positive, den, torch.ones_like(den)), positive.to(loss.dtype)


def reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, weight=None):
    """Per-row ``(loss, nll, bonus, valid)`` written as formulas under autograd
    (EL_SPEC 2.3 and 2.4): the reference the fused implementation is tested
    against, and what it falls back to under ``torch.func`` transforms.

    ``weight``: per-class weights ``c`` (``F.cross_entropy``'s ``weight``):
    every target weight is multiplied by the weight of its class, so a row is
    ``(1 - eps) c_y (-log p_y) + eps/V sum_k c_k (-log p_k) + rho [(1 - eps_b) c_y b(p_y)
    + eps_b/V sum_k c_k b(p_k)]`` (soft targets ``q``: ``q_k`` weighted by
    ``c_k``); ``nll`` is ``c_y (-log p_y)`` (``-sum_k c_k q_k log p_k``)."""
    if weight is not None:
        return _weighted_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, weight)
    x = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(x, dim=-1)
    V = lp.shape[-1]
    need_bonus = not cfg.is_zero
    if soft:
        q = target.to(lp.dtype)
        nll = -(q * lp).sum(-1)
        w = q if eps == 0 else (1.0 - eps) * q + eps / V
        smoothed = nll if eps == 0 else -(w * lp).sum(-1)
        if need_bonus:
            u = q if eps_b == 0 else (1.0 - eps_b) * q + eps_b / V
            bonus = (u * bonus_value(lp, cfg)).sum(-1)
        valid = None
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, torch.zeros_like(target)).long()
        lp_y = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = -lp_y
        smoothed = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * lp.sum(-1)
        if need_bonus:
            bonus = bonus_value(lp_y, cfg)
            if eps_b > 0:
                bonus = (1.0 - eps_b) * bonus + (eps_b / V) * bonus_value(lp, cfg).sum(-1)
    if need_bonus:
        bonus = cfg.rho * bonus
    else:
        bonus = torch.zeros_like(nll)
    loss = smoothed + bonus
    if valid is not None:
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
    return loss, nll, bonus, valid


def _weighted_rows(logits, target, cfg, eps, eps_b, ignore_index, soft, weight):
    """:func:`reference_rows` with per-class weights ``c``: the target weights
    ``w`` (NLL) and ``u`` (bonus) of EL_SPEC 2.3 / 2.4 multiplied by ``c``
    element-wise, as ``F.cross_entropy(weight=c, label_smoothing=eps)`` weights them."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(x, dim=-1)
    V = lp.shape[-1]
    c = weight.to(lp.dtype)
    need_bonus = not cfg.is_zero
    if soft:
        q = target.to(lp.dtype) * c
        nll = -(q * lp).sum(-1)
        smoothed = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * (c * lp).sum(-1)
        if need_bonus:
            u = q if eps_b == 0 else (1.0 - eps_b) * q + (eps_b / V) * c
            bonus = (u * bonus_value(lp, cfg)).sum(-1)
        valid = None
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, torch.zeros_like(target)).long()
        c_y = c[t]
        lp_y = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = -c_y * lp_y
        smoothed = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * (c * lp).sum(-1)
        if need_bonus:
            bonus = c_y * bonus_value(lp_y, cfg)
            if eps_b > 0:
                bonus = (1.0 - eps_b) * bonus + (eps_b / V) * (c * bonus_value(lp, cfg)).sum(-1)
    if need_bonus:
        bonus = cfg.rho * bonus
    else:
        bonus = torch.zeros_like(nll)
    loss = smoothed + bonus
    if valid is not None:
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss, nll, bonus = (torch.where(valid, v, zero) for v in (loss, nll, bonus))
    return loss, nll, bonus, valid
