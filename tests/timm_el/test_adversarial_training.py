"""``timm-el-train --adv-train``: adversarial training (the paper's Table 7, EL_SPEC 6), as TorchAttacks'
MNIST adversarial-training demo. The attacked batch itself (un-normalised, attacked in [0, 1], normalised
again), real runs of every attack with several losses (``mnist_ta_cnn`` on the ``tiny_source`` digits),
the flags in args.yaml, the checkpoint and the result records, a killed run resumed to the very same
weights, and the one-line errors.
"""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from encouraging_loss.tools.files import load_checkpoint_safely
from encouraging_loss.tools.results import read_record
from timm_el import checkpoints as el_checkpoints
from timm_el import train as el_train
from timm_el.attacks import TRAIN_DEFAULTS, NormalizedModel, make_attack
from timm_el.models import MNIST_MEAN, MNIST_STD

from timm_cli import cli_env, read_summary, run_cli

# mnist_ta_cnn on the tiny digits (3 classes x 12 training / x 4 validation images): 6 updates per epoch;
# Adam 1e-3 as TorchAttacks' demo
ADV = ["--model", "mnist_ta_cnn", "-b", "6", "--opt", "adam", "--lr", "1e-3", "--weight-decay", "0",
       "--sched", "none", "--warmup-epochs", "0", "--smoothing", "0", "--no-aug", "-j", "0", "--log-interval", "2",
       "--seed", "1", "--val-split", "val"]
ATTACK_NAMES = tuple(TRAIN_DEFAULTS)


def _digits(folder: Path, per_class: int = 3):
    """Real MNIST digits of an ImageFolder's ``train/``: images in [0, 1] ``(N, 1, 28, 28)`` and labels."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted((folder / "train").iterdir())):
        for path in sorted(class_dir.glob("*.png"))[:per_class]:
            images.append(torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)[None])
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _model(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mnist_ta_cnn", num_classes=num_classes).train()


def _normalise(pixels, mean=MNIST_MEAN, std=MNIST_STD):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _pixels(normalised, mean=MNIST_MEAN, std=MNIST_STD):
    return normalised * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- the attacked batch


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attacked_batch_stays_within_eps_in_pixel_space(tiny_source, name):
    """MNIST's mean/std (0.1307, 0.3081): the attacked batch, un-normalised, lies in [0, 1], within eps of the
    clean images (L-infinity or L2 per image), differs from them, and raises the cross-entropy."""
    pixels, labels = _digits(tiny_source)
    model = _model()
    eps, steps, alpha = TRAIN_DEFAULTS[name]
    adversarial = el_train.AdversarialBatches(name, model, MNIST_MEAN, MNIST_STD, eps, steps=steps, alpha=alpha)
    clean = _normalise(pixels)
    torch.manual_seed(1)
    attacked = adversarial(clean, labels)

    assert attacked.shape == clean.shape and attacked.dtype == clean.dtype
    delta = _pixels(attacked) - pixels
    assert _pixels(attacked).min() >= -1e-6 and _pixels(attacked).max() <= 1 + 1e-6
    if name == "pgd_l2":
        norms = delta.flatten(1).norm(dim=1)
        assert (norms <= eps + 1e-4).all(), norms
        assert norms.max() > eps / 2, norms  # 10 steps of 0.2 reach the L2 ball's edge
    else:
        assert delta.abs().max() <= eps + 1e-5
        assert delta.abs().max() >= eps - 1e-5  # FGSM moves every pixel by eps (clamped at 0 and 1)
    if name == "fgsm":  # one signed-gradient step: each pixel +- eps unless the [0, 1] box cut it short
        clamped = (_pixels(attacked) <= 1e-6) | (_pixels(attacked) >= 1 - 1e-6)
        assert torch.all(((delta.abs() - eps).abs() < 1e-5) | clamped | (delta == 0))
        assert ((delta.abs() - eps).abs() < 1e-5).float().mean() > 0.1
    net = NormalizedModel(model, MNIST_MEAN, MNIST_STD).eval()
    with torch.no_grad():
        assert F.cross_entropy(net(_pixels(attacked)), labels) > F.cross_entropy(net(pixels), labels)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attacked_batch_is_torchattacks_on_the_unnormalised_images(tiny_source, name):
    """The same as attacking the [0, 1] images directly through NormalizedModel (same random start), then
    normalising: un-normalise and re-normalise are exact inverses of the loader's normalisation."""
    pixels, labels = _digits(tiny_source)
    model = _model()
    eps, steps, alpha = TRAIN_DEFAULTS[name]
    torch.manual_seed(5)
    ours = el_train.AdversarialBatches(name, model, MNIST_MEAN, MNIST_STD, eps, steps=steps, alpha=alpha)(
        _normalise(pixels), labels)
    torch.manual_seed(5)
    direct = make_attack(name, NormalizedModel(model, MNIST_MEAN, MNIST_STD), eps, steps=steps, alpha=alpha)(
        pixels, labels)
    torch.testing.assert_close(_pixels(ours), direct, atol=2e-5, rtol=0)


def test_attack_runs_in_eval_mode_and_leaves_the_model_training(tiny_source):
    """torchattacks' default: the model in eval mode while it attacks (every forward pass), back in train mode
    after; the attack's input gradients never reach the parameters' .grad."""
    pixels, labels = _digits(tiny_source)
    model = _model()
    modes = []
    model.register_forward_hook(lambda module, args, out: modes.append(module.training))
    adversarial = el_train.AdversarialBatches("pgd", model, MNIST_MEAN, MNIST_STD, 0.3, steps=3, alpha=0.1)
    adversarial(_normalise(pixels), labels)
    assert modes == [False] * 3 and model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()  # a model in eval mode stays so
    adversarial(_normalise(pixels), labels)
    assert not model.training


def test_batches_outside_the_pixel_range_are_clamped(tiny_source):
    """Normalised values whose pixels fall outside [0, 1] (random erasing's noise, say) are attacked as the
    nearest image in [0, 1]: the result stays in the box, within eps of the clamped images."""
    pixels, labels = _digits(tiny_source, per_class=1)
    noisy = _normalise(pixels)
    noisy[:, :, :4] = 5.0  # pixel 1.67
    noisy[:, :, -4:] = -3.0  # pixel -0.79
    adversarial = el_train.AdversarialBatches("fgsm", _model(), MNIST_MEAN, MNIST_STD, 0.1)
    attacked = _pixels(adversarial(noisy, labels))
    clamped = _pixels(noisy).clamp(0, 1)
    assert attacked.min() >= -1e-6 and attacked.max() <= 1 + 1e-6
    assert (attacked - clamped).abs().max() <= 0.1 + 1e-5


def test_description_line():
    model = _model()
    lines = [el_train.AdversarialBatches(name, model, (0.0,), (1.0,), *TRAIN_DEFAULTS[name]).describe()
             for name in ATTACK_NAMES]
    assert lines == ["Adversarial training: FGSM eps 0.3 (torchattacks)",
                     "Adversarial training: PGD eps 0.3, 7 steps, alpha 0.1 (torchattacks)",
                     "Adversarial training: PGDL2 eps 1, 10 steps, alpha 0.2 (torchattacks)"]


# ----------------------------------------------------------------------------- real runs


def _first_batch_loss(run_dir: Path) -> float:
    """The loss of the first training batch, from the run's log."""
    line = next(line for line in (run_dir / "log.txt").read_text().splitlines() if "Train: 0 [   0/" in line)
    return float(line.split("Loss: ")[1].split()[0])


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("name, loss, extra, common", [
    ("fgsm", "ce", [], []),
    ("pgd", "encouraging", ["--adv-eps", "0.2", "--adv-steps", "3"], []),
    ("pgd_l2", "focal", ["--adv-alpha", "0.5", "--adv-steps", "2"], ["--mean", "0.1307", "--std", "0.3081"]),
])
def test_adversarial_training_runs_end_to_end(tiny_source, tmp_path, name, loss, extra, common):
    """One epoch of adversarial training: the flags (defaults filled in) in args.yaml, in the checkpoint's
    args and in the records' info; the loss of the first batch is the loss on the attacked batch (higher
    than a clean run's from the same weights)."""
    flags = [str(tiny_source), *ADV, "--epochs", "1", "--loss", loss, "--output", str(tmp_path), *common]
    assert el_train.main([*flags, "--experiment", "clean"]) == 0
    assert el_train.main([*flags, "--experiment", "adv", "--adv-train", name, *extra]) == 0
    run_dir = tmp_path / "adv"

    eps, steps, alpha = TRAIN_DEFAULTS[name]
    given = dict(zip(extra[::2], extra[1::2]))
    expected = {"adv_train": name, "adv_eps": float(given.get("--adv-eps", eps)),
                "adv_steps": int(given["--adv-steps"]) if "--adv-steps" in given else steps,
                "adv_alpha": float(given["--adv-alpha"]) if "--adv-alpha" in given else alpha}
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert {k: args[k] for k in expected} == expected
    saved = el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")["args"]
    assert {k: getattr(saved, k) for k in expected} == expected
    for record in ("last", "best"):
        info = read_record(run_dir / "eval" / f"{record}.json").info
        assert {k: info[k] for k in expected} == expected
    assert "adv_train" not in read_record(tmp_path / "clean" / "eval" / "last.json").info

    log = (run_dir / "log.txt").read_text()
    what = {"fgsm": "FGSM eps 0.3 (torchattacks)", "pgd": "PGD eps 0.2, 3 steps, alpha 0.1 (torchattacks)",
            "pgd_l2": "PGDL2 eps 1, 2 steps, alpha 0.5 (torchattacks)"}[name]
    assert f"Adversarial training: {what}" in log
    assert "Adversarial training" not in (tmp_path / "clean" / "log.txt").read_text()
    assert _first_batch_loss(run_dir) > _first_batch_loss(tmp_path / "clean")
    assert [int(r["epoch"]) for r in read_summary(run_dir)[1]] == [0]


def test_args_yaml_as_config_repeats_the_attack(tiny_source, tmp_path):
    """A run's args.yaml given to --config trains with the same attack settings."""
    config = tmp_path / "args.yaml"
    config.write_text("adv_train: pgd_l2\nadv_eps: 0.5\nadv_steps: 2\nadv_alpha: 0.3\n")
    args = el_train.parse_args([str(tiny_source), *ADV, "--config", str(config)])
    assert (args.adv_train, args.adv_eps, args.adv_steps, args.adv_alpha) == ("pgd_l2", 0.5, 2, 0.3)
    args = el_train.parse_args([str(tiny_source), *ADV, "--adv-train", "fgsm"])
    assert (args.adv_train, args.adv_eps, args.adv_steps, args.adv_alpha) == ("fgsm", 0.3, None, None)
    args = el_train.parse_args([str(tiny_source), *ADV])
    assert (args.adv_train, args.adv_eps, args.adv_steps, args.adv_alpha) == (None, None, None, None)


def _digest(folder: Path) -> str:
    return (folder / "rank0.sha256").read_text()


def test_killed_adversarial_run_resumes_bit_identical(tiny_source, tmp_path, capsys):
    """PGD training (random starts from torch's generator) killed in epoch 1, resumed: the same weights, bit
    for bit, the same summary.csv and records as a 2-epoch run never interrupted. Resuming with other attack
    settings is refused with one line, before any work."""
    flags = [*ADV, "--epochs", "2", "--adv-train", "pgd", "--adv-steps", "3"]

    def run(name, *more, kill_at=None, check=True):
        env = cli_env()
        env[el_train.DIGEST_ENV] = str(tmp_path / f"digest-{name}")
        if kill_at:
            env[el_checkpoints.KILL_ENV] = kill_at
        return run_cli(tiny_source, *flags, *more, cwd=tmp_path, env=env, check=check)

    run("straight", "--output", tmp_path, "--experiment", "straight")
    killed = run("killed", "--output", tmp_path, "--experiment", "again", kill_at="1:2", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = tmp_path / "again"
    checkpoint = again / "last.pth.tar"
    assert el_checkpoints._load_checkpoint_meta(checkpoint)["epoch"] == 0

    stamp = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    for other, message in [
        ([], "was trained with --adv-train pgd, not without --adv-train"),
        (["--adv-train", "fgsm"], "was trained with --adv-train pgd, not --adv-train fgsm"),
        (["--adv-train", "pgd", "--adv-eps", "0.2", "--adv-steps", "3"],
         "was trained with --adv-train pgd --adv-eps 0.3, not --adv-eps 0.2"),
        (["--adv-train", "pgd"], "was trained with --adv-train pgd --adv-steps 3, not --adv-steps 7"),
        (["--adv-train", "pgd", "--adv-steps", "3", "--adv-alpha", "0.05"],
         "was trained with --adv-train pgd --adv-alpha 0.1, not --adv-alpha 0.05"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            el_train.main([str(tiny_source), *ADV, "--epochs", "2", *other, "--resume", str(checkpoint)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"timm-el-train: error: --resume {str(checkpoint)!r} {message}", err
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamp
    # a checkpoint of a clean run (or of a version before --adv-train: no such args) goes on clean only
    saved = load_checkpoint_safely(checkpoint, allowed=[argparse.Namespace])
    saved = {**saved, "args": argparse.Namespace(**{k: v for k, v in vars(saved["args"]).items()
                                                    if not k.startswith("adv_")})}
    torch.save(saved, tmp_path / "clean.tmp")
    os.replace(tmp_path / "clean.tmp", tmp_path / "clean.pth.tar")
    with pytest.raises(SystemExit):
        el_train.main([str(tiny_source), *flags, "--resume", str(tmp_path / "clean.pth.tar")])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"timm-el-train: error: --resume {str(tmp_path / 'clean.pth.tar')!r} was trained without --adv-train "
        f"(clean batches), not --adv-train pgd"]

    proc = run("resumed", "--resume", checkpoint)
    assert "Random number generators restored from the checkpoint." in proc.stderr + proc.stdout
    assert "Adversarial training: PGD eps 0.3, 3 steps, alpha 0.1 (torchattacks)" in proc.stderr + proc.stdout
    assert _digest(tmp_path / "digest-resumed") == _digest(tmp_path / "digest-straight")
    straight = tmp_path / "straight"
    assert read_summary(again) == read_summary(straight)
    assert [int(r["epoch"]) for r in read_summary(again)[1]] == [0, 1]
    for name in ("last", "best"):
        resumed, reference = (read_record(d / "eval" / f"{name}.json") for d in (again, straight))
        assert resumed.metrics == reference.metrics and resumed.info["adv_steps"] == 3


# ----------------------------------------------------------------------------- one-line errors

BAD_FLAGS = [
    (["--adv-train", "nope"], "argument --adv-train: invalid choice: 'nope'"),
    (["--adv-train", "apgd_dlr"], "argument --adv-train: invalid choice: 'apgd_dlr'"),
    (["--adv-train", "pgd", "--adv-eps", "-0.1"],
     "--adv-eps must be in (0, 1] (L-infinity, pixel values in [0, 1]), got -0.1"),
    (["--adv-train", "pgd", "--adv-eps", "nan"], "--adv-eps must be in (0, 1] (L-infinity, pixel values in [0, 1]), "
                                                 "got nan"),
    (["--adv-train", "fgsm", "--adv-eps", "0"], "--adv-eps must be in (0, 1]"),
    (["--adv-train", "fgsm", "--adv-eps", "1.5"], "--adv-eps must be in (0, 1]"),
    (["--adv-train", "pgd_l2", "--adv-eps", "inf"], "--adv-eps must be a number > 0 (L2, pixel units), got inf"),
    (["--adv-train", "pgd", "--adv-eps", "x"], "argument --adv-eps: invalid float value: 'x'"),
    (["--adv-train", "pgd", "--adv-steps", "0"], "--adv-steps must be an integer >= 1, got 0"),
    (["--adv-train", "pgd_l2", "--adv-alpha", "-1"], "--adv-alpha must be a number > 0, got -1.0"),
    (["--adv-train", "pgd", "--adv-alpha", "nan"], "--adv-alpha must be a number > 0, got nan"),
    (["--adv-train", "fgsm", "--adv-alpha", "0.1"],
     "--adv-alpha applies to --adv-train pgd or pgd_l2 only, not --adv-train fgsm (one step of size --adv-eps)"),
    (["--adv-train", "fgsm", "--adv-steps", "3"], "--adv-steps applies to --adv-train pgd or pgd_l2 only"),
    (["--adv-eps", "0.3"], "--adv-eps applies with --adv-train only (adversarial training)"),
    (["--adv-steps", "5"], "--adv-steps applies with --adv-train only"),
    (["--adv-train", "pgd", "--mixup", "0.2"], "--adv-train pgd cannot be used with --mixup: torchattacks attacks "
                                               "hard labels, not the soft targets of Mixup/CutMix"),
    (["--adv-train", "fgsm", "--cutmix", "1"], "--adv-train fgsm cannot be used with --cutmix"),
    (["--adv-train", "fgsm", "--cutmix-minmax", "0.2", "0.8"], "cannot be used with --cutmix-minmax"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_adversarial_flags_fail_with_one_line(tiny_source, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny_source), *ADV, "--output", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("timm-el-train: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_bad_attack_in_a_config_file_is_one_line(tiny_source, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("adv_train: autoattack\n")
    with pytest.raises(SystemExit):
        el_train.main([str(tiny_source), *ADV, "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["timm-el-train: error: --adv-train must be one of 'fgsm', 'pgd', 'pgd_l2', got 'autoattack'"]


def test_help_names_the_flags_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        el_train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--adv-train ATTACK", "--adv-eps EPS", "--adv-steps N", "--adv-alpha ALPHA",
                  "fgsm 0.3, pgd 0.3, pgd_l2 1", "pgd 7, pgd_l2 10", "pgd 0.1, pgd_l2 0.2",
                  "not with --mixup/--cutmix"):
        assert piece in text, piece
