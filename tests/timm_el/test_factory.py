"""timm_el.factory: the hook on timm's loss factory (``loss_type='encouraging'`` and the paper's companion
losses ``'focal' | 'halted_focal' | 'mse' | 'mse_sigmoid'``, EL_SPEC 2.5): registered, installed and
removed again, equal to the core functions and the spec, timm's own losses untouched, bad settings refused;
and short MNIST trainings of timm's ``test_resnet`` through it (a few ms a step on 28x28 inputs).
"""
import inspect
import re

import numpy as np
import pytest
import timm.data
import timm.loss
import timm.loss._loss_factory
import timm.task
import timm.task.classification
import torch
import torch.nn as nn

import timm_el
from encouraging_loss import (
    FocalLoss,
    HaltedFocalLoss,
    MirrorMSELoss,
    encouraging_loss,
    focal_loss,
    halted_focal_loss,
    mirror_mse_loss,
)
from encouraging_loss.checks import IMPLS
from timm_el import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss, load_mnist
from timm_el.factory import COMPANION_KWARGS, COMPANION_LOSS_TYPES, create_companion_loss

from spec_formulas import spec_loss_rows, spec_weights

V = 10


TIMM_LOSS_MODULES = (timm.loss, timm.loss._loss_factory, timm.task, timm.task.classification)


def factory(*args, **kwargs):
    """Look the factory up through the module at call time, as timm's users do."""
    return timm.loss.create_classification_loss(*args, **kwargs)


def timm_original(*args, **kwargs):
    """timm's own factory, under the hook."""
    return timm.loss.create_classification_loss.__wrapped__(*args, **kwargs)


def test_loss_types_registered():
    for module in TIMM_LOSS_MODULES:
        if hasattr(module, "LOSS_TYPES"):
            types = module.LOSS_TYPES
            assert types.count("encouraging") == 1, module.__name__
            added = types.index("encouraging")
            assert types[:added] == ("ce", "bce", "asl", "poly", "jsd", "twoway", "zlpr", "db")
            assert types[added:] == ("encouraging", "focal", "halted_focal", "mse", "mse_sigmoid")
    assert "encouraging" not in timm.loss.MULTI_LABEL_LOSS_TYPES
    assert timm_el.is_installed()


def test_every_timm_reference_is_patched():
    hook = timm.loss.create_classification_loss
    for module in TIMM_LOSS_MODULES:
        assert module.create_classification_loss is hook, module.__name__
    # one layer of wrapping around timm's own function
    assert not hasattr(hook.__wrapped__, "_timm_el_original")
    assert hook.__wrapped__.__module__ == "timm.loss._loss_factory"
    params = inspect.signature(hook).parameters
    for name, default in timm_el.EL_KWARGS.items():
        assert params[name].default == default and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "loss_type='encouraging'" in hook.__doc__


def test_install_is_idempotent():
    hook = timm.loss.create_classification_loss
    types = timm.loss.LOSS_TYPES
    timm_el.install()
    timm_el.install()
    assert timm.loss.create_classification_loss is hook
    assert timm.loss.LOSS_TYPES is types and types.count("encouraging") == 1
    for module in TIMM_LOSS_MODULES:
        assert module.create_classification_loss is hook
    assert isinstance(factory("encouraging"), EncouragingLabelSmoothingLoss)


def test_uninstall_restores_timm_then_install_again():
    original = timm.loss.create_classification_loss.__wrapped__
    try:
        timm_el.uninstall()
        assert not timm_el.is_installed()
        for module in TIMM_LOSS_MODULES:
            assert module.create_classification_loss is original
            if hasattr(module, "LOSS_TYPES"):
                assert "encouraging" not in module.LOSS_TYPES
        with pytest.raises(ValueError, match="Unknown loss type 'encouraging'"):
            factory("encouraging")
    finally:
        timm_el.install()
    assert timm_el.is_installed()
    for module in TIMM_LOSS_MODULES:
        assert module.create_classification_loss is timm.loss.create_classification_loss
    assert isinstance(factory(loss_type="encouraging"), EncouragingLabelSmoothingLoss)


@pytest.mark.parametrize(
    "kwargs, cls, expect",
    [
        (dict(), EncouragingLabelSmoothingLoss, dict(smoothing=0.0, log_end=0.75, kind="log", rho=1.0)),
        (dict(smoothing=0.1), EncouragingLabelSmoothingLoss, dict(smoothing=0.1, log_end=0.75)),
        (dict(smoothing=0.1, log_end=0.5, bonus_smoothing=0.05), EncouragingLabelSmoothingLoss,
         dict(smoothing=0.1, log_end=0.5, bonus_smoothing=0.05)),
        (dict(log_end=1.0, bonus_start=0.5, bonus_rho=0.5), EncouragingLabelSmoothingLoss,
         dict(log_end=1.0, bonus_start=0.5, rho=0.5)),
        (dict(bonus="power", bonus_gamma=2.0), EncouragingLabelSmoothingLoss, dict(kind="power", gamma=2.0)),
        (dict(soft_targets=True), EncouragingSoftTargetLoss, dict(smoothing=0.0, log_end=0.75, kind="log")),
        # smoothing is ignored with soft targets, as timm does: Mixup/CutMix already smoothed them
        (dict(soft_targets=True, smoothing=0.1, log_end=0.5, bonus="cosine"), EncouragingSoftTargetLoss,
         dict(smoothing=0.0, bonus_smoothing=None, log_end=0.5, kind="cosine")),
    ],
)
def test_factory_returns_el(kwargs, cls, expect):
    loss = factory(loss_type="encouraging", **kwargs)
    assert type(loss) is cls
    assert loss.reduction == "mean"
    for key, value in expect.items():
        actual = getattr(loss, key) if key in ("smoothing", "bonus_smoothing") else getattr(loss.cfg, key)
        assert actual == value, key
    # the same loss from a positional loss_type, and from timm's task helper
    assert repr(factory("encouraging", **kwargs)) == repr(loss)
    criterion = timm.task.resolve_classification_loss(
        None, torch.device("cpu"), criterion_kwargs=dict(loss_type="encouraging", **kwargs))
    assert repr(criterion) == repr(loss)


CASES = [
    dict(),
    dict(smoothing=0.1),
    dict(smoothing=0.1, log_end=1.0),
    dict(smoothing=0.2, log_end=0.5, bonus_smoothing=0.05),
    dict(log_end=0.75, bonus_start=0.3),
    dict(smoothing=0.1, bonus="power", bonus_gamma=2.0, bonus_rho=0.5),
    dict(smoothing=0.1, bonus="cosine"),
]


def _spec_kwargs(kw):
    return dict(
        kind=kw.get("bonus", "log"),
        log_end=kw.get("log_end", 0.75),
        bonus_start=kw.get("bonus_start", 0.0),
        gamma=kw.get("bonus_gamma", 1.0),
    )


def _random_logits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # wide logits: many rows with p_y above log_end, some near 1 (the clamp)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 4.0
    y = torch.randint(0, V, (n,), generator=g)
    z[: n // 4].scatter_(1, y[: n // 4, None], 12.0)
    return z, y


@pytest.mark.parametrize("kw", CASES, ids=[str(c) or "default" for c in CASES])
def test_factory_loss_equals_core_and_spec(kw):
    z, y = _random_logits()
    loss_fn = factory(loss_type="encouraging", **kw)
    za = z.clone().requires_grad_(True)
    loss = loss_fn(za, y)
    loss.backward()
    el_kw = {k: v for k, v in kw.items()}
    el_kw.setdefault("log_end", 0.75)
    zb = z.clone().requires_grad_(True)
    ref = encouraging_loss(zb, y, **el_kw)
    ref.backward()
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-12, atol=1e-12)
    # independent oracle, written from EL_SPEC
    eps = kw.get("smoothing", 0.0)
    eps_b = kw.get("bonus_smoothing", eps)
    w, u = spec_weights(y, V, eps), spec_weights(y, V, eps_b)
    spec = spec_loss_rows(z, w, u, rho=kw.get("bonus_rho", 1.0), **_spec_kwargs(kw)).mean()
    torch.testing.assert_close(loss.detach(), spec, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(), dict(log_end=1.0), dict(bonus_start=0.2, bonus_rho=2.0), dict(bonus="power")])
def test_soft_target_factory_loss_equals_core_and_spec(kw):
    z, _ = _random_logits(seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.softmax(torch.randn(z.shape, generator=g, dtype=torch.float64) * 3, -1)
    loss_fn = factory(loss_type="encouraging", soft_targets=True, smoothing=0.1, **kw)
    el_kw = dict(kw)
    el_kw.setdefault("log_end", 0.75)
    torch.testing.assert_close(loss_fn(z, q), encouraging_loss(z, q, **el_kw), rtol=1e-12, atol=1e-12)
    spec = spec_loss_rows(z, q, rho=kw.get("bonus_rho", 1.0), **_spec_kwargs(kw)).mean()
    torch.testing.assert_close(loss_fn(z, q), spec, rtol=1e-10, atol=1e-10)


def test_no_bonus_is_timms_cross_entropy():
    z, y = _random_logits(seed=3)
    q = torch.softmax(torch.randn_like(z), -1)
    torch.testing.assert_close(factory("encouraging", bonus_rho=0.0)(z, y), nn.CrossEntropyLoss()(z, y))
    torch.testing.assert_close(
        factory("encouraging", smoothing=0.1, bonus_rho=0.0)(z, y),
        timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)(z, y))
    torch.testing.assert_close(
        factory("encouraging", soft_targets=True, bonus_rho=0.0)(z, q), timm.loss.SoftTargetCrossEntropy()(z, q))


def test_bonus_lowers_the_loss_and_parts_add_up():
    z, y = _random_logits(seed=4)
    el = factory("encouraging", smoothing=0.1)
    ce = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    parts = el(z, y, return_parts=True)
    assert float(parts.bonus) < 0 and float(parts.loss) < float(ce(z, y))
    torch.testing.assert_close(parts.loss - parts.bonus, ce(z, y))
    torch.testing.assert_close(parts.nll_loss, nn.functional.cross_entropy(z, y))


def test_bonus_rho_can_be_changed_and_is_checked():
    z, y = _random_logits(seed=5)
    el = factory("encouraging", smoothing=0.1)
    el.bonus_rho = 0.0
    torch.testing.assert_close(el(z, y), timm.loss.LabelSmoothingCrossEntropy(0.1)(z, y))
    with pytest.raises(ValueError, match=re.escape("bonus_rho must be a finite number >= 0, got -1.0")):
        el.bonus_rho = -1.0


@pytest.mark.parametrize(
    "kwargs, cls",
    [
        (dict(loss_type="ce"), nn.CrossEntropyLoss),
        (dict(), nn.CrossEntropyLoss),
        (dict(loss_type="ce", smoothing=0.1), timm.loss.LabelSmoothingCrossEntropy),
        (dict(loss_type="ce", smoothing=0.1, soft_targets=True), timm.loss.SoftTargetCrossEntropy),
        (dict(loss_type="bce", smoothing=0.1), timm.loss.BinaryCrossEntropy),
        (dict(multi_label=True), timm.loss.BinaryCrossEntropy),
        (dict(loss_type="poly"), timm.loss.PolyCrossEntropy),
        (dict(loss_type="jsd", jsd_splits=3), timm.loss.JsdCrossEntropy),
        (dict(loss_type="asl", multi_label=True, class_weight=[1.0] * V), timm.loss.AsymmetricLossMultiLabel),
    ],
)
def test_other_loss_types_are_timms(kwargs, cls):
    loss = factory(**kwargs)
    assert type(loss) is cls
    assert repr(loss) == repr(timm_original(**kwargs))
    if cls is timm.loss.LabelSmoothingCrossEntropy:
        assert loss.smoothing == 0.1


def test_timm_errors_still_raised():
    with pytest.raises(ValueError, match="jsd_splits"):
        factory("jsd")
    with pytest.raises(ValueError, match=r"Unknown loss type 'nope', expected one of \(.*'encouraging'.*\)"):
        factory("nope")
    with pytest.raises(TypeError):
        factory("ce", not_an_option=1)
    with pytest.raises(TypeError):
        factory("encouraging", not_an_option=1)


BAD_VALUES = [
    (dict(log_end=1.5), "log_end must be in (0, 1], got 1.5"),
    (dict(log_end=0.0), "log_end must be in (0, 1], got 0.0"),
    (dict(log_end="0.5"), "log_end must be in (0, 1], got '0.5'"),
    (dict(bonus="exp"), "bonus must be one of log, power, cosine, got 'exp'"),
    (dict(bonus_start=1.0), "bonus_start must be in [0, 1), got 1.0"),
    (dict(bonus_gamma=0), "bonus_gamma must be a finite number > 0, got 0"),
    (dict(bonus_rho=-1.0), "bonus_rho must be a finite number >= 0, got -1.0"),
    (dict(bonus_rho=float("inf")), "bonus_rho must be a finite number >= 0, got inf"),
]


BAD_SMOOTHING = [
    (dict(smoothing=1.0), "smoothing must be in [0, 1), got 1.0"),
    (dict(smoothing=-0.1), "smoothing must be in [0, 1), got -0.1"),
    (dict(bonus_smoothing=1.5), "bonus_smoothing must be in [0, 1), got 1.5"),
]


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("kwargs, message", BAD_VALUES + BAD_SMOOTHING)
def test_factory_bad_values(kwargs, message, soft_targets):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory(loss_type="encouraging", soft_targets=soft_targets, **kwargs)


def test_misuse_of_the_factory():
    with pytest.raises(ValueError, match="Loss type 'encouraging' does not support multi-label targets"):
        factory("encouraging", multi_label=True)
    with pytest.raises(ValueError, match=re.escape(
            "log_end only applies to loss_type='encouraging', got loss_type='ce'")):
        factory("ce", log_end=0.75)
    with pytest.raises(ValueError, match=re.escape(
            "bonus, bonus_rho only apply to loss_type='encouraging', got loss_type=None")):
        factory(bonus="log", bonus_rho=1.0)
    with pytest.raises(ValueError, match=re.escape("class_weight does not apply to loss_type='encouraging'")):
        factory("encouraging", class_weight=[1.0] * V)
    with pytest.raises(ValueError, match=re.escape("poly_epsilon, jsd_splits do not apply to loss_type='encouraging'")):
        factory("encouraging", jsd_splits=2, poly_epsilon=1.0)
    # timm options left at their defaults are fine (a training script may pass them all)
    assert isinstance(factory("encouraging", asl_clip=0.05, jsd_splits=0, bce_sum=False), EncouragingLabelSmoothingLoss)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=V, pretrained=False)
    with pytest.raises(ValueError, match="does not support multi-label"):
        timm.task.MultiLabelClassificationTask(model, criterion_kwargs=dict(loss_type="encouraging"), verbose=False)


BATCH = 64


STEPS = 40


def _normalize(images):
    return ((torch.from_numpy(images).float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)


@pytest.fixture(scope="module")
def mnist(shared_data):
    x, y = load_mnist(shared_data, "train", limit=BATCH * STEPS)
    xt, yt = load_mnist(shared_data, "test", limit=1000)
    return _normalize(x), torch.from_numpy(y), _normalize(xt), torch.from_numpy(yt)


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", in_chans=1, num_classes=V, pretrained=False)


def _accuracy(model, x, y):
    """Held-out accuracy, normalising with the batch's BatchNorm statistics: after a few
    dozen steps the running statistics still lag far behind the weights."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.load_state_dict(state)  # leave the running statistics as they were
    return acc


def _train(step, params, x, y, steps=STEPS, lr=0.05):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for i in range(steps):
        loss = step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mnist_training_with_factory_loss(mnist):
    x, y, xt, yt = mnist
    model = _model()
    criterion = factory(loss_type="encouraging")
    assert isinstance(criterion, EncouragingLabelSmoothingLoss) and criterion.cfg.log_end == 0.75
    chance = _accuracy(model, xt, yt)
    losses = _train(lambda xb, yb: criterion(model(xb), yb), model.parameters(), x, y)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # EL starts near -log(0.1) + log(0.9) = 2.2 and can go down to -2.39 (log_end 0.75)
    assert first > 1.0 and last < first - 1.5, losses
    assert chance < 0.2 and _accuracy(model, xt, yt) > 0.6


def test_mnist_training_with_classification_task(mnist):
    x, y, xt, yt = mnist
    model = _model(seed=1)
    task = timm.task.ClassificationTask(
        model, criterion_kwargs={"loss_type": "encouraging", "smoothing": 0.1}, verbose=False)
    assert isinstance(task.criterion, EncouragingLabelSmoothingLoss)
    assert task.criterion.smoothing == 0.1 and task.criterion.cfg.log_end == 0.75
    task.train()
    losses = _train(lambda xb, yb: task(xb, yb)["loss"], task.parameters(), x, y, steps=30)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 1.0 and last < first - 1.0, losses
    assert _accuracy(model, xt, yt) > 0.5


def test_mnist_mixup_soft_target_step(mnist):
    x, y, _, _ = mnist
    torch.manual_seed(2)
    np.random.seed(2)
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=V)
    xm, ym = mixup(x[:BATCH].clone(), y[:BATCH])
    assert ym.shape == (BATCH, V) and ym.is_floating_point()
    torch.testing.assert_close(ym.sum(-1), torch.ones(BATCH))

    model = _model(seed=2)
    task = timm.task.ClassificationTask(
        model, criterion_kwargs={"loss_type": "encouraging", "soft_targets": True, "smoothing": 0.1},
        verbose=False)
    assert isinstance(task.criterion, EncouragingSoftTargetLoss)
    task.train()
    out = task(xm, ym)
    torch.testing.assert_close(out["loss"], encouraging_loss(out["output"], ym, log_end=0.75))
    before = out["loss"].item()
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.02 * p.grad
    assert task(xm, ym)["loss"].item() < before


TIMM_TYPES = ("ce", "bce", "asl", "poly", "jsd", "twoway", "zlpr", "db")


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (n,), generator=g)
    q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 3, -1)
    return z, y, q


def test_companion_loss_types_are_registered():
    types = timm.loss._loss_factory.LOSS_TYPES
    assert types == TIMM_TYPES + ("encouraging",) + COMPANION_LOSS_TYPES
    assert timm.loss.LOSS_TYPES is types
    assert COMPANION_LOSS_TYPES == ("focal", "halted_focal", "mse", "mse_sigmoid")
    params = __import__("inspect").signature(timm.loss.create_classification_loss).parameters
    assert (params["focal_gamma"].default, params["halt_point"].default) == (2.0, 0.5)
    assert (params["mirror_rho"].default, params["mirror_gamma"].default) == (1.0, 2.0)
    assert "loss_type='halted_focal'" in timm.loss.create_classification_loss.__doc__


def test_uninstall_removes_them_and_install_adds_them_back():
    try:
        timm_el.uninstall()
        assert timm.loss.LOSS_TYPES == TIMM_TYPES
        with pytest.raises(ValueError, match="Unknown loss type 'halted_focal'"):
            factory("halted_focal")
    finally:
        timm_el.install()
    assert timm.loss.LOSS_TYPES == TIMM_TYPES + ("encouraging",) + COMPANION_LOSS_TYPES
    assert isinstance(factory("halted_focal"), HaltedFocalLoss)


@pytest.mark.parametrize("kwargs, cls, expect", [
    (dict(loss_type="focal"), FocalLoss, dict(gamma=2.0, smoothing=0.0)),
    (dict(loss_type="focal", smoothing=0.1, focal_gamma=1.0), FocalLoss, dict(gamma=1.0, smoothing=0.1)),
    (dict(loss_type="halted_focal"), HaltedFocalLoss, dict(gamma=2.0, halt=0.5)),
    (dict(loss_type="halted_focal", focal_gamma=3.0, halt_point=0.25, smoothing=0.1), HaltedFocalLoss,
     dict(gamma=3.0, halt=0.25, smoothing=0.1)),
    (dict(loss_type="mse"), MirrorMSELoss, dict(activation="softmax", mirror_rho=1.0, mirror_gamma=2.0)),
    (dict(loss_type="mse", mirror_rho=0.0), MirrorMSELoss, dict(mirror_rho=0.0)),
    (dict(loss_type="mse_sigmoid", mirror_gamma=3.0), MirrorMSELoss, dict(activation="sigmoid", mirror_gamma=3.0)),
    # smoothing is ignored with soft targets, as timm does: Mixup/CutMix already smoothed them
    (dict(loss_type="halted_focal", soft_targets=True, smoothing=0.1), HaltedFocalLoss, dict(smoothing=0.0)),
    (dict(loss_type="mse_sigmoid", soft_targets=True, smoothing=0.1), MirrorMSELoss, dict(smoothing=0.0)),
])
def test_factory_returns_the_companion_loss(kwargs, cls, expect):
    loss = factory(**kwargs)
    assert type(loss) is cls and loss.reduction == "mean"
    for key, value in expect.items():
        assert getattr(loss, key) == value, key
    assert repr(loss) == repr(create_companion_loss(**kwargs))


def test_factory_losses_equal_the_core_functions():
    z, y, q = batch()
    cases = [
        (dict(loss_type="focal", smoothing=0.1, focal_gamma=1.5), focal_loss, dict(gamma=1.5, smoothing=0.1)),
        (dict(loss_type="halted_focal", smoothing=0.1), halted_focal_loss, dict(smoothing=0.1)),
        (dict(loss_type="mse", mirror_rho=0.5), mirror_mse_loss, dict(mirror_rho=0.5)),
        (dict(loss_type="mse_sigmoid"), mirror_mse_loss, dict(activation="sigmoid")),
    ]
    for kwargs, fn, core in cases:
        torch.testing.assert_close(factory(**kwargs)(z, y), fn(z, y, **core), rtol=0, atol=0)
        # Mixup / CutMix soft targets: the same formula with q in place of the one-hot target
        soft = factory(soft_targets=True, **kwargs)
        torch.testing.assert_close(soft(z, q), fn(z, q, **{**core, "smoothing": 0.0}), rtol=0, atol=0)
    # halted focal with soft targets is sum_k q_k f(p_k), f written out from Eq. 12
    p = torch.softmax(z, -1)
    f = torch.where(p < 0.5, -(1 - p) ** 2 * torch.log(p), -torch.log(p) + 0.75 * torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(factory("halted_focal", soft_targets=True)(z, q), (q * f).sum(-1).mean())


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="ce", focal_gamma=1.0), "focal_gamma only applies to loss_type='focal' or 'halted_focal', "
                                            "got loss_type='ce'."),
    (dict(loss_type="focal", halt_point=0.3), "halt_point only applies to loss_type='halted_focal', "
                                              "got loss_type='focal'."),
    (dict(loss_type="halted_focal", mirror_rho=1.0, mirror_gamma=2.0),
     "mirror_rho, mirror_gamma only apply to loss_type='mse' or 'mse_sigmoid', got loss_type='halted_focal'."),
    (dict(loss_type="encouraging", halt_point=0.5), "halt_point only applies to loss_type='halted_focal'"),
    (dict(loss_type="mse", log_end=0.5), "log_end only applies to loss_type='encouraging', got loss_type='mse'."),
    (dict(loss_type="mse_sigmoid", multi_label=True),
     "Loss type 'mse_sigmoid' does not support multi-label targets (it is a sigmoid loss over single-label"),
    (dict(loss_type="focal", jsd_splits=2), "jsd_splits does not apply to loss_type='focal' "
                                            "(it takes smoothing, soft_targets and focal_gamma)."),
    (dict(loss_type="halted_focal", halt_point=1.0), "halt_point must be in (0, 1), got 1.0"),
    (dict(loss_type="halted_focal", focal_gamma=-1.0), "focal_gamma must be a finite number >= 0, got -1.0"),
    (dict(loss_type="mse", mirror_gamma=0.0), "mirror_gamma must be a finite number > 0, got 0.0"),
    (dict(loss_type="mse_sigmoid", mirror_rho=-1), "mirror_rho must be a finite number >= 0, got -1"),
    (dict(loss_type="focal", smoothing=1.0), "smoothing must be in [0, 1), got 1.0"),
    (dict(loss_type="focal", soft_targets=True, smoothing=1.5), "smoothing must be in [0, 1), got 1.5"),
])
def test_factory_refuses_what_does_not_apply(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory(**kwargs)


def test_create_companion_loss_refuses_unknown_types_and_options():
    with pytest.raises(ValueError, match=re.escape("loss_type must be one of focal, halted_focal, mse, mse_sigmoid")):
        create_companion_loss("ce")
    with pytest.raises(ValueError, match=re.escape("halt_point does not apply to loss_type='focal'")):
        create_companion_loss("focal", halt_point=0.5)
    assert set(COMPANION_KWARGS) == set(COMPANION_LOSS_TYPES)


def test_timms_own_losses_are_untouched():
    assert type(factory("ce", smoothing=0.1)) is timm.loss.LabelSmoothingCrossEntropy
    assert type(factory("poly")) is timm.loss.PolyCrossEntropy


@pytest.mark.parametrize("kwargs, message", BAD_VALUES + BAD_SMOOTHING)
def test_label_smoothing_class_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncouragingLabelSmoothingLoss(**kwargs)


@pytest.mark.parametrize("kwargs, message", BAD_VALUES)
def test_soft_target_class_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncouragingSoftTargetLoss(**kwargs)


def test_bad_impl():
    with pytest.raises(ValueError, match=re.escape(f"impl must be one of {', '.join(IMPLS)}, got 'no-such-impl'")):
        EncouragingLabelSmoothingLoss(impl="no-such-impl")
    with pytest.raises(ValueError, match="impl must be one of"):
        EncouragingSoftTargetLoss(impl="no-such-impl")
    assert EncouragingSoftTargetLoss(impl="reference").impl == "reference"


def test_wrong_targets():
    z, y = _random_logits(n=8)
    with pytest.raises(ValueError, match="expects class-index targets.*soft_targets=True"):
        factory("encouraging")(z, nn.functional.one_hot(y, V).double())
    with pytest.raises(ValueError, match="expects dense floating-point targets.*soft_targets=False"):
        factory("encouraging", soft_targets=True)(z, y)
    with pytest.raises(ValueError, match=r"target holds class index 10, outside \[0, 10\)"):
        factory("encouraging")(z, torch.full_like(y, V))
    with pytest.raises(ValueError, match="soft target must have the logits' shape"):
        factory("encouraging", soft_targets=True)(z, torch.rand(8, V + 1, dtype=z.dtype))


def test_adapters_take_and_switch_class_weights():
    """The timm adapters take weight= and pass it to the core; bonus_rho=0 is torch's weighted CE (class
    indices with smoothing, soft targets); a factory-made loss switches weights by assignment (DRW)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, V, generator=g)
    t = torch.randint(0, V, (16,), generator=g)
    q = torch.softmax(torch.randn(16, V, generator=g), -1)
    c = torch.linspace(0.2, 2.0, V)
    ls = EncouragingLabelSmoothingLoss(smoothing=0.1, bonus_rho=0., weight=c)
    torch.testing.assert_close(ls(x, t), nn.CrossEntropyLoss(weight=c, label_smoothing=0.1)(x, t))
    soft = EncouragingSoftTargetLoss(bonus_rho=0., weight=c)
    torch.testing.assert_close(soft(x, q), torch.nn.functional.cross_entropy(x, q, weight=c))
    assert "weight=<10 classes" in repr(ls) and "weight=<10 classes" in repr(soft)
    made = timm.loss.create_classification_loss(loss_type='encouraging', smoothing=0.1, log_end=0.75)
    plain = made(x, t)
    made.weight = c
    torch.testing.assert_close(made(x, t), encouraging_loss(x, t, smoothing=0.1, log_end=0.75, weight=c))
    made.weight = None
    torch.testing.assert_close(made(x, t), plain)
    with pytest.raises(ValueError, match=r"^weight must hold finite values >= 0, got -1.0 for class 0$"):
        made.weight = torch.tensor([-1.0] + [1.0] * (V - 1))
