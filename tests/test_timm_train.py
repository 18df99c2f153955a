"""timm_el.train: the training CLI, on a small ImageFolder of real MNIST digits (CPU).

The runs train timm's ``test_resnet`` (373k parameters) at 28x28 on 10 classes
x 60 training and x 20 validation images written as PNG files from the shared
MNIST files; one epoch takes well under a second, a run a few seconds.
"""
import csv
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import timm_el  # noqa: E402,F401
except ModuleNotFoundError:  # an editable install made before timm_el/ existed does not map it
    sys.path.insert(0, str(ROOT))
from encouraging_loss.tools.results import read_record  # noqa: E402
from timm import utils  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm_el import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss, load_mnist  # noqa: E402
from timm_el import checkpoints as el_checkpoints  # noqa: E402
from timm_el import run_files as el_run_files  # noqa: E402
from timm_el import train as el_train  # noqa: E402

CLASSES = 10
TRAIN_PER_CLASS, VAL_PER_CLASS = 60, 20
# a small, fast, reproducible recipe; 18 updates per epoch
FAST = ["--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "32", "--lr", "0.05",
        "--warmup-epochs", "0", "--no-aug", "-j", "0", "--log-interval", "5", "--seed", "1"]
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
EMA_COLUMNS = ["eval_ema_loss", "eval_ema_top1", "eval_ema_top5"]


@pytest.fixture(scope="module")
def mnist_folder(shared_data, tmp_path_factory) -> Path:
    """An ImageFolder ``train/<digit>/*.png`` (first 60 per class of MNIST train) and
    ``val/<digit>/*.png`` (first 20 per class of MNIST test)."""
    root = tmp_path_factory.mktemp("mnist_folder")
    for split, source, per_class in (("train", "train", TRAIN_PER_CLASS), ("val", "test", VAL_PER_CLASS)):
        images, labels = load_mnist(shared_data, source, limit=2000)
        counts = [0] * CLASSES
        for image, label in zip(images, labels):
            label = int(label)
            if counts[label] < per_class:
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image, mode="L").save(folder / f"{counts[label]:03d}.png")
                counts[label] += 1
        assert counts == [per_class] * CLASSES
    return root


def _env(threads: int = 2) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop(el_train.DIGEST_ENV, None)
    return env


def run_cli(*args, cwd, env=None, torchrun_procs=0, check=True, timeout=300) -> subprocess.CompletedProcess:
    """Run ``python -m timm_el.train ARGS`` (under ``torchrun --nproc_per_node N`` when asked)."""
    launcher = [sys.executable]
    if torchrun_procs:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    cmd = launcher + ["-m", "timm_el.train", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_summary(run_dir: Path):
    with open(run_dir / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


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


@pytest.fixture(scope="module")
def el_run(mnist_folder, tmp_path_factory):
    """Two epochs with the Encouraging Loss: ``(run directory, process)``."""
    out = tmp_path_factory.mktemp("el_out")
    proc = run_cli(mnist_folder, *FAST, "--loss", "encouraging", "--epochs", "2",
                   "--output", out, "--experiment", "el", cwd=out)
    return out / "el", proc


# ----------------------------------------------------------------------------- training runs


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
    env = _env(threads=1)
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


# ----------------------------------------------------------------------------- in process


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


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("loss: encouraging\nlog_end: 0.5\nlr: 0.2\nepochs: 7\ndecay_milestones: [3, 5]\n")
    args = el_train.parse_args([str(tmp_path), "--config", str(config), "--lr", "0.1"])
    assert (args.loss, args.log_end, args.lr, args.epochs, args.decay_milestones) == \
        ("encouraging", 0.5, 0.1, 7, [3, 5])
    assert args.bonus == "log" and args.data_dir == str(tmp_path)


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


def test_task_name(tmp_path):
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--model", "mnist_cnn", "--dataset",
                                                        "torch/mnist"])) == "mnist_mnist_cnn"
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--model", "resnet18"])) == \
        "imagefolder_resnet18"
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--task-name", "cifar10_r50"])) == "cifar10_r50"


# ----------------------------------------------------------------------------- bad flags


@pytest.fixture
def restore_logging():
    """Undo the console logging that ``main()`` sets up in this process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    el_train._logging_ready = False


BAD_FLAGS = [
    (["--loss", "encouraging", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    (["--loss", "encouraging", "--bonus", "nope"], "--bonus must be one of log, power, cosine, got 'nope'"),
    (["--smoothing", "1.2"], "--smoothing must be in [0, 1), got 1.2"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
    (["--mixup", "-1"], "--mixup must be a number >= 0, got -1.0"),
    (["--log-end", "0.5"], "--log-end applies to --loss encouraging only, not --loss ce"),
    (["--bonus-schedule", "linear"], "--bonus-schedule applies to --loss encouraging only"),
    (["--loss", "encouraging", "--bonus-schedule", "lin"], "--bonus-schedule must be one of none, linear"),
    (["--loss", "encouraging", "--defer-start", "-1"], "--defer-start must be an integer >= 0, got -1"),
    (["--loss", "encouraging", "--bonus-smoothing", "1"], "--bonus-smoothing must be in [0, 1), got 1.0"),
    (["--loss", "encouraging", "--bonus-gamma", "0"], "--bonus-gamma must be a finite number > 0, got 0.0"),
    (["--resume", "missing.pth.tar"], "--resume: checkpoint not found: 'missing.pth.tar'"),
    (["--model", "no_such_model"], "--model: unknown model 'no_such_model'"),
    (["--opt", "nope"], "--opt: unknown optimizer 'nope'"),
    (["--sched", "nope"], "argument --sched: invalid choice: 'nope'"),
    (["--drop", "1"], "--drop must be in [0, 1), got 1.0"),
    (["--scale", "1", "0.5"], "--scale must be two numbers MIN MAX"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--val-split", ""], "--val-split must name the validation split"),
    (["--val-split", "test"], "--val-split 'test': no such folder in"),
    (["--val-split", "train"], "--val-split 'train': no such folder in"),
    (["--num-classes", "5"], "--num-classes 5 is smaller than the 10 classes of the data"),
    (["--model", "mnist_cnn", "--drop-path", "0.1"], "--model mnist_cnn: "),
    (["--aa", "nope"], "--aa 'nope': "),
    (["-b", "1000"], "--batch-size 1000 is larger than the 600 training images"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_with_one_line(mnist_folder, capsys, restore_logging, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(mnist_folder), *FAST, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("timm-el-train: error: ") and message in err[-1], err
    # one error line, no traceback (errors found while setting up the data and model follow the log lines)
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err), err


@pytest.mark.parametrize("flags, message", [
    (["--loss", "encouraging", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    (["--bonus-rho", "0.5"], "--bonus-rho applies to --loss encouraging only"),
    (["DIR_MISSING"], "--data-dir: directory not found: 'DIR_MISSING'"),
])
def test_bad_flags_from_the_command_line(tmp_path, flags, message):
    args = [str(tmp_path), *flags] if flags != ["DIR_MISSING"] else flags
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-el-train: error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_resume_refuses_another_loss(el_run, mnist_folder, capsys, restore_logging):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(mnist_folder), *FAST, "--loss", "ce", "--resume", str(el_run[0] / "last.pth.tar")])
    assert exit_info.value.code == 2
    assert "was trained with --loss encouraging, not --loss ce" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--loss", "--log-end", "--bonus-schedule", "--defer-start", "--model-ema-decay", "--drop-connect",
                 "--decay-epochs", "--opt-eps", "--config", "--resume", "--checkpoint-hist"):
        assert flag in out, flag


def test_reading_a_checkpoint_keeps_the_allow_list_of_others(tmp_path):
    """Loading a checkpoint's metadata must not remove types another library allowed (fairseq_el.compat)."""
    import argparse

    import torch

    from timm_el import checkpoints

    torch.save({"epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "c.pth.tar")
    torch.serialization.add_safe_globals([argparse.Namespace])
    checkpoints._load_checkpoint_meta(str(tmp_path / "c.pth.tar"))
    assert argparse.Namespace in torch.serialization.get_safe_globals()
