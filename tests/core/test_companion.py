"""The companion losses (encouraging_loss.companion) against EL_SPEC 2.5 written
out again here in float64 from p (not log p), with plain Python branches."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import encouraging_loss
from encouraging_loss import (
    FocalLoss,
    HaltedFocalLoss,
    MirrorMSELoss,
    focal_loss,
    halted_focal_loss,
    mirror_mse_loss,
)
from encouraging_loss.companion import FocalConfig, check_companion_settings, focal_value

from spec_formulas import spec_weights

PAD = -100


# ------------------------------------------------------------------ the spec, by hand


def spec_focal(p, gamma):
    return -(1.0 - p) ** gamma * torch.log(p)


def spec_halted(p, gamma, h):
    """EL_SPEC 2.5 / Eq. 12."""
    shifted = -torch.log(p) + math.log(h) - (1.0 - h) ** gamma * math.log(h)
    return torch.where(p < h, spec_focal(p, gamma), shifted)


def spec_mse_rows(z, y, activation, rho, g):
    """EL_SPEC 2.5 / Table 5: per row, the mean over classes of the squared error plus rho * mirror bonus."""
    u = torch.softmax(z, -1) if activation == "softmax" else torch.sigmoid(z)
    mse = (y * (1 - u) ** 2 + (1 - y) * u ** 2).mean(-1)
    mirror = -(y * u ** g + (1 - y) * (1 - u) ** g).mean(-1)
    return mse + rho * mirror


def two_class_logits(p):
    """Logits of V = 2 classes whose softmax is ``(p, 1 - p)`` exactly (float64)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.stack([torch.log(p), torch.log1p(-p)], -1)


def make_batch(seed=0, n=20, V=7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.0
    t = torch.randint(0, V, (n,), generator=g)
    t[3] = PAD
    t[11] = PAD
    for row, margin in ((0, 6.0), (1, 15.0), (2, 30.0)):
        z[row, t[row]] += margin  # well-classified rows
    return z, t


def soft_batch(seed=1, n=9, V=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.0
    q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 3.0, -1)
    return z, q


# ------------------------------------------------------------------ halted focal loss (Eq. 12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("h", [0.3, 0.5, 0.8])
def test_halted_focal_is_focal_below_h_and_shifted_ce_above(gamma, h):
    p = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    t = torch.zeros(len(p), dtype=torch.long)
    loss = halted_focal_loss(two_class_logits(p), t, gamma=gamma, halt=h, reduction="none")
    below, above = p < h, p >= h
    assert below.any() and above.any()
    torch.testing.assert_close(loss, spec_halted(p, gamma, h), rtol=1e-12, atol=1e-14)
    # below h: exactly the focal loss, ours and the spec's
    focal = focal_loss(two_class_logits(p), t, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss[below], focal[below], rtol=1e-12, atol=0)
    torch.testing.assert_close(focal, spec_focal(p, gamma), rtol=1e-12, atol=1e-14)
    # above h: cross-entropy plus the constant log h - (1 - h)**gamma log h
    shift = math.log(h) - (1 - h) ** gamma * math.log(h)
    ce = F.cross_entropy(two_class_logits(p), t, reduction="none")
    torch.testing.assert_close(loss[above], ce[above] + shift, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("h", [0.2, 0.5, 0.9])
def test_halted_focal_is_continuous_at_the_halting_point(gamma, h):
    at_h = -(1 - h) ** gamma * math.log(h)  # focal(h) = the shifted CE at h
    p = torch.tensor([h * (1 - 1e-9), h, h * (1 + 1e-9)], dtype=torch.float64)
    loss = halted_focal_loss(two_class_logits(p), torch.zeros(3, dtype=torch.long), gamma=gamma, halt=h,
                             reduction="none")
    print(f"gamma={gamma} h={h}: loss just below / at / just above h = {loss.tolist()}, focal(h) = {at_h}")
    torch.testing.assert_close(loss, torch.full_like(loss, at_h), rtol=0, atol=1e-8)
    # the jump in the slope: focal's derivative below, CE's (-1/p) above
    lp = torch.log(p).requires_grad_()
    focal_value(lp, gamma, h).sum().backward()
    assert lp.grad[2].item() == pytest.approx(-1.0)  # d(-log p)/d(log p)
    focal_slope = -(1 - h) ** gamma + gamma * (1 - h) ** (gamma - 1) * h * math.log(h)
    assert lp.grad[0].item() == pytest.approx(focal_slope, rel=1e-6)


def test_halted_focal_gradient_above_h_is_cross_entropy():
    z, t = make_batch()
    keep = t != PAD
    p_y = torch.softmax(z, -1)[keep].gather(1, t[keep, None]).squeeze(1)
    h = 0.4
    above = p_y >= h
    assert above.sum() >= 3 and (~above).sum() >= 3
    za = z[keep][above].clone().requires_grad_()
    halted_focal_loss(za, t[keep][above], halt=h, reduction="sum").backward()
    zc = z[keep][above].clone().requires_grad_()
    F.cross_entropy(zc, t[keep][above], reduction="sum").backward()
    torch.testing.assert_close(za.grad, zc.grad, rtol=1e-12, atol=1e-15)


def test_gamma_zero_is_cross_entropy():
    z, t = make_batch()
    ce = F.cross_entropy(z, t, ignore_index=PAD)
    torch.testing.assert_close(focal_loss(z, t, gamma=0.0, ignore_index=PAD), ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(halted_focal_loss(z, t, gamma=0.0, ignore_index=PAD), ce, rtol=1e-12, atol=0)
    ls = F.cross_entropy(z, t, ignore_index=PAD, label_smoothing=0.1)  # torch smooths with eps / V too
    torch.testing.assert_close(focal_loss(z, t, gamma=0.0, smoothing=0.1, ignore_index=PAD), ls, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ smoothing, soft targets, ignore_index


@pytest.mark.parametrize("loss_fn, spec", [
    (lambda z, t, **kw: focal_loss(z, t, gamma=2.0, **kw), lambda p: spec_focal(p, 2.0)),
    (lambda z, t, **kw: halted_focal_loss(z, t, gamma=2.0, halt=0.5, **kw), lambda p: spec_halted(p, 2.0, 0.5)),
    (lambda z, t, **kw: halted_focal_loss(z, t, gamma=1.5, halt=0.3, **kw), lambda p: spec_halted(p, 1.5, 0.3)),
], ids=["focal", "halted-0.5", "halted-0.3"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_focal_losses_with_smoothing_are_sum_over_the_smoothed_target(loss_fn, spec, eps):
    z, t = make_batch()
    V = z.shape[-1]
    w = spec_weights(torch.where(t == PAD, -1, t), V, eps)
    rows = (w * spec(torch.softmax(z, -1))).sum(-1)
    torch.testing.assert_close(loss_fn(z, t, smoothing=eps, ignore_index=PAD, reduction="none"), rows,
                               rtol=1e-10, atol=1e-14)
    keep = t != PAD
    torch.testing.assert_close(loss_fn(z, t, smoothing=eps, ignore_index=PAD), rows[keep].mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_fn(z, t, smoothing=eps, ignore_index=PAD, reduction="sum"), rows.sum(),
                               rtol=1e-10, atol=0)
    # soft targets q: sum_k q_k f(p_k), smoothed the same way
    zs, q = soft_batch()
    Vs = zs.shape[-1]
    wq = (1 - eps) * q + eps / Vs
    torch.testing.assert_close(loss_fn(zs, q, smoothing=eps, reduction="none"),
                               (wq * spec(torch.softmax(zs, -1))).sum(-1), rtol=1e-10, atol=1e-14)


def test_ignore_index_rows_count_for_nothing():
    z, t = make_batch()
    keep = t != PAD
    for fn in (focal_loss, halted_focal_loss, mirror_mse_loss):
        rows = fn(z, t, ignore_index=PAD, reduction="none")
        assert rows.shape == t.shape and (rows[~keep] == 0).all()
        torch.testing.assert_close(fn(z, t, ignore_index=PAD), fn(z[keep], t[keep]), rtol=1e-12, atol=0)
        all_ignored = fn(z, torch.full_like(t, PAD), ignore_index=PAD)
        assert all_ignored.item() == 0.0
        # another ignore_index value
        t7 = torch.where(keep, t, 7)
        torch.testing.assert_close(fn(torch.cat([z, torch.zeros_like(z[:, :1])], 1), t7, ignore_index=7),
                                   fn(torch.cat([z, torch.zeros_like(z[:, :1])], 1)[keep], t[keep]),
                                   rtol=1e-12, atol=0)


def test_parts_hold_the_plain_nll():
    z, t = make_batch()
    nll = F.cross_entropy(z, t, ignore_index=PAD)
    for fn in (focal_loss, halted_focal_loss, mirror_mse_loss):
        parts = fn(z, t, ignore_index=PAD, smoothing=0.1, return_parts=True)
        torch.testing.assert_close(parts.nll_loss, nll, rtol=1e-12, atol=0)
        torch.testing.assert_close(parts.loss, fn(z, t, ignore_index=PAD, smoothing=0.1), rtol=0, atol=0)
    parts = mirror_mse_loss(z, t, activation="sigmoid", ignore_index=PAD, reduction="sum", return_parts=True)
    torch.testing.assert_close(parts.nll_loss, F.cross_entropy(z, t, ignore_index=PAD, reduction="sum"),
                               rtol=1e-12, atol=0)


# ------------------------------------------------------------------ MSE with the mirror bonus (Table 5)


def test_mse_mirror_bonus_hand_computed_numbers():
    y = torch.tensor([0])
    # softmax u = (0.75, 0.25): mse = mean(0.25**2, 0.25**2) = 0.0625; bonus = -mean(0.75**2, 0.75**2) = -0.5625
    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert mirror_mse_loss(z, y, mirror_rho=0.0).item() == pytest.approx(0.0625, abs=1e-15)
    assert mirror_mse_loss(z, y).item() == pytest.approx(0.0625 - 0.5625, abs=1e-15)
    assert mirror_mse_loss(z, y, mirror_rho=0.5, mirror_gamma=3.0).item() == \
        pytest.approx(0.0625 - 0.5 * 0.75 ** 3, abs=1e-15)
    # sigmoid u = (0.5, 0.75): mse = mean(0.5**2, 0.75**2) = 0.40625; bonus = -mean(0.5**2, 0.25**2) = -0.15625
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert mirror_mse_loss(z, y, activation="sigmoid", mirror_rho=0.0).item() == pytest.approx(0.40625, abs=1e-15)
    assert mirror_mse_loss(z, y, activation="sigmoid").item() == pytest.approx(0.40625 - 0.15625, abs=1e-15)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("rho, g", [(0.0, 2.0), (1.0, 2.0), (0.5, 3.0), (2.0, 1.0)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mse_mirror_bonus_equals_the_spec(activation, rho, g, eps):
    z, t = make_batch()
    V = z.shape[-1]
    keep = t != PAD
    y = spec_weights(torch.where(t == PAD, -1, t), V, eps)
    rows = torch.where(keep, spec_mse_rows(z, y, activation, rho, g), 0.0)
    kw = dict(activation=activation, mirror_rho=rho, mirror_gamma=g, smoothing=eps, ignore_index=PAD)
    torch.testing.assert_close(mirror_mse_loss(z, t, reduction="none", **kw), rows, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(mirror_mse_loss(z, t, **kw), rows[keep].mean(), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(mirror_mse_loss(z, t, reduction="sum", **kw), rows.sum(), rtol=1e-10, atol=1e-15)
    zs, q = soft_batch()
    ys = (1 - eps) * q + eps / zs.shape[-1]
    torch.testing.assert_close(mirror_mse_loss(zs, q, reduction="none", **kw),
                               spec_mse_rows(zs, ys, activation, rho, g), rtol=1e-10, atol=1e-15)


def test_mirror_bonus_rewards_confident_correct_outputs():
    """The bonus is <= 0 and largest in size where the prediction is right and sure."""
    z, t = make_batch()
    keep = t != PAD
    plain = mirror_mse_loss(z[keep], t[keep], mirror_rho=0.0, reduction="none")
    bonus = mirror_mse_loss(z[keep], t[keep], mirror_rho=1.0, reduction="none") - plain
    assert (bonus < 0).all() and (bonus >= -1).all()
    sure = bonus[1:3]  # rows with margins 15 and 30 on the target: u = y, the full bonus -1
    torch.testing.assert_close(sure, torch.full_like(sure, -1.0), rtol=0, atol=1e-3)
    assert sure.max() < bonus[3:].min()


# ------------------------------------------------------------------ gradients and numerics


GRADCHECK = [
    ("focal", lambda z, t, **kw: focal_loss(z, t, gamma=2.0, **kw)),
    ("focal-0.5", lambda z, t, **kw: focal_loss(z, t, gamma=0.5, **kw)),
    ("halted", lambda z, t, **kw: halted_focal_loss(z, t, gamma=2.0, halt=0.5, **kw)),
    ("mse-softmax", lambda z, t, **kw: mirror_mse_loss(z, t, activation="softmax", **kw)),
    ("mse-sigmoid", lambda z, t, **kw: mirror_mse_loss(z, t, activation="sigmoid", mirror_gamma=3.0, **kw)),
]


@pytest.mark.parametrize("name, fn", GRADCHECK, ids=[n for n, _ in GRADCHECK])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradcheck(name, fn, eps):
    z, t = make_batch(n=12, V=5)
    z = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, t, smoothing=eps, ignore_index=PAD, reduction="none"), (z,))
    zs, q = soft_batch(n=4, V=5)
    zs = zs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, q, smoothing=eps), (zs,))


def test_focal_is_accurate_for_well_classified_examples():
    """1 - p is -expm1(log p): no cancellation beyond log_softmax's own rounding where p is near 1."""
    m = torch.tensor([10.0, 15.0, 20.0], dtype=torch.float64)
    z = torch.zeros(3, 4, dtype=torch.float64)
    z[:, 0] = m
    t = torch.zeros(3, dtype=torch.long)
    a = 3 * torch.exp(-m)  # p = 1 / (1 + a): 1 - p = a / (1 + a), -log p = log1p(a), exactly
    expected = (a / (1 + a)) ** 2 * torch.log1p(a)
    torch.testing.assert_close(focal_loss(z, t, reduction="none"), expected, rtol=1e-6, atol=0)
    lp = torch.log_softmax(z, -1)[:, 0]
    torch.testing.assert_close(focal_value(lp, 3.0), (a / (1 + a)) ** 3 * torch.log1p(a), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saturated_probabilities_give_finite_gradients(dtype):
    z = torch.zeros(4, 5)
    z[0, 0], z[1, 1], z[2, 2] = 1e4, 200.0, 30.0  # p rounds to 1 in float32
    z = z.to(dtype).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    for fn in (lambda a, b: focal_loss(a, b, gamma=0.5), lambda a, b: halted_focal_loss(a, b, gamma=0.5),
               mirror_mse_loss, lambda a, b: mirror_mse_loss(a, b, activation="sigmoid", mirror_gamma=0.5)):
        z.grad = None
        loss = fn(z, t)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(z.grad).all()


def test_nan_logits_give_nan_rows_only():
    z, t = make_batch()
    z[5, 2] = float("nan")
    for fn in (focal_loss, halted_focal_loss, mirror_mse_loss):
        rows = fn(z, t, ignore_index=PAD, reduction="none")
        assert torch.isnan(rows[5]) and torch.isfinite(rows[torch.arange(len(t)) != 5]).all()


# ------------------------------------------------------------------ modules and settings


def test_modules_equal_functions_and_settings_can_change():
    z, t = make_batch()
    m = HaltedFocalLoss(gamma=1.0, halt=0.3, smoothing=0.1, ignore_index=PAD)
    torch.testing.assert_close(m(z, t), halted_focal_loss(z, t, gamma=1.0, halt=0.3, smoothing=0.1, ignore_index=PAD),
                               rtol=0, atol=0)
    m.halt, m.gamma, m.reduction = 0.6, 2.0, "sum"
    torch.testing.assert_close(m(z, t), halted_focal_loss(z, t, halt=0.6, smoothing=0.1, ignore_index=PAD,
                                                          reduction="sum"), rtol=0, atol=0)
    f = FocalLoss(gamma=3.0, ignore_index=PAD)
    torch.testing.assert_close(f(z, t, return_parts=True).loss, focal_loss(z, t, gamma=3.0, ignore_index=PAD))
    mse = MirrorMSELoss(activation="sigmoid", mirror_rho=0.5, ignore_index=PAD)
    torch.testing.assert_close(mse(z, t), mirror_mse_loss(z, t, activation="sigmoid", mirror_rho=0.5,
                                                          ignore_index=PAD), rtol=0, atol=0)
    mse.mirror_rho, mse.activation = 0.0, "softmax"
    torch.testing.assert_close(mse(z, t), mirror_mse_loss(z, t, mirror_rho=0.0, ignore_index=PAD), rtol=0, atol=0)
    assert repr(HaltedFocalLoss()) == "HaltedFocalLoss(gamma=2.0, halt=0.5, smoothing=0.0, reduction='mean')"
    assert repr(MirrorMSELoss()) == \
        "MirrorMSELoss(activation='softmax', mirror_rho=1.0, mirror_gamma=2.0, smoothing=0.0, reduction='mean')"
    # bad assignments fail where they are made, and leave the setting as it was
    for obj, attr, value, message in [
        (m, "halt", 1.0, "halt must be in (0, 1), got 1.0"),
        (m, "halt", None, "halt must be in (0, 1), got None"),
        (f, "gamma", -1, "gamma must be a finite number >= 0, got -1"),
        (mse, "activation", "tanh", "activation must be one of softmax, sigmoid, got 'tanh'"),
        (mse, "mirror_gamma", 0.0, "mirror_gamma must be a finite number > 0, got 0.0"),
        (mse, "smoothing", 1.0, "smoothing must be in [0, 1), got 1.0"),
        (mse, "reduction", "avg", "reduction must be one of none, mean, sum, got 'avg'"),
        (f, "ignore_index", 1.5, "ignore_index must be an integer, got 1.5"),
    ]:
        before = getattr(obj, attr)
        with pytest.raises(ValueError, match=re.escape(message)):
            setattr(obj, attr, value)
        assert getattr(obj, attr) == before


BAD = [
    (focal_loss, dict(gamma=-0.5), "gamma must be a finite number >= 0, got -0.5"),
    (focal_loss, dict(gamma=float("inf")), "gamma must be a finite number >= 0, got inf"),
    (focal_loss, dict(gamma="2"), "gamma must be a finite number >= 0, got '2'"),
    (halted_focal_loss, dict(halt=0.0), "halt must be in (0, 1), got 0.0"),
    (halted_focal_loss, dict(halt=1.0), "halt must be in (0, 1), got 1.0"),
    (halted_focal_loss, dict(halt=None), "halt must be in (0, 1), got None"),
    (halted_focal_loss, dict(smoothing=-0.1), "smoothing must be in [0, 1), got -0.1"),
    (mirror_mse_loss, dict(activation="relu"), "activation must be one of softmax, sigmoid, got 'relu'"),
    (mirror_mse_loss, dict(mirror_rho=-1.0), "mirror_rho must be a finite number >= 0, got -1.0"),
    (mirror_mse_loss, dict(mirror_gamma=0), "mirror_gamma must be a finite number > 0, got 0"),
    (mirror_mse_loss, dict(reduction="batchmean"), "reduction must be one of none, mean, sum, got 'batchmean'"),
    (mirror_mse_loss, dict(ignore_index=None), "ignore_index must be an integer, got None"),
    (HaltedFocalLoss, dict(halt=2), "halt must be in (0, 1), got 2"),
    (FocalLoss, dict(gamma=True), "gamma must be a finite number >= 0, got True"),
    (MirrorMSELoss, dict(mirror_rho=float("nan")), "mirror_rho must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_settings_raise_value_error_naming_the_parameter(fn, kwargs, message):
    z, t = make_batch()
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs) if isinstance(fn, type) else fn(z, t, **kwargs)


def test_names_map_parameters_to_flags():
    z, t = make_batch()
    names = {"gamma": "--focal-gamma", "halt": "--halt-point", "target": "labels"}
    with pytest.raises(ValueError, match=re.escape("--halt-point must be in (0, 1), got 1.5")):
        halted_focal_loss(z, t, halt=1.5, names=names)
    with pytest.raises(ValueError, match=re.escape("--focal-gamma must be a finite number >= 0, got -1")):
        HaltedFocalLoss(gamma=-1, names=names)
    with pytest.raises(ValueError, match=re.escape("labels holds class index 7, outside [0, 7)")):
        focal_loss(z, torch.full_like(t, 7), names=names)
    with pytest.raises(ValueError, match=re.escape("cfg must be a FocalConfig or a MirrorMSEConfig")):
        check_companion_settings(object(), 0.0, -100, "mean")
    assert FocalConfig(gamma=1, halt=0.5).validate() == FocalConfig(gamma=1.0, halt=0.5)


def test_bad_tensors_raise_value_error():
    z, t = make_batch()
    with pytest.raises(ValueError, match="logits must be a floating-point tensor"):
        focal_loss(z.long(), t)
    with pytest.raises(ValueError, match=re.escape("soft target must have the logits' shape")):
        mirror_mse_loss(z, torch.rand(3, 2, dtype=torch.float64))


def test_exported_lazily_from_the_package():
    for name in ("FocalLoss", "HaltedFocalLoss", "MirrorMSELoss", "focal_loss", "halted_focal_loss",
                 "mirror_mse_loss", "CompanionParts"):
        assert name in encouraging_loss.__all__
        assert getattr(encouraging_loss, name).__module__ == "encouraging_loss.companion"
    for fn, where in ((focal_loss, "Lin et al."), (halted_focal_loss, "Eq. 12"), (mirror_mse_loss, "Table 5")):
        assert where in fn.__doc__


# ------------------------------------------------------------------ per-class weights


def _class_weight(V=7):
    return torch.tensor([0.5, 2.0, 0.0, 1.0, 1.5, 0.25, 3.0][:V], dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_weighted_gamma_zero_is_weighted_cross_entropy(eps, reduction):
    """focal / halted focal at gamma 0 with weight=c are F.cross_entropy(weight=c, label_smoothing=eps):
    class indices with ignore_index, and soft targets, every reduction, values and gradients."""
    z, t = make_batch()
    c = _class_weight()
    _, q = soft_batch(n=len(t), V=7)
    for target in (t, q):
        ce_z = z.clone().requires_grad_()
        ce = F.cross_entropy(ce_z, target, weight=c, label_smoothing=eps, reduction=reduction, ignore_index=PAD)
        ce.sum().backward()
        for fn in (focal_loss, lambda *a, **kw: halted_focal_loss(*a, halt=0.5, **kw)):
            zz = z.clone().requires_grad_()
            out = fn(zz, target, gamma=0.0, smoothing=eps, reduction=reduction, ignore_index=PAD, weight=c)
            out.sum().backward()
            torch.testing.assert_close(out, ce.detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(zz.grad, ce_z.grad, rtol=1e-12, atol=1e-14)


def test_weighted_focal_and_mse_equal_the_spec():
    """Focal: sum_k c_k w_k f(p_k); MSE with the mirror bonus: the row times sum_k c_k y_k; 'mean' over the
    sum of c_y of the counted rows (soft targets: over the rows); the logged NLL weighted the same way."""
    z, t = make_batch()
    c = _class_weight()
    p = torch.softmax(z, -1)
    valid = t != PAD
    den = c[t[valid]].sum()
    w = spec_weights(torch.where(valid, t, -1), 7, 0.1)
    parts = focal_loss(z, t, gamma=2.0, smoothing=0.1, weight=c, return_parts=True)
    torch.testing.assert_close(parts.loss, (w * c * spec_focal(p, 2.0)).sum() / den, rtol=1e-12, atol=0)
    nll = -(torch.log(p[valid, t[valid]]) * c[t[valid]]).sum() / den
    torch.testing.assert_close(parts.nll_loss, nll, rtol=1e-12, atol=0)
    rows = halted_focal_loss(z, t, gamma=2.0, halt=0.5, weight=c, reduction="none")
    expected = torch.where(valid, c[t.clamp(min=0)] * spec_halted(p.gather(1, t.clamp(min=0)[:, None])[:, 0], 2.0,
                                                                    0.5), 0.0)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-14)
    for activation in ("softmax", "sigmoid"):
        out = mirror_mse_loss(z, t, activation=activation, mirror_rho=0.5, smoothing=0.1, weight=c)
        spec = spec_mse_rows(z, w, activation, 0.5, 2.0) * (w * c).sum(-1)
        torch.testing.assert_close(out, spec[valid].sum() / den, rtol=1e-12, atol=0)
    _, q = soft_batch(n=len(t), V=7)
    out = mirror_mse_loss(z, q, mirror_rho=0.5, weight=c)
    torch.testing.assert_close(out, (spec_mse_rows(z, q, "softmax", 0.5, 2.0) * (q * c).sum(-1)).mean(),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("name, fn", [
    ("focal", lambda x, t, **kw: focal_loss(x, t, gamma=2.0, **kw)),
    ("halted", lambda x, t, **kw: halted_focal_loss(x, t, gamma=2.0, halt=0.5, **kw)),
    ("mse", lambda x, t, **kw: mirror_mse_loss(x, t, mirror_rho=0.5, **kw)),
])
def test_weighted_companions_gradcheck_and_ones_equal_no_weight(name, fn):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 3, PAD, 5, 1])
    c = _class_weight(6)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, smoothing=0.1, weight=c), (z,))
    for target in (t, torch.softmax(z.detach().flip(0), -1)):
        torch.testing.assert_close(fn(z, target, smoothing=0.1, weight=torch.ones(6, dtype=torch.float64)),
                                   fn(z, target, smoothing=0.1), rtol=1e-13, atol=1e-15)


def test_companion_modules_weight_buffer_switches_and_is_checked():
    z, t = make_batch()
    c = _class_weight()
    for module, fn in ((FocalLoss(gamma=2.0), lambda **kw: focal_loss(z, t, gamma=2.0, **kw)),
                       (HaltedFocalLoss(), lambda **kw: halted_focal_loss(z, t, **kw)),
                       (MirrorMSELoss(), lambda **kw: mirror_mse_loss(z, t, **kw))):
        plain = module(z, t)
        module.weight = c
        torch.testing.assert_close(module(z, t), fn(weight=c))
        assert not torch.allclose(module(z, t), plain)
        assert "weight=[0.5, 2.0, 0.0, 1.0, 1.5, 0.25, 3.0]" in repr(module)
        with pytest.raises(ValueError, match=r"^weight must hold finite values >= 0, got -1.0 for class 0$"):
            module.weight = torch.tensor([-1.0] + [1.0] * 6)
        torch.testing.assert_close(module(z, t), fn(weight=c))  # the bad value never took effect
        module.weight = None
        torch.testing.assert_close(module(z, t), plain)
    built = FocalLoss(weight=c, names={"weight": "--class-weight"})
    torch.testing.assert_close(built(z, t), focal_loss(z, t, weight=c))
    with pytest.raises(ValueError, match=r"^--class-weight must hold one weight per class, 7"):
        focal_loss(z, t, weight=torch.ones(3), names={"weight": "--class-weight"})
