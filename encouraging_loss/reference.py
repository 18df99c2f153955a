"""The loss written as formulas under autograd: the reference that the fused
implementations (:mod:`encouraging_loss.ops`) are tested against and fall back
to under ``torch.func`` transforms, and the reduction of per-row losses.
Below both the functional API and the fused paths (no import circle).
"""
import torch

from .bonus import bonus_value

__all__ = ["reduce_rows", "reference_rows"]


def reduce_rows(x: torch.Tensor, reduction: str, count) -> torch.Tensor:
    if reduction == "none":
        return x
    total = x.sum()
    if reduction == "sum":
        return total
    return total / count


def reference_rows(logits, target, cfg, eps, eps_b, ignore_index, soft):
    """Per-row ``(loss, nll, bonus, valid)`` written as formulas under autograd
    (EL_SPEC 2.3 and 2.4): the reference the fused implementation is tested
    against, and what it falls back to under ``torch.func`` transforms."""
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
