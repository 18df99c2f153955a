"""timm plugin: the paper's companion losses (EL_SPEC 2.5) through timm's loss factory
(``loss_type='focal' | 'halted_focal' | 'mse' | 'mse_sigmoid'``) and ``timm-el-train --loss``.

The training run uses timm's ``test_resnet`` on a small ImageFolder of real
MNIST digits (10 classes x 20 training, x 5 validation images), one epoch.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.loss  # noqa: E402
import timm.loss._loss_factory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import timm_el  # noqa: E402
except ModuleNotFoundError:  # an editable install made before timm_el/ existed does not map it
    sys.path.insert(0, str(ROOT))
    import timm_el  # noqa: E402
from PIL import Image  # noqa: E402

from encouraging_loss import (  # noqa: E402
    FocalLoss, HaltedFocalLoss, MirrorMSELoss, focal_loss, halted_focal_loss, mirror_mse_loss,
)
from timm_el import load_mnist  # noqa: E402
from timm_el import train as el_train  # noqa: E402
from timm_el.factory import COMPANION_KWARGS, COMPANION_LOSS_TYPES, create_companion_loss  # noqa: E402

V = 10
TIMM_TYPES = ("ce", "bce", "asl", "poly", "jsd", "twoway", "zlpr", "db")


def factory(*args, **kwargs):
    """Looked up through the module at call time, as timm's users do."""
    return timm.loss.create_classification_loss(*args, **kwargs)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (n,), generator=g)
    q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 3, -1)
    return z, y, q


# ----------------------------------------------------------------------- the factory


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


# ----------------------------------------------------------------------- timm-el-train


def _args(tmp_path, *flags):
    return el_train.parse_args([str(tmp_path), "--model", "test_resnet", *flags])


@pytest.mark.parametrize("flags, cls, expect", [
    (["--loss", "focal"], FocalLoss, dict(gamma=2.0, smoothing=0.1)),
    (["--loss", "halted_focal", "--halt-point", "0.4", "--focal-gamma", "1", "--smoothing", "0"], HaltedFocalLoss,
     dict(gamma=1.0, halt=0.4, smoothing=0.0)),
    (["--loss", "mse", "--mirror-rho", "0"], MirrorMSELoss, dict(activation="softmax", mirror_rho=0.0)),
    (["--loss", "mse_sigmoid", "--mirror-gamma", "3", "--mixup", "0.2"], MirrorMSELoss,
     dict(activation="sigmoid", mirror_gamma=3.0, smoothing=0.0)),
])
def test_train_builds_the_companion_loss(tmp_path, flags, cls, expect):
    args = _args(tmp_path, *flags)
    loss = el_train.create_train_loss(args, mixup_active=args.mixup > 0)
    assert type(loss) is cls
    for key, value in expect.items():
        assert getattr(loss, key) == value, key


@pytest.mark.parametrize("flags, message", [
    (["--focal-gamma", "1"], "--focal-gamma applies to --loss focal or halted_focal only, not --loss ce"),
    (["--loss", "focal", "--halt-point", "0.3"], "--halt-point applies to --loss halted_focal only, not --loss focal"),
    (["--loss", "encouraging", "--mirror-rho", "0"],
     "--mirror-rho applies to --loss mse or mse_sigmoid only, not --loss encouraging"),
    (["--loss", "halted_focal", "--log-end", "0.5"],
     "--log-end applies to --loss encouraging only, not --loss halted_focal"),
    (["--loss", "halted_focal", "--halt-point", "1"], "--halt-point must be in (0, 1), got 1.0"),
    (["--loss", "focal", "--focal-gamma", "nan"], "--focal-gamma must be a finite number >= 0, got nan"),
    (["--loss", "mse", "--mirror-gamma", "0"], "--mirror-gamma must be a finite number > 0, got 0.0"),
    (["--loss", "mse_sigmoid", "--mirror-rho", "-1"], "--mirror-rho must be a finite number >= 0, got -1.0"),
])
def test_train_refuses_companion_flags_that_do_not_apply(tmp_path, flags, message):
    with pytest.raises(el_train.UsageError, match=re.escape(message)):
        _args(tmp_path, *flags)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "2"
    env.pop(el_train.DIGEST_ENV, None)
    return env


def _train_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "timm_el.train", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_train_cli_bad_companion_flag_is_one_line(tmp_path):
    proc = _train_cli(tmp_path, "--loss", "focal", "--halt-point", "0.3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "timm-el-train: error: --halt-point applies to --loss halted_focal only, not --loss focal"]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def mnist_folder(shared_data, tmp_path_factory) -> Path:
    """ImageFolder ``train/<digit>`` (first 20 per class of MNIST train), ``val/<digit>`` (first 5 of test)."""
    root = tmp_path_factory.mktemp("mnist_small")
    for split, source, per_class in (("train", "train", 20), ("val", "test", 5)):
        images, labels = load_mnist(shared_data, source, limit=500)
        counts = [0] * V
        for image, label in zip(images, labels):
            label = int(label)
            if counts[label] < per_class:
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image, mode="L").save(folder / f"{counts[label]:03d}.png")
                counts[label] += 1
        assert counts == [per_class] * V
    return root


def test_training_run_with_the_halted_focal_loss(mnist_folder, tmp_path):
    proc = _train_cli(mnist_folder, "--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "20",
                      "--lr", "0.05", "--warmup-epochs", "0", "--no-aug", "-j", "0", "--log-interval", "5",
                      "--seed", "1", "--epochs", "1", "--loss", "halted_focal", "--halt-point", "0.4",
                      "--output", tmp_path, "--experiment", "hfl", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Training loss (--loss halted_focal): HaltedFocalLoss(gamma=2.0, halt=0.4, smoothing=0.1" in log
    run_dir = tmp_path / "hfl"
    rows = (run_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and float(rows[1].split(",")[1]) > 0  # epoch 0's train loss
    record = json.loads((run_dir / "eval" / "last.json").read_text())
    assert record["loss"] == "halted_focal"
    assert record["info"]["companion"] == {"focal_gamma": 2.0, "halt_point": 0.4}
    args = el_train.yaml.safe_load((run_dir / "args.yaml").read_text())
    assert (args["loss"], args["halt_point"], args["focal_gamma"], args["mirror_rho"]) == \
        ("halted_focal", 0.4, 2.0, None)
