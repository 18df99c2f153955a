"""The core loss against EL_SPEC's formulas (written out in spec_formulas.py)."""
import math
from functools import partial

import pytest
import torch

from encouraging_loss import BonusConfig, EncouragingLoss, bonus_rho_at, bonus_value, encouraging_loss
from encouraging_loss.bonus import bonus_grad
from spec_formulas import spec_bonus, spec_g, spec_grad_rows, spec_loss_rows, spec_weights

PAD = -100


@pytest.fixture(params=["fused", "reference"])
def impl(request):
    """Both implementations must match the spec."""
    return request.param
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


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bonus_functions_equal_the_spec(kw):
    p = torch.cat([torch.linspace(1e-6, 1 - 1e-6, 997, dtype=torch.float64),
                   torch.tensor([0.2, 0.3, 0.5, 0.75, 1 - 1e-5, 1 - 2e-6], dtype=torch.float64)])
    cfg = BonusConfig(kind=kw.get("bonus", "log"), log_end=kw.get("log_end", 1.0),
                      bonus_start=kw.get("bonus_start", 0.0), gamma=kw.get("bonus_gamma", 1.0))
    lp = torch.log(p)
    torch.testing.assert_close(bonus_value(lp, cfg), spec_bonus(p, **spec_kwargs(kw)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bonus_grad(lp, cfg), spec_g(p, **spec_kwargs(kw)), rtol=1e-9, atol=1e-12)


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


def test_module_equals_functional_and_rho_can_change():
    z, t = make_batch(seed=7)
    mod = EncouragingLoss(log_end=0.75, smoothing=0.1)
    torch.testing.assert_close(mod(z, t), encouraging_loss(z, t, log_end=0.75, smoothing=0.1))
    mod.bonus_rho = 0.0
    torch.testing.assert_close(mod(z, t), encouraging_loss(z, t, log_end=0.75, smoothing=0.1, bonus_rho=0.0))
    with pytest.raises(ValueError, match="bonus_rho must be a finite number >= 0, got -1"):
        mod.bonus_rho = -1
    assert "log_end=0.75" in repr(mod)


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


BAD = [
    (dict(log_end=1.5), "log_end must be in (0, 1], got 1.5"),
    (dict(log_end=0), "log_end must be in (0, 1], got 0"),
    (dict(log_end=float("nan")), "log_end must be in (0, 1], got nan"),
    (dict(smoothing=1.0), "smoothing must be in [0, 1), got 1.0"),
    (dict(smoothing=-0.1), "smoothing must be in [0, 1), got -0.1"),
    (dict(bonus_smoothing=1.2), "bonus_smoothing must be in [0, 1), got 1.2"),
    (dict(bonus_start=1.0), "bonus_start must be in [0, 1), got 1.0"),
    (dict(bonus_start=-0.5), "bonus_start must be in [0, 1), got -0.5"),
    (dict(bonus="focal"), "bonus must be one of log, power, cosine, got 'focal'"),
    (dict(bonus="power", bonus_gamma=0), "bonus_gamma must be a finite number > 0, got 0"),
    (dict(bonus_rho=-1.0), "bonus_rho must be a finite number >= 0, got -1.0"),
    (dict(reduction="avg"), "reduction must be one of none, mean, sum, got 'avg'"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_raise_value_error(kwargs, message):
    z, t = make_batch()
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t, **kwargs)
    assert message in str(err.value)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError) as err:
            EncouragingLoss(**kwargs)
        assert message in str(err.value)


def test_unknown_impl_is_refused():
    z, t = make_batch()
    with pytest.raises(ValueError, match="impl must be one of fused, reference, got 'fast'"):
        encouraging_loss(z, t, impl="fast")
    with pytest.raises(ValueError, match="impl must be one of fused, reference, got 'fast'"):
        EncouragingLoss(impl="fast")


def test_names_map_parameters_to_flags():
    z, t = make_batch()
    with pytest.raises(ValueError, match=r"--log-end must be in \(0, 1\], got 1.5"):
        encouraging_loss(z, t, log_end=1.5, names={"log_end": "--log-end"})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda z, t: (z, torch.where(t == PAD, 11, t)), "target holds class index 11, outside [0, 11)"),
        (lambda z, t: (z, torch.where(t == PAD, -3, t)), "target holds class index -3, outside [0, 11)"),
        (lambda z, t: (z, t[:-1]), "target of class indices must have shape (24,)"),
        (lambda z, t: (z, z[:, :-1].softmax(-1)), "soft target must have the logits' shape (24, 11), got (24, 10)"),
        (lambda z, t: (z.long(), t), "logits must be a floating-point tensor, got dtype torch.int64"),
        (lambda z, t: (z, t > 0), "target must hold class indices (an integer tensor), got dtype torch.bool"),
        (lambda z, t: (z.tolist(), t), "logits and target must be tensors, got list and Tensor"),
    ],
)
def test_bad_tensors_raise_value_error(make, message):
    z, t = make(*make_batch())
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t)
    assert message in str(err.value)


def test_bonus_schedule():
    assert bonus_rho_at(1.0, 1) == 1.0
    assert bonus_rho_at(1.0, 2, defer_start=2) == 0.0
    assert bonus_rho_at(1.0, 3, defer_start=2) == 1.0
    assert bonus_rho_at(2.0, 5, schedule="linear", max_epoch=10) == pytest.approx(1.0)
    assert bonus_rho_at(1.0, 5, schedule="cosine", max_epoch=10) == pytest.approx(0.5)
    assert bonus_rho_at(1.0, 10, schedule="cosine", max_epoch=10) == pytest.approx(1.0)
    assert bonus_rho_at(1.0, 5, schedule="exp", max_epoch=10) == pytest.approx(math.exp(-2.5))
    with pytest.raises(ValueError, match="schedule linear ramps the bonus over epochs and needs max_epoch > 0, got 0"):
        bonus_rho_at(1.0, 5, schedule="linear")
    with pytest.raises(ValueError, match="schedule must be one of none, linear, cosine, exp, got 'step'"):
        bonus_rho_at(1.0, 5, schedule="step", max_epoch=3)
