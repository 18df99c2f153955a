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


# ----------------------------------------------------------------------------- per-class weights


def _class_weight(V=11, seed=20):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(V, generator=g, dtype=torch.float64) * 2.0
    c[4] = 0.0  # a class that counts for nothing
    return c


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_weighted_rho_zero_is_torch_cross_entropy(eps, reduction, impl):
    """bonus_rho=0 with weight=c is F.cross_entropy(weight=c, label_smoothing=eps): class indices with
    ignore_index, and soft targets; values and gradients, every reduction."""
    z, t = make_batch(seed=21)
    c = _class_weight()
    q = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64), -1)
    for target in (t, q):
        grads = []
        for ours in (True, False):
            zz = z.clone().requires_grad_()
            if ours:
                out = encouraging_loss(zz, target, bonus_rho=0.0, smoothing=eps, reduction=reduction, weight=c,
                                       ignore_index=PAD, impl=impl)
            else:
                out = torch.nn.functional.cross_entropy(zz, target, weight=c, label_smoothing=eps,
                                                        reduction=reduction, ignore_index=PAD)
            (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads.append((out.detach(), zz.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_weighted_loss_and_gradient_equal_the_spec(kw, impl):
    """Weighted EL against the spec oracle with the target weights w c and u c (EL_SPEC 3's closed form with
    sum(w) != 1): every bonus kind (aggressive and conservative included), separate eps / eps_b, 'mean' over
    the sum of c_y of the non-ignored rows; soft targets over the number of rows."""
    el = partial(encouraging_loss, impl=impl)
    z, t = make_batch(seed=23)
    c = _class_weight()
    tt = torch.where(t == PAD, -1, t)
    w, u = spec_weights(tt, 11, 0.1) * c, spec_weights(tt, 11, 0.05) * c
    sk = spec_kwargs(kw)
    zz = z.clone().requires_grad_()
    loss = el(zz, t, smoothing=0.1, bonus_smoothing=0.05, bonus_rho=0.7, weight=c, **kw)
    loss.backward()
    den = c[t[t != PAD]].sum()
    torch.testing.assert_close(loss, spec_loss_rows(z, w, u, rho=0.7, **sk).sum() / den, rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, w, u, rho=0.7, **sk) / den, rtol=1e-6, atol=1e-12)
    assert (zz.grad[t == PAD] == 0).all()
    q = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(24), dtype=torch.float64) * 3, -1)
    zz = z.clone().requires_grad_()
    loss = el(zz, q, smoothing=0.1, bonus_smoothing=0.05, weight=c, **kw)
    loss.backward()
    wq, uq = (0.9 * q + 0.1 / 11) * c, (0.95 * q + 0.05 / 11) * c
    torch.testing.assert_close(loss, spec_loss_rows(z, wq, uq, **sk).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad, spec_grad_rows(z, wq, uq, **sk) / len(q), rtol=1e-6, atol=1e-12)


def test_weighted_parts_are_weighted_and_reduced_like_the_loss(impl):
    z, t = make_batch(seed=25)
    c = _class_weight()
    parts = encouraging_loss(z, t, log_end=0.75, smoothing=0.1, weight=c, return_parts=True, impl=impl)
    rows = encouraging_loss(z, t, log_end=0.75, smoothing=0.1, weight=c, reduction="none", return_parts=True,
                            impl=impl)
    valid = t != PAD
    den = c[t[valid]].sum()
    lp = torch.log_softmax(z, -1)
    nll_rows = torch.where(valid, -c[t.clamp(min=0)] * lp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(rows.nll_loss, nll_rows)
    torch.testing.assert_close(parts.nll_loss, nll_rows.sum() / den)
    torch.testing.assert_close(parts.bonus, rows.bonus.sum() / den)
    smoothed = (0.9 * nll_rows - 0.1 / 11 * (lp * c).sum(-1)) * valid
    torch.testing.assert_close(parts.loss, (smoothed.sum() + rows.bonus.sum()) / den)
    assert parts.bonus < 0


@pytest.mark.parametrize("kw", [dict(bonus="log", log_end=0.75), dict(bonus="log", bonus_start=0.3),
                                dict(bonus="cosine")], ids=["conservative", "aggressive", "cosine"])
def test_weight_of_ones_equals_no_weight(kw, impl):
    z, t = make_batch(seed=26)
    q = torch.softmax(z.flip(0), -1)
    for target in (t, q):
        outs = []
        for weight in (None, torch.ones(11, dtype=torch.float64)):
            zz = z.clone().requires_grad_()
            parts = encouraging_loss(zz, target, smoothing=0.1, weight=weight, return_parts=True, impl=impl, **kw)
            parts.loss.backward()
            outs.append(list(parts) + [zz.grad])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kw", [dict(log_end=0.75, smoothing=0.1), dict(bonus_start=0.3, smoothing=0.1,
                                                                         bonus_smoothing=0.0),
                                dict(bonus="power", bonus_gamma=2.0)], ids=["conservative", "aggressive", "power"])
def test_weighted_gradcheck(kw, impl):
    g = torch.Generator().manual_seed(27)
    z = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 3, PAD, 5, 1])
    c = torch.tensor([0.5, 2.0, 0.0, 1.0, 1.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: encouraging_loss(x, t, weight=c, impl=impl, **kw), (z,))
    assert torch.autograd.gradcheck(lambda x: encouraging_loss(x, t, weight=c, reduction="none", impl=impl, **kw),
                                    (z,))
    q = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: encouraging_loss(x, p, weight=c, impl=impl, **kw), (z, q))


def test_weighted_mean_with_nothing_counted_is_zero(impl):
    """All targets ignored, or every counted target's class weighted 0: the mean is 0 (not NaN), its gradient 0."""
    z, t = make_batch(seed=28)
    c = _class_weight()
    zz = z.clone().requires_grad_()
    out = encouraging_loss(zz, torch.full_like(t, PAD), weight=c, impl=impl)
    out.backward()
    assert out == 0 and (zz.grad == 0).all()
    out = encouraging_loss(z, torch.full_like(t, 4), weight=c, smoothing=0.1, impl=impl)
    assert out == 0


@pytest.mark.parametrize("weight, message", [
    ([1.0] * 11, "weight must be None or a 1-D floating-point tensor of per-class weights, got list"),
    (torch.ones(11, 1), "weight must be a 1-D tensor of per-class weights, got shape (11, 1)"),
    (torch.ones(11, dtype=torch.long), "weight must be a floating-point tensor, got dtype torch.int64"),
    (torch.ones(10), "weight must hold one weight per class, 11 (the logits' last dimension), got 10"),
    (torch.tensor([1.0] * 10 + [-0.5]), "weight must hold finite values >= 0, got -0.5 for class 10"),
    (torch.tensor([1.0, float("nan")] + [1.0] * 9), "weight must hold finite values >= 0, got nan for class 1"),
    (torch.tensor([float("inf")] + [1.0] * 10), "weight must hold finite values >= 0, got inf for class 0"),
    (torch.ones(11, requires_grad=True), "weight must not require grad (the loss is not differentiated with "
                                         "respect to the class weights, as in F.cross_entropy): pass weight.detach()"),
])
def test_bad_weights_give_one_line_errors(weight, message, impl):
    z, t = make_batch(seed=29)
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t, weight=weight, impl=impl)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^--class-weights "):  # a caller's name for it
        encouraging_loss(z, t, weight=weight, impl=impl, names={"weight": "--class-weights"})


def test_weight_on_another_device_is_refused():
    z, t = make_batch(seed=30)
    with pytest.raises(ValueError, match=r"^weight must be on the logits' device cpu, got meta$"):
        encouraging_loss(z, t, weight=torch.ones(11, device="meta"))
