"""timm_el.train: the training loop of ``timm-el-train``, on small ImageFolders of real MNIST digits (CPU).

The runs train timm's ``test_resnet`` (373k parameters) at 28x28 (``timm_cli.FAST``: 10 classes x 60
training and x 20 validation images; one epoch takes well under a second, a run a few seconds): the loss it
builds (EL, CE, the companion losses), resume, no overwrite, torchrun, mixup, one-class folders refused.
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import timm.loss
import timm.loss._loss_factory
import torch
from timm import utils
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from encouraging_loss import (
    FocalLoss,
    HaltedFocalLoss,
    MirrorMSELoss,
)
from encouraging_loss.tools.results import read_record
from timm_el import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss, load_mnist
from timm_el import checkpoints as el_checkpoints
from timm_el import train as el_train

from timm_cli import FAST, TINY, cli_env, read_summary, run_cli

CLASSES = 10


SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]


EMA_COLUMNS = ["eval_ema_loss", "eval_ema_top1", "eval_ema_top5"]


def check_records(run_dir: Path, loss: str, task: str, names, last_epoch: int):
    """The run's el-result/1 records, read back by the results module."""
    records = {}
    for name in names:
        record = read_record(run_dir / "eval" / f"{name}.json")
        assert record is not None, name
        assert (record.task, record.loss, record.seed, record.run, record.checkpoint) == \
            (task, loss, 1, run_dir.name, name)
        assert set(record.metrics) == {"top1", "top5"}
        assert 0 <= record.metrics["top1"] <= record.metrics["top5"] <= 100
        assert record.curve == run_dir / "summary.csv"
        info = record.info
        assert info["model"] == "test_resnet" and isinstance(info["epoch"], int)
        assert (run_dir / "eval" / info["checkpoint_path"]).resolve().is_file()
        records[name] = record
    assert records["last"].info["epoch"] == last_epoch
    return records


def test_el_training_run(el_run):
    run_dir, proc = el_run
    log = proc.stdout + proc.stderr
    # EL is the criterion, CE the validation loss; progress lines with loss, rate and ETA
    assert "Training loss (--loss encouraging): EncouragingLabelSmoothingLoss(smoothing=0.1, bonus='log', " \
           "log_end=0.75" in log
    assert "validation loss: CrossEntropyLoss" in log
    assert "Train: 0 [   5/18 ( 33%)]  Loss: " in log and "/s" in log and "ETA: " in log
    assert (run_dir / "log.txt").read_text().count("Train: 1 [") == 5

    columns, rows = read_summary(run_dir)
    assert columns == SUMMARY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["eval_top1"]) >= 20.0  # chance is 10%
    for name in ("last", "model_best", "checkpoint-0", "checkpoint-1"):
        assert (run_dir / f"{name}.pth.tar").is_file(), name

    saved = el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")
    assert saved["epoch"] == 1 and saved["args"].loss == "encouraging"
    args = el_train.yaml.safe_load((run_dir / "args.yaml").read_text())
    assert args["loss"] == "encouraging" and args["log_end"] == 0.75 and args["epochs"] == 2

    records = check_records(run_dir, "el", "imagefolder_test_resnet", ("last", "best"), last_epoch=1)
    assert records["last"].metrics["top1"] == float(rows[-1]["eval_top1"])
    best_row = max(rows, key=lambda r: float(r["eval_top1"]))
    assert records["best"].metrics["top1"] == float(best_row["eval_top1"])
    assert records["best"].info["checkpoint_path"] == os.path.join("..", "model_best.pth.tar")
    assert records["last"].info["el"]["log_end"] == 0.75
    assert not (run_dir / "eval" / "last_ema.json").exists()


def test_resume_continues_from_the_saved_epoch(el_run, mnist_folder, tmp_path):
    run_dir = tmp_path / "el"
    shutil.copytree(el_run[0], run_dir)
    before = read_summary(run_dir)[1]
    # two more epochs, with a linear bonus ramp over the 4 epochs now planned
    proc = run_cli(mnist_folder, *FAST, "--loss", "encouraging", "--epochs", "4", "--bonus-schedule", "linear",
                   "--resume", run_dir / "last.pth.tar", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "from epoch 2" in log and "Epoch 2: bonus weight 0.75" in log and "Epoch 3: bonus weight 1" in log
    assert "Train: 0 [" not in log
    _, rows = read_summary(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert rows[:2] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["el"]  # no new run directory
    check_records(run_dir, "el", "imagefolder_test_resnet", ("last", "best"), last_epoch=3)
    assert el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")["epoch"] == 3


def test_ce_run_never_overwrites_an_existing_run(el_run, mnist_folder):
    run_dir = el_run[0]
    stamp = (run_dir / "summary.csv").read_text()
    proc = run_cli(mnist_folder, *FAST, "--loss", "ce", "--epochs", "1", "--output", run_dir.parent,
                   "--experiment", "el", cwd=run_dir.parent)
    assert "LabelSmoothingCrossEntropy" in proc.stderr + proc.stdout
    assert (run_dir / "summary.csv").read_text() == stamp
    ce_dir = run_dir.parent / "el-1"
    assert [int(r["epoch"]) for r in read_summary(ce_dir)[1]] == [0]
    check_records(ce_dir, "ce", "imagefolder_test_resnet", ("last", "best"), last_epoch=0)


def test_torchrun_two_processes_hold_the_same_weights(mnist_folder, tmp_path):
    digests = tmp_path / "digests"
    env = cli_env(threads=1)
    env[el_train.DIGEST_ENV] = str(digests)
    run_cli(mnist_folder, *FAST, "-b", "16", "--loss", "encouraging", "--epochs", "1", "--model-ema",
            "--output", tmp_path, "--experiment", "ddp", cwd=tmp_path, env=env, torchrun_procs=2)
    rank0, rank1 = ((digests / f"rank{r}.sha256").read_text() for r in (0, 1))
    assert rank0 == rank1 and rank0.startswith("model ") and "\nema " in rank0

    # the saved weights are the ranks' weights, and the EMA is validated and recorded too
    run_dir = tmp_path / "ddp"
    checkpoint = el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")
    for key, line in (("state_dict", 0), ("state_dict_ema", 1)):
        model = timm.create_model("test_resnet", in_chans=1, num_classes=CLASSES)
        model.load_state_dict(checkpoint[key])
        assert rank0.splitlines()[line].split()[1] == el_train.state_digest(model), key
    columns, rows = read_summary(run_dir)
    assert columns == SUMMARY_COLUMNS[:-1] + EMA_COLUMNS + ["lr"] and len(rows) == 1
    records = check_records(run_dir, "el", "imagefolder_test_resnet", ("last", "best", "last_ema", "best_ema"), 0)
    assert records["last_ema"].metrics["top1"] == float(rows[0]["eval_ema_top1"])
    assert records["last_ema"].info["weights"] == "state_dict_ema"
    assert checkpoint["args"].world_size == 2


def test_mixup_cutmix_with_el(mnist_folder, tmp_path):
    proc = run_cli(mnist_folder, *FAST, "--loss", "encouraging", "--epochs", "1", "--mixup", "0.2",
                   "--cutmix", "1.0", "--output", tmp_path, "--experiment", "mix", cwd=tmp_path)
    assert "Training loss (--loss encouraging): EncouragingSoftTargetLoss(" in proc.stdout + proc.stderr
    _, rows = read_summary(tmp_path / "mix")
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))
    assert float(rows[0]["eval_top1"]) > 0


def _args(tmp_path, *flags):
    return el_train.parse_args([str(tmp_path), *FAST, *flags])


@pytest.mark.parametrize("flags, cls, expect", [
    (["--loss", "encouraging"], EncouragingLabelSmoothingLoss, dict(smoothing=0.1, log_end=0.75, bonus_rho=1.0)),
    (["--loss", "encouraging", "--smoothing", "0", "--log-end", "1", "--bonus-rho", "0.5"],
     EncouragingLabelSmoothingLoss, dict(smoothing=0.0, log_end=1.0, bonus_rho=0.5)),
    (["--loss", "encouraging", "--mixup", "0.2"], EncouragingSoftTargetLoss, dict(log_end=0.75)),
    (["--loss", "ce"], LabelSmoothingCrossEntropy, {}),
    (["--loss", "ce", "--cutmix", "1"], SoftTargetCrossEntropy, {}),
    (["--smoothing", "0"], torch.nn.CrossEntropyLoss, {}),
])
def test_create_train_loss(tmp_path, flags, cls, expect):
    args = _args(tmp_path, *flags)
    loss = el_train.create_train_loss(args, mixup_active=args.mixup > 0 or args.cutmix > 0)
    assert type(loss) is cls
    for name, value in expect.items():
        assert getattr(loss, name) == value, name


def test_train_one_epoch_uses_the_given_loss(tmp_path, shared_data):
    """With learning rate 0 the epoch's mean training loss is exactly EL on the batches, not CE."""
    args = _args(tmp_path, "--loss", "encouraging", "--log-interval", "1")
    device = utils.init_distributed_device(args)
    args.prefetcher = True  # batches arrive normalised on the device
    images, labels = load_mnist(shared_data, "train", limit=96)
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - 0.5) / 0.5
    batches = list(zip(x.split(32), torch.from_numpy(labels).split(32)))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=CLASSES)
    loss_fn = el_train.create_train_loss(args, mixup_active=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    metrics, updates = el_train.train_one_epoch(0, model, batches, optimizer, loss_fn, args, device)
    assert updates == 3
    with torch.no_grad():  # the same weights, BatchNorm in training mode as during the epoch
        el = torch.stack([EncouragingLabelSmoothingLoss(smoothing=0.1, log_end=0.75)(model(b), y) for b, y in batches])
        ce = torch.stack([LabelSmoothingCrossEntropy(0.1)(model(b), y) for b, y in batches])
    assert metrics["loss"] == pytest.approx(el.mean().item(), rel=1e-5)
    assert metrics["loss"] < ce.mean().item() - 0.1  # the bonus lowers the loss


def test_bonus_weight_schedule(tmp_path):
    args = _args(tmp_path, "--loss", "encouraging", "--epochs", "4", "--bonus-rho", "2", "--defer-start", "1",
                 "--bonus-schedule", "linear")
    assert [el_train.bonus_weight(args, e) for e in range(4)] == [0.0, 1.0, 1.5, 2.0]


def test_mnist_cnn_gets_one_input_channel(tmp_path):
    assert el_train._resolve_in_chans(_args(tmp_path, "--model", "mnist_cnn", "--in-chans", "1")) == 1
    args = el_train.parse_args([str(tmp_path), "--model", "mnist_cnn"])
    assert el_train._resolve_in_chans(args) == 1
    assert el_train._resolve_in_chans(el_train.parse_args([str(tmp_path), "--model", "resnet18"])) == 3


def test_torch_mnist_without_internet(shared_data, tmp_path):
    """``--dataset torch/mnist`` (torchvision) reads the original files put in DIR/MNIST/raw:
    with --dataset-download it checks and extracts them instead of downloading."""
    args = el_train.parse_args([str(tmp_path), "--dataset", "torch/mnist", "--model", "mnist_cnn"])
    with pytest.raises(el_train.UsageError, match=r"^--dataset torch/mnist in .*split 'train': Dataset not found"):
        el_train._create_datasets(args, 1)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in sorted((shared_data / "mnist").glob("*.gz")):
        (raw / source.name).symlink_to(source)
    args = el_train.parse_args([str(tmp_path), "--dataset", "torch/mnist", "--model", "mnist_cnn",
                                "--dataset-download"])
    train, val, classes = el_train._create_datasets(args, el_train._resolve_in_chans(args))
    assert (len(train), len(val), len(classes)) == (60000, 10000, CLASSES)
    assert train[0][0].mode == "L" and train[0][1] == 5
    args = el_train.parse_args([str(tmp_path), "--dataset", "torch/mnist", "--model", "resnet18"])
    with pytest.raises(el_train.UsageError, match=r"holds 1-channel \(L\) images but the model takes 3"):
        el_train._create_datasets(args, el_train._resolve_in_chans(args))


@pytest.mark.usefixtures("restore_logging")
def test_one_class_is_refused(tiny, capsys):
    for split in ("train", "val"):
        for label in ("1", "2"):
            shutil.rmtree(tiny / split / label)
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny), *TINY, "--epochs", "1", "--output", str(tiny / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"timm-el-train: error: ImageFolder in {str(tiny)!r}, split 'train': only the class '0'; "
                       f"a classifier needs at least 2 (every prediction would be right)"), err
    assert not (tiny / "out").exists()  # stopped before making anything


@pytest.mark.usefixtures("restore_logging")
def test_num_classes_one_is_refused(tiny, capsys):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny), *TINY, "--num-classes", "1"])
    assert exit_info.value.code == 2
    assert "--num-classes must be an integer >= 2" in capsys.readouterr().err


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


def test_training_run_with_the_halted_focal_loss(mnist_folder, tmp_path):
    proc = run_cli(mnist_folder, "--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "20",
                      "--lr", "0.05", "--warmup-epochs", "0", "--no-aug", "-j", "0", "--log-interval", "5",
                      "--seed", "1", "--epochs", "1", "--loss", "halted_focal", "--halt-point", "0.4",
                      "--output", tmp_path, "--experiment", "hfl", cwd=tmp_path, check=False)
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
