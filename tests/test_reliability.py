"""The loss never gives a silently wrong result (issue 6).

* A property-style sweep over random settings, shapes, dtypes, hard / soft
  targets, ignore indices and ``create_graph``: the fused implementation gives
  the reference's loss, logit gradient and soft-target gradient; a second
  differentiation gives the reference's second-order gradient or, for
  ``fused``, the promised error (never a gradient that silently ignores it).
* ``torch.func`` transforms and forward-mode AD give the reference's results.
* Every bad setting is refused where it enters, by the name the caller used.
"""
import math
import random

import numpy as np
import pytest
import torch

import encouraging_loss.ops.fused as fused
from encouraging_loss import EncouragingLoss, encouraging_loss
from encouraging_loss.bonus import BonusConfig, bonus_rho_at, check_schedule
from encouraging_loss.ops.fused import TWICE_MESSAGE

SETTINGS = [
    dict(log_end=1.0), dict(log_end=0.75), dict(log_end=0.5, bonus_rho=0.7), dict(bonus_start=0.3),
    dict(log_end=0.75, bonus_start=0.2), dict(bonus="power", bonus_gamma=2.0), dict(bonus="power", bonus_gamma=0.5),
    dict(bonus="cosine"), dict(bonus_rho=0.0),
]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _case(seed):
    """A random case: settings, shape, dtype, targets, ignore index, reduction."""
    rng = random.Random(seed)
    kw = dict(rng.choice(SETTINGS))
    kw["smoothing"] = rng.choice([0.0, 0.1, 0.3])
    kw["bonus_smoothing"] = rng.choice([None, 0.0, 0.05])
    kw["reduction"] = rng.choice(["mean", "sum", "none"])
    V = rng.choice([1, 2, 7, 33, 130])
    lead = rng.choice([(5,), (3, 4), (2, 1, 3), (0,)])
    dtype = rng.choice([torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16])
    soft = rng.random() < 0.4
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, V, generator=gen, dtype=torch.float64) * rng.choice([0.5, 3.0, 8.0])).to(dtype)
    if soft:
        q = torch.softmax(torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2, -1)
        if rng.random() < 0.5:  # rows need not sum to 1 (e.g. smoothed / mixed targets)
            q = q * rng.choice([0.5, 1.5])
        t = q.to(rng.choice([dtype, torch.float64]) if dtype == torch.float64 else dtype)
        kw["ignore_index"] = -100
    else:
        t = torch.randint(0, V, lead, generator=gen)
        ignore = rng.choice([-100, 0, V - 1, -1])  # an ignored class may be a real class index
        if t.numel():
            t.view(-1)[:: rng.choice([2, 3, 5])] = ignore
        kw["ignore_index"] = ignore
    return kw, z, t, soft


def _first_and_second_order(z, t, soft, kw, impl, create_graph):
    """Loss, logit gradient, target gradient (soft) and the gradient of a
    penalty on the logit gradient (``create_graph``), through a linear layer so
    that the penalty's gradient reaches a parameter."""
    x = z.clone().requires_grad_()
    w = torch.ones((), dtype=z.dtype, requires_grad=True)  # a scale parameter before the loss
    tt = t.clone().requires_grad_() if soft else t
    loss = encouraging_loss(x * w, tt, impl=impl, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    total = (loss * go).sum()
    inputs = (x, tt) if soft else (x,)
    grads = torch.autograd.grad(total, inputs, create_graph=create_graph, allow_unused=True)
    second = None
    if create_graph:
        penalty = grads[0].float().pow(2).sum()
        (second,) = torch.autograd.grad(penalty, w, allow_unused=True)
    return loss, grads, second


@pytest.mark.parametrize("seed", range(60))
def test_property_sweep_fused_equals_reference(seed):
    kw, z, t, soft = _case(seed)
    create_graph = seed % 3 == 0
    tol = TOL[z.dtype]
    ref = _first_and_second_order(z, t, soft, kw, "reference", create_graph)
    if create_graph:
        with pytest.raises(RuntimeError) as err:
            _first_and_second_order(z, t, soft, kw, "fused", create_graph)
        assert TWICE_MESSAGE in str(err.value)
        assert ref[2] is None or torch.isfinite(ref[2]).all()
    out = _first_and_second_order(z, t, soft, kw, "fused", False)
    torch.testing.assert_close(out[0], ref[0], atol=tol, rtol=tol)
    for a, b in zip(out[1], ref[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def test_double_backward_penalty_is_refused_not_ignored():
    """The issue's probe: ``loss + 10 * |dL/dW|^2`` through a linear layer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (16,), generator=gen)
    w0 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "fused"):
        w = w0.clone().requires_grad_()
        loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        grads[impl] = g.detach()
        if impl == "fused":
            with pytest.raises(RuntimeError, match="cannot be differentiated again"):
                (loss + 10 * g.pow(2).sum()).backward()
            loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            with pytest.raises(RuntimeError, match=r"Use impl='reference'"):
                g.pow(2).sum().backward()
            loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            with pytest.raises(RuntimeError, match="cannot be differentiated again"):
                torch.autograd.grad(g.pow(2).sum(), w, allow_unused=True)
        else:
            (loss + 10 * g.pow(2).sum()).backward()
            penalised = w.grad.clone()
            w.grad = None
            loss2 = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            loss2.backward()
            assert (penalised - w.grad).abs().max() > 1e-3  # the penalty has a gradient
    torch.testing.assert_close(grads["fused"], grads["reference"])  # first order still right


def test_create_graph_without_second_use_gives_the_right_gradient():
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    (g_f,) = torch.autograd.grad(encouraging_loss(z, t, log_end=0.5), z, create_graph=True)
    (g_r,) = torch.autograd.grad(encouraging_loss(z, t, log_end=0.5, impl="reference"), z)
    torch.testing.assert_close(g_f.detach(), g_r)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_torch_func_transforms_match_the_reference(soft):
    from torch.func import grad, jacrev, vmap

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 7, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, 6, 7, generator=gen, dtype=torch.float64), -1) if soft \
        else torch.randint(0, 7, (4, 6), generator=gen)
    kw = dict(log_end=0.75, smoothing=0.1)
    for impl in ("fused", "reference"):
        g = grad(lambda x: encouraging_loss(x, t, impl=impl, **kw))(z)
        per = vmap(lambda x, y: encouraging_loss(x, y, impl=impl, **kw))(z, t)
        jac = jacrev(lambda x: encouraging_loss(x[0], t[0], impl=impl, reduction="none", **kw))(z)
        if impl == "fused":
            results = (g, per, jac)
    torch.testing.assert_close(results[0], g)
    torch.testing.assert_close(results[1], per)
    torch.testing.assert_close(results[2], jac)


def test_forward_mode_ad_matches_the_reference():
    import torch.autograd.forward_ad as fwAD

    z = torch.randn(5, 8, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.randint(0, 8, (5,))
    tangents = []
    for impl in ("fused", "reference"):
        with fwAD.dual_level():
            out = encouraging_loss(fwAD.make_dual(z, v), t, log_end=0.5, impl=impl)
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[0], tangents[1])


def test_soft_target_gradient_is_linear_in_the_target():
    """EL_SPEC 2.4: d loss / d q_k = -(1 - eps) log p_k + rho (1 - eps_b) b(p_k)."""
    from encouraging_loss.bonus import bonus_value

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), -1).requires_grad_()
    encouraging_loss(z, q, log_end=0.5, bonus_rho=0.7, smoothing=0.1, bonus_smoothing=0.2, reduction="sum").backward()
    lp = torch.log_softmax(z, -1)
    expected = -(1 - 0.1) * lp + 0.7 * (1 - 0.2) * bonus_value(lp, BonusConfig(log_end=0.5))
    torch.testing.assert_close(q.grad, expected)


def test_soft_target_gradient_only_when_asked(monkeypatch):
    calls = []
    original = fused._soft_target_grad
    monkeypatch.setattr(fused, "_soft_target_grad", lambda *a: calls.append(1) or original(*a))
    z = torch.randn(4, 6, requires_grad=True)
    q = torch.softmax(torch.randn(4, 6), -1)
    encouraging_loss(z, q).backward()
    assert calls == [] and q.grad is None
    q.requires_grad_()
    encouraging_loss(z.detach(), q).backward()  # the target alone may require grad
    assert calls == [1] and q.grad is not None


# -- every bad value refused by its own name ------------------------------------------

def _batch():
    return torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, -100])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ignore_index=1.5), "ignore_index must be an integer, got 1.5"),
        (dict(ignore_index=None), "ignore_index must be an integer, got None"),
        (dict(ignore_index=True), "ignore_index must be an integer, got True"),
        (dict(ignore_index="pad"), "ignore_index must be an integer, got 'pad'"),
        (dict(bonus="nope"), "bonus must be one of log, power, cosine, got 'nope'"),
        (dict(bonus="power", bonus_gamma=0), "bonus_gamma must be a finite number > 0, got 0"),
        (dict(bonus_gamma=float("inf")), "bonus_gamma must be a finite number > 0, got inf"),
        (dict(bonus_rho=-1), "bonus_rho must be a finite number >= 0, got -1"),
        (dict(bonus_rho=float("nan")), "bonus_rho must be a finite number >= 0, got nan"),
        (dict(log_end=np.float32(1.5)), "log_end must be in (0, 1], got np.float32(1.5)"),
        (dict(log_end="0.5"), "log_end must be in (0, 1], got '0.5'"),
        (dict(log_end=True), "log_end must be in (0, 1], got True"),
        (dict(smoothing=float("nan")), "smoothing must be in [0, 1), got nan"),
        (dict(smoothing=torch.tensor([0.1, 0.2])), "smoothing must be in [0, 1), got tensor([0.1000, 0.2000])"),
        (dict(bonus_smoothing=1.5), "bonus_smoothing must be in [0, 1), got 1.5"),
        (dict(reduction="avg"), "reduction must be one of none, mean, sum, got 'avg'"),
        (dict(impl="fast"), "impl must be one of fused, reference, got 'fast'"),
    ],
)
def test_bad_values_named_as_the_caller_spelled_them(kwargs, message):
    z, t = _batch()
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t, **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        EncouragingLoss(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), 0.5],
    ids=["np.float32", "np.float64", "tensor32", "tensor64", "float"],
)
def test_numbers_of_any_real_type_are_numbers(value):
    z, t = _batch()
    expected = encouraging_loss(z, t, log_end=0.5, smoothing=0.5, bonus_rho=0.5)
    got = encouraging_loss(z, t, log_end=value, smoothing=value, bonus_rho=value, bonus_smoothing=value)
    torch.testing.assert_close(got, expected)
    m = EncouragingLoss(log_end=value, smoothing=value, bonus_rho=value)
    assert m.log_end == 0.5 and type(m.log_end) is float and type(m.smoothing) is float
    torch.testing.assert_close(m(z, t), expected)
    for index in (np.int64(-100), torch.tensor(-100)):
        torch.testing.assert_close(encouraging_loss(z, t, ignore_index=index), encouraging_loss(z, t))


def test_ignore_index_is_one_value_for_both_implementations():
    """The issue's case: 1.5 used to be accepted and the two implementations disagreed."""
    z, t = _batch()
    for impl in ("fused", "reference"):
        with pytest.raises(ValueError, match="ignore_index must be an integer, got 1.5"):
            encouraging_loss(z, t, ignore_index=1.5, impl=impl)
    t = torch.tensor([0, 1, 2, 3, 4, 4])
    a = encouraging_loss(z, t, ignore_index=4, impl="fused")
    b = encouraging_loss(z, t, ignore_index=4, impl="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "attr, value, message",
    [
        ("smoothing", 1.5, "smoothing must be in [0, 1), got 1.5"),
        ("smoothing", float("nan"), "smoothing must be in [0, 1), got nan"),
        ("bonus_smoothing", -0.1, "bonus_smoothing must be in [0, 1), got -0.1"),
        ("ignore_index", 1.5, "ignore_index must be an integer, got 1.5"),
        ("reduction", "avg", "reduction must be one of none, mean, sum, got 'avg'"),
        ("impl", "fast", "impl must be one of fused, reference, got 'fast'"),
        ("log_end", 0.0, "log_end must be in (0, 1], got 0.0"),
        ("bonus", "focal", "bonus must be one of log, power, cosine, got 'focal'"),
        ("bonus_start", 1.0, "bonus_start must be in [0, 1), got 1.0"),
        ("bonus_gamma", -2.0, "bonus_gamma must be a finite number > 0, got -2.0"),
        ("bonus_rho", -1.0, "bonus_rho must be a finite number >= 0, got -1.0"),
        ("cfg", "log", "cfg must be a BonusConfig, got str"),
    ],
)
def test_module_attributes_are_checked_when_set(attr, value, message):
    m = EncouragingLoss(log_end=0.75, smoothing=0.1)
    z, t = _batch()
    before = m(z, t)
    with pytest.raises(ValueError) as err:
        setattr(m, attr, value)
    assert str(err.value) == message
    torch.testing.assert_close(m(z, t), before)  # the bad value never took effect


def test_module_attributes_set_to_good_values_take_effect():
    z, _ = _batch()
    t = torch.tensor([0, 1, 2, 3, 4, 4])
    m = EncouragingLoss()
    m.smoothing, m.log_end, m.bonus_rho, m.ignore_index, m.reduction = 0.1, 0.5, 0.7, 4, "sum"
    m.bonus_smoothing = 0.05
    expected = encouraging_loss(
        z, t, smoothing=0.1, log_end=0.5, bonus_rho=0.7, ignore_index=4, reduction="sum", bonus_smoothing=0.05
    )
    torch.testing.assert_close(m(z, t), expected)
    m.impl = "reference"
    torch.testing.assert_close(m(z, t), expected)


def test_plugin_names_reach_the_module():
    m = EncouragingLoss(names={"log_end": "--log-end", "rho": "--bonus-rho"})
    with pytest.raises(ValueError, match=r"^--log-end must be in \(0, 1\], got 2$"):
        m.log_end = 2
    with pytest.raises(ValueError, match=r"^--bonus-rho must be a finite number >= 0, got -1$"):
        m.bonus_rho = -1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exp_rate=float("nan")), "exp_rate must be a finite number > 0, got nan"),
        (dict(exp_rate=-1e9), "exp_rate must be a finite number > 0, got -1000000000.0"),
        (dict(exp_rate=0), "exp_rate must be a finite number > 0, got 0"),
        (dict(defer_start=-1), "defer_start must be an integer >= 0, got -1"),
        (dict(defer_start=1.5), "defer_start must be an integer >= 0, got 1.5"),
        (dict(schedule="linear"), "schedule linear ramps the bonus over epochs and needs max_epoch > 0, got 0"),
        (dict(schedule="step"), "schedule must be one of none, linear, cosine, exp, got 'step'"),
    ],
)
def test_schedule_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError) as err:
        check_schedule(**kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError):
        bonus_rho_at(1.0, 3, **kwargs)


def test_exp_schedule_never_overflows():
    for rate in (1e-6, 5.0, 1e300):
        for epoch in range(1, 12):
            rho = bonus_rho_at(1.0, epoch, schedule="exp", max_epoch=10, exp_rate=rate)
            assert 0.0 <= rho <= 1.0 and math.isfinite(rho)


def test_forced_triton_backend_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("EL_FUSED_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EL_TRITON_INTERPRET", raising=False)
    z, t = _batch()
    with pytest.raises(ValueError, match=r"^EL_FUSED_BACKEND=triton needs CUDA tensors, got logits on cpu"):
        encouraging_loss(z.requires_grad_(), t)
