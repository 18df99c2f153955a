"""EL_SPEC written out again, independently of the package, in float64.

Used as the oracle by the tests: it uses p (not log p) and plain Python
branches, exactly as the spec states the formulas.
"""
import math

import torch


def spec_bonus(p, kind="log", log_end=1.0, bonus_start=0.0, gamma=1.0):
    """b(p), EL_SPEC 2.1."""
    if kind == "power":
        return -p ** gamma
    if kind == "cosine":
        return torch.cos(math.pi * p) - 1.0

    def base(q):
        normal = torch.log(torch.clamp(1.0 - q, min=1e-5))
        if log_end >= 1.0:
            return normal
        le = log_end
        tangent = (q - le) / (le - 1.0) + math.log(1.0 - le)
        return torch.where(q <= le, normal, tangent)

    if bonus_start > 0:
        s = torch.tensor(bonus_start, dtype=p.dtype)
        return torch.where(p >= bonus_start, base(p) - base(s), torch.zeros_like(p))
    return base(p)


def spec_g(p, kind="log", log_end=1.0, bonus_start=0.0, gamma=1.0):
    """g = b'(p) p, EL_SPEC 3."""
    if kind == "power":
        return -gamma * p ** gamma
    if kind == "cosine":
        return -math.pi * torch.sin(math.pi * p) * p
    g = -p / (1.0 - p)
    g = torch.where(1.0 - p < 1e-5, torch.zeros_like(p), g)
    if log_end < 1.0:
        g = torch.where(p > log_end, p / (log_end - 1.0), g)
    if bonus_start > 0:
        g = torch.where(p < bonus_start, torch.zeros_like(p), g)
    return g


def spec_weights(target, V, eps):
    """w_y = 1 - eps + eps/V, w_k = eps/V (EL_SPEC 3), rows of zeros where target < 0."""
    w = torch.full(target.shape + (V,), eps / V, dtype=torch.float64)
    for idx in range(target.numel()):
        t = int(target.view(-1)[idx])
        if t < 0:
            w.view(-1, V)[idx] = 0.0
        else:
            w.view(-1, V)[idx, t] += 1.0 - eps
    return w


def spec_loss_rows(z, w, u=None, rho=1.0, **bonus):
    """EL with target weights w (sum_k w_k (-log p_k)) + rho * sum_k u_k b(p_k)."""
    u = w if u is None else u
    p = torch.softmax(z, -1)
    return (w * -torch.log(p)).sum(-1) + rho * (u * spec_bonus(p, **bonus)).sum(-1)


def spec_grad_rows(z, w, u=None, rho=1.0, **bonus):
    """d/dz of spec_loss_rows (EL_SPEC 3, generalised to separate bonus weights u, rho):
    p_j sum(w) - w_j + rho (u_j g_j - p_j S), S = sum_k u_k g_k."""
    u = w if u is None else u
    p = torch.softmax(z, -1)
    g = spec_g(p, **bonus)
    S = (u * g).sum(-1, keepdim=True)
    return p * w.sum(-1, keepdim=True) - w + rho * (u * g - p * S)


# ----------------------------------------------------------------------------- inputs the core's tests share

PAD = -100

KINDS = [
    dict(bonus="log", log_end=1.0),
    dict(bonus="log", log_end=0.75),
    dict(bonus="log", log_end=0.5),
    dict(bonus="log", log_end=1.0, bonus_start=0.3),
    dict(bonus="log", log_end=0.75, bonus_start=0.2),
    dict(bonus="power", bonus_gamma=2.0),
    dict(bonus="power", bonus_gamma=0.5),
    dict(bonus="cosine"),
]


def spec_kwargs(kw):
    """The spec functions' keywords for the loss keywords ``kw`` (one of ``KINDS``)."""
    return dict(kind=kw.get("bonus", "log"), log_end=kw.get("log_end", 1.0),
                bonus_start=kw.get("bonus_start", 0.0), gamma=kw.get("bonus_gamma", 1.0))


def make_batch(seed=0, n=24, V=11, confident=True):
    """Logits with padding, and rows whose target has p_y near 1 (clamp region)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.0
    t = torch.randint(0, V, (n,), generator=g)
    t[3] = PAD
    t[7] = PAD
    if confident:
        for row, margin in ((0, 8.0), (1, 12.0), (2, 22.0), (4, 25.0), (5, 40.0)):
            z[row, t[row]] += margin
    return z, t
