"""encouraging_loss.functional (``encouraging_loss(...)``) against EL_SPEC's formulas (written out
in spec_formulas.py), with both implementations (``impl='fused'`` and ``'reference'``): loss, gradient, bonus
kinds, smoothing, soft targets, reductions, precision, non-finite rows."""
from functools import partial

import pytest
import torch

from encouraging_loss import encouraging_loss

from spec_formulas import KINDS, PAD, make_batch, spec_bonus, spec_grad_rows, spec_kwargs, spec_loss_rows, spec_weights


@pytest.fixture(params=["fused", "reference"])
def impl(request):
    """Both implementations must match the spec."""
    return request.param


@pytest.mark.parametrize("log_end", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_and_gradient_equal_the_spec(log_end, eps, impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch()
    p = torch.softmax(z, -1)
    p_y = p[torch.arange(len(t)), t.clamp(min=0)]
    assert (1 - p_y[[2, 4, 5]] < 1e-5).all(), "rows in the clamp region"
    zz = z.clone().requires_grad_()
    loss = el(zz, t, log_end=log_end, smoothing=eps, reduction="sum")
    loss.backward()
    w = spec_weights(torch.where(t == PAD, -1, t), z.shape[-1], eps)
    torch.testing.assert_close(loss, spec_loss_rows(z, w, log_end=log_end).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, w, log_end=log_end), rtol=1e-6, atol=1e-12)
    assert (zz.grad[t == PAD] == 0).all()


def test_hard_targets_no_smoothing_is_eq6(impl):
    """EL = -log p_y + b(p_y), row by row."""
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=1)
    rows = el(z, t, log_end=0.75, reduction="none")
    p = torch.softmax(z, -1)
    for i in range(len(t)):
        if t[i] == PAD:
            assert rows[i] == 0
            continue
        py = p[i, t[i]]
        expected = -torch.log(py) + spec_bonus(py, log_end=0.75)
        torch.testing.assert_close(rows[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_every_bonus_kind_equals_the_spec(kw, eps, impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=2)
    zz = z.clone().requires_grad_()
    loss = el(zz, t, smoothing=eps, reduction="sum", **kw)
    loss.backward()
    w = spec_weights(torch.where(t == PAD, -1, t), z.shape[-1], eps)
    sk = spec_kwargs(kw)
    torch.testing.assert_close(loss, spec_loss_rows(z, w, **sk).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, w, **sk), rtol=1e-6, atol=1e-12)


def test_separate_bonus_smoothing_and_rho(impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=3)
    zz = z.clone().requires_grad_()
    loss = el(zz, t, log_end=0.75, smoothing=0.1, bonus_smoothing=0.0, bonus_rho=0.5, reduction="sum")
    loss.backward()
    tt = torch.where(t == PAD, -1, t)
    w, u = spec_weights(tt, 11, 0.1), spec_weights(tt, 11, 0.0)
    torch.testing.assert_close(loss, spec_loss_rows(z, w, u, rho=0.5, log_end=0.75).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, w, u, rho=0.5, log_end=0.75), rtol=1e-6, atol=1e-12)


def test_rho_zero_is_label_smoothed_cross_entropy(impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=4)
    ours = el(z, t, smoothing=0.1, bonus_rho=0.0, ignore_index=PAD)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(z, t, label_smoothing=0.1, ignore_index=PAD))


def test_soft_targets_equal_eq_2_4(impl):
    el = partial(encouraging_loss, impl=impl)
    z, _ = make_batch(seed=5)
    q = torch.softmax(torch.randn(z.shape, dtype=torch.float64) * 3, -1)
    zz = z.clone().requires_grad_()
    loss = el(zz, q, log_end=0.75, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, spec_loss_rows(z, q, log_end=0.75).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, q, log_end=0.75), rtol=1e-6, atol=1e-12)
    # one-hot soft targets are hard targets
    t = torch.randint(0, z.shape[-1], (z.shape[0],))
    onehot = torch.nn.functional.one_hot(t, z.shape[-1]).double()
    torch.testing.assert_close(el(z, onehot, smoothing=0.1), el(z, t, smoothing=0.1))


def test_reductions_and_parts(impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=6)
    z3, t3 = z.view(4, 6, 11), t.view(4, 6)
    rows = el(z3, t3, log_end=0.5, smoothing=0.1, reduction="none", return_parts=True)
    assert rows.loss.shape == (4, 6)
    total = el(z3, t3, log_end=0.5, smoothing=0.1, reduction="sum", return_parts=True)
    mean = el(z3, t3, log_end=0.5, smoothing=0.1, reduction="mean")
    n = int((t != PAD).sum())
    torch.testing.assert_close(total.loss, rows.loss.sum())
    torch.testing.assert_close(mean, rows.loss.sum() / n)
    p = torch.softmax(z, -1)
    valid = t != PAD
    nll = -torch.log(p[valid, t[valid]]).sum()
    torch.testing.assert_close(total.nll_loss, nll)
    w = spec_weights(torch.where(t == PAD, -1, t), 11, 0.1)
    torch.testing.assert_close(total.bonus, (w * spec_bonus(p, log_end=0.5)).sum())
    assert total.bonus < 0
    # everything ignored: mean is 0, not NaN
    assert el(z, torch.full_like(t, PAD)) == 0


@pytest.mark.parametrize("kw", KINDS + [dict(bonus="log", log_end=0.5, smoothing=0.1, bonus_smoothing=0.05)],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gradcheck(kw, impl):
    el = partial(encouraging_loss, impl=impl)
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 3, PAD, 5, 1])
    kw = dict(kw)
    kw.setdefault("smoothing", 0.1)
    assert torch.autograd.gradcheck(lambda x: el(x, t, reduction="none", **kw), (z,))
    q = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: el(x, q, **kw), (z,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_half_precision_large_logits_are_finite(dtype, kw, impl):
    el = partial(encouraging_loss, impl=impl)
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(16, 50, generator=g) * 1e4).clamp(-6e4, 6e4).to(dtype).requires_grad_()
    t = torch.randint(0, 50, (16,), generator=g)
    t[0] = PAD
    out = el(z, t, smoothing=0.1, return_parts=True, **kw)
    assert out.loss.dtype == torch.float32
    assert all(torch.isfinite(v) for v in out)
    out.loss.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    # and it is the float32 computation
    torch.testing.assert_close(out.loss, el(z.detach().float(), t, smoothing=0.1, **kw))


def test_non_finite_logits_give_nan_rows_only(impl):
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=10, confident=False)
    z = z.float()
    z[0, 1] = float("nan")
    z[1, 2] = float("inf")
    z[2, (t[2] + 1) % 11] = float("-inf")  # a class ruled out: finite without smoothing
    rows = el(z, t, log_end=0.75, reduction="none")
    assert torch.isnan(rows[0]) and torch.isnan(rows[1])
    assert torch.isfinite(rows[2:]).all()
    assert torch.isnan(el(z, t))
    # with smoothing, -log p of the ruled-out class is +inf, as in F.cross_entropy
    smoothed = el(z, t, log_end=0.75, smoothing=0.1, reduction="none")
    assert smoothed[2] == float("inf") and torch.isfinite(smoothed[3:]).all()
    ce = torch.nn.functional.cross_entropy(z[2:3], t[2:3], label_smoothing=0.1)
    assert ce == float("inf")
