"""timm_el.launch: EL inside an upstream train.py that is run unchanged (issue 8, item 2).

The launcher runs a small stand-in for timm's ``train.py``, written below,
that builds its losses the way timm's script does: the training loss from
timm's loss classes (``SoftTargetCrossEntropy`` with Mixup,
``LabelSmoothingCrossEntropy`` with smoothing, ``nn.CrossEntropyLoss``
without, ``BinaryCrossEntropy`` with ``--bce-loss``), or through
``timm.loss.create_classification_loss`` (directly, or through
``timm.task.ClassificationTask(criterion_kwargs=...)``), or in a helper
module beside the script; then ``validate_loss_fn = nn.CrossEntropyLoss()``.
It trains a linear model a few SGD steps on real MNIST images and writes the
types of both losses, the training loss values and the first batch's logits
and targets. The tests show that the loss used for training is EL (its value
on that batch equals the core's and the specification's EL, not CE), that
validation is still torch's own ``CrossEntropyLoss``, that ``--loss ce``
leaves the script alone, that bad flags fail with one line before the script
runs, and that both ranks of ``torchrun --nproc_per_node 2`` (gloo) train with EL.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from encouraging_loss import encouraging_loss

from helpers import ROOT
from spec_formulas import spec_loss_rows, spec_weights

STANDIN = r'''
# A stand-in for timm's train.py: the same imports, the same way to build the losses.
import argparse
import json
import os

import torch
import torch.nn as nn
import timm.loss
from timm.data import Mixup
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy, LabelSmoothingCrossEntropy
from timm.task import ClassificationTask

parser = argparse.ArgumentParser()
parser.add_argument('data')
parser.add_argument('--way', choices=('classes', 'factory', 'task', 'helper', 'none'), default='classes')
parser.add_argument('--smoothing', type=float, default=0.1)
parser.add_argument('--mixup', type=float, default=0.)
parser.add_argument('--bce-loss', action='store_true')
parser.add_argument('--steps', type=int, default=4)
parser.add_argument('--output', required=True)


def main():
    args = parser.parse_args()
    if args.way == 'none':
        return
    world, rank = int(os.environ.get('WORLD_SIZE', '1')), int(os.environ.get('RANK', '0'))
    if world > 1:
        torch.distributed.init_process_group('gloo')
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    mixup_active = args.mixup > 0
    mixup_fn = Mixup(mixup_alpha=args.mixup, label_smoothing=args.smoothing, num_classes=10) if mixup_active else None

    # setup loss function (timm's train.py: the training loss first, then validate_loss_fn)
    if args.way == 'classes':
        if mixup_active:
            train_loss_fn = BinaryCrossEntropy() if args.bce_loss else SoftTargetCrossEntropy()
        elif args.smoothing:
            train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            train_loss_fn = nn.CrossEntropyLoss()
    elif args.way == 'factory':
        train_loss_fn = timm.loss.create_classification_loss(
            loss_type='bce' if args.bce_loss else 'ce', smoothing=args.smoothing, soft_targets=mixup_active)
    elif args.way == 'task':
        train_loss_fn = ClassificationTask(
            model, criterion_kwargs=dict(smoothing=args.smoothing, soft_targets=mixup_active), verbose=False).criterion
    else:
        from standin_losses import build_train_loss
        train_loss_fn = build_train_loss(args.smoothing)
    validate_loss_fn = nn.CrossEntropyLoss()

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    x, y = torch.load(args.data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(args.steps):
        xb, yb = x[step * 32:(step + 1) * 32].clone(), y[step * 32:(step + 1) * 32]
        if mixup_fn is not None:
            torch.manual_seed(step)
            xb, yb = mixup_fn(xb, yb)
        output = model(xb)
        loss = train_loss_fn(output, yb)
        if step == 0:
            torch.save({'output': output.detach(), 'target': yb}, os.path.join(args.output, f'first_batch{rank}.pt'))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f'rank {rank} step {step} train loss {loss.item():.6f}', flush=True)
    with torch.no_grad():
        output = model(x[-64:])
    record = dict(
        train_loss_type=type(train_loss_fn).__name__, train_loss_repr=repr(train_loss_fn),
        validate_loss_type=type(validate_loss_fn).__name__,
        validate_is_torch_ce=type(validate_loss_fn) is torch.nn.modules.loss.CrossEntropyLoss,
        validate_loss=validate_loss_fn(output, y[-64:]).item(),
        validate_reference=nn.functional.cross_entropy(output, y[-64:]).item(),
        train_losses=losses,
        weight_sum=float(sum(p.double().sum() for p in model.parameters())))
    with open(os.path.join(args.output, f'rank{rank}.json'), 'w') as f:
        json.dump(record, f)


if __name__ == '__main__':
    main()
'''

# a helper module beside the script that builds the training loss (counted as the script's code)
HELPER = '''
from timm.loss import LabelSmoothingCrossEntropy


def build_train_loss(smoothing):
    return LabelSmoothingCrossEntropy(smoothing=smoothing)
'''


@pytest.fixture(scope="module")
def standin(shared_data, tmp_path_factory):
    from timm_el import load_mnist

    folder = tmp_path_factory.mktemp("standin")
    (folder / "train.py").write_text(STANDIN)
    (folder / "standin_losses.py").write_text(HELPER)
    images, labels = load_mnist(shared_data, "train", limit=256)
    x = (torch.from_numpy(images).float() / 255.0 - 0.1307) / 0.3081
    torch.save((x, torch.from_numpy(labels)), folder / "mnist256.pt")
    return folder


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(standin, out, *args, torchrun=False, check=True):
    out.mkdir(parents=True, exist_ok=True)
    script = [str(standin / "train.py"), str(standin / "mnist256.pt"), "--output", str(out)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()),
               "-m", "timm_el.launch", *script, *args]
    else:
        cmd = [sys.executable, "-m", "timm_el.launch", *script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def result(out, rank=0):
    record = json.loads((out / f"rank{rank}.json").read_text())
    batch = torch.load(out / f"first_batch{rank}.pt")
    return record, batch["output"].double(), batch["target"]


def check_el(record, z, target, smoothing, soft, log_end=0.75, **el):
    """The first training step's loss is EL on that batch (core and spec), not CE."""
    assert record["train_loss_type"] == ("EncouragingSoftTargetLoss" if soft else "EncouragingLabelSmoothingLoss")
    first = record["train_losses"][0]
    if soft:
        q = target.double()
        ref = encouraging_loss(z, q, log_end=log_end, **el)
        spec = spec_loss_rows(z, q, log_end=log_end, rho=el.get("bonus_rho", 1.0)).mean()
        ce = -(q * torch.log_softmax(z, -1)).sum(-1).mean()
    else:
        ref = encouraging_loss(z, target, smoothing=smoothing, log_end=log_end, **el)
        w = spec_weights(target, z.shape[-1], smoothing)
        spec = spec_loss_rows(z, w, w, log_end=log_end, rho=el.get("bonus_rho", 1.0)).mean()
        ce = torch.nn.functional.cross_entropy(z, target, label_smoothing=smoothing)
    assert first == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    assert first == pytest.approx(float(spec), rel=1e-5, abs=1e-5)
    assert first < float(ce) - 0.02  # the bonus (about log 0.9 per example at the start) makes EL lower than CE
    # validation is untouched: torch's own class and value
    assert record["validate_loss_type"] == "CrossEntropyLoss" and record["validate_is_torch_ce"]
    assert record["validate_loss"] == pytest.approx(record["validate_reference"], rel=1e-6)
    # it trained
    assert len(record["train_losses"]) == 4 and all(abs(v) < 50 for v in record["train_losses"])


CASES = [
    # (the stand-in's way to build its loss, its flags, smoothing, soft targets, what it builds)
    ("classes", ["--smoothing", "0.1"], 0.1, False, "LabelSmoothingCrossEntropy(smoothing=0.1)"),
    ("classes", ["--smoothing", "0"], 0.0, False, "CrossEntropyLoss()"),
    ("classes", ["--mixup", "0.8"], 0.0, True, "SoftTargetCrossEntropy()"),
    ("factory", ["--smoothing", "0.1"], 0.1, False, "create_classification_loss(loss_type='ce', smoothing=0.1"),
    ("factory", ["--mixup", "0.8"], 0.0, True,
     "create_classification_loss(loss_type='ce', smoothing=0.1, soft_targets=True)"),
    ("task", ["--smoothing", "0.2"], 0.2, False, "create_classification_loss(multi_label=False, smoothing=0.2"),
    ("helper", ["--smoothing", "0.1"], 0.1, False, "LabelSmoothingCrossEntropy(smoothing=0.1) at standin_losses.py:6"),
]


@pytest.mark.parametrize("way, flags, smoothing, soft, built", CASES, ids=[f"{c[0]}-{' '.join(c[1])}" for c in CASES])
def test_el_is_the_training_loss(standin, tmp_path, way, flags, smoothing, soft, built):
    proc = launch(standin, tmp_path, "--way", way, *flags, "--loss", "encouraging")
    record, z, target = result(tmp_path)
    check_el(record, z, target, smoothing, soft)
    # the loss values the script printed are the ones it trained with
    printed = [float(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines() if "train loss" in line]
    assert printed == pytest.approx(record["train_losses"], abs=1e-6)
    report = [line for line in proc.stderr.splitlines() if line.startswith("timm_el.launch:")]
    assert len(report) == 1, proc.stderr
    assert f"training loss {record['train_loss_type']}(" in report[0] and f"in place of {built}" in report[0]


def test_el_options_reach_the_loss(standin, tmp_path):
    # launcher flags may stand before the script and between its arguments
    out = tmp_path
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "timm_el.launch", "--log-end=0.5", str(standin / "train.py"),
           str(standin / "mnist256.pt"), "--bonus-rho", "0.5", "--output", str(out), "--smoothing", "0.1",
           "--loss", "encouraging"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    record, z, target = result(out)
    assert "log_end=0.5" in record["train_loss_repr"] and "bonus_rho=0.5" in record["train_loss_repr"]
    check_el(record, z, target, 0.1, False, log_end=0.5, bonus_rho=0.5)


@pytest.mark.parametrize("loss_flags", [["--loss", "ce"], []], ids=["loss-ce", "no-loss-flag"])
@pytest.mark.parametrize("flags, expect", [
    (["--smoothing", "0.1"], "LabelSmoothingCrossEntropy"),
    (["--way", "factory", "--mixup", "0.8"], "SoftTargetCrossEntropy"),
])
def test_loss_ce_runs_the_script_unchanged(standin, tmp_path, loss_flags, flags, expect):
    proc = launch(standin, tmp_path, *flags, *loss_flags)
    record, z, target = result(tmp_path)
    assert record["train_loss_type"] == expect and record["validate_is_torch_ce"]
    if expect == "SoftTargetCrossEntropy":
        ce = -(target * torch.log_softmax(z, -1)).sum(-1).mean()
    else:
        ce = torch.nn.functional.cross_entropy(z, target, label_smoothing=0.1)
    assert record["train_losses"][0] == pytest.approx(float(ce), rel=1e-5)
    assert "running train.py unchanged" in proc.stderr


BAD = [
    (["--loss", "encouraging", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    (["--loss", "encouraging", "--log-end", "x"], "argument --log-end: invalid float value: 'x'"),
    (["--loss", "encouraging", "--bonus", "exp"], "argument --bonus: invalid choice: 'exp'"),
    (["--loss", "encouraging", "--bonus-start", "1"], "--bonus-start must be in [0, 1), got 1.0"),
    (["--loss", "encouraging", "--bonus-rho", "-1"], "--bonus-rho must be a finite number >= 0, got -1.0"),
    (["--loss", "encouraging", "--bonus-smoothing", "2"], "--bonus-smoothing must be in [0, 1), got 2.0"),
    (["--loss", "focal"], "argument --loss: invalid choice: 'focal'"),
    (["--log-end", "0.5"], "--log-end applies to --loss encouraging (got --loss ce)"),
    (["--loss", "encouraging", "--log-end"], "argument --log-end: expected one argument"),
    # refused when the script builds a loss EL cannot replace
    (["--loss", "encouraging", "--mixup", "0.5", "--bce-loss"], "the script's training loss is BinaryCrossEntropy"),
    (["--loss", "encouraging", "--way", "factory", "--bce-loss"],
     "create_classification_loss(loss_type='bce'): EL replaces softmax cross-entropy"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flags_fail_with_one_line(standin, tmp_path, args, message):
    proc = launch(standin, tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm_el.launch: error: ") and message in lines[0], proc.stderr
    assert not list(tmp_path.glob("rank*.json")) and not list(tmp_path.glob("first_batch*"))


def test_launcher_usage_errors_and_help(tmp_path, capsys, monkeypatch):
    # the command itself once (python -m timm_el.launch: exit status 2, one line), then its main() in-process:
    # the same parser and exits without a python start-up each
    proc = subprocess.run([sys.executable, "-m", "timm_el.launch"], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "timm_el.launch: error: the training script is missing" in proc.stderr, proc.stderr
    from timm_el.launch import main

    monkeypatch.setenv("COLUMNS", "80")  # the help's line width, as in a subprocess whose output is a pipe

    def run(*args):
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        out, err = capsys.readouterr()
        return exit_.value.code, out, err

    for args, message in [
        ((), "the training script is missing"),
        (("--loss", "encouraging"), "the training script is missing"),
        ((str(tmp_path / "nope.py"),), "training script"),
        (("--bogus", "train.py"), "unknown option --bogus before the script"),
    ]:
        code, _, err = run(*args)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    code, help_text, _ = run("--help")
    assert code == 0
    for word in ("--loss {ce,encouraging}", "--log-end", "--bonus-rho", "torchrun", "validate_loss_fn",
                 "create_classification_loss", "(default: ce)"):
        assert word in help_text, word


def test_script_without_a_training_loss_is_an_error(standin, tmp_path):
    proc = launch(standin, tmp_path, "--way", "none", "--loss", "encouraging", check=False)
    assert proc.returncode == 1
    assert "returned without building a training loss" in proc.stderr.strip().splitlines()[-1]


def test_torchrun_both_ranks_train_with_el(standin, tmp_path):
    proc = launch(standin, tmp_path, "--smoothing", "0.1", "--loss", "encouraging", torchrun=True)
    reports = [line for line in proc.stderr.splitlines() if "timm_el.launch: training loss" in line]
    assert sorted(line.split("]")[0] for line in reports) == ["[rank 0/2", "[rank 1/2"], proc.stderr
    sums = []
    for rank in (0, 1):
        record, z, target = result(tmp_path, rank)
        check_el(record, z, target, 0.1, False)
        sums.append(record["weight_sum"])
    assert sums[0] == pytest.approx(sums[1], rel=1e-6)  # DDP kept the ranks in step


# ------------------------------------------------------------ in-process pieces


def test_split_argv():
    from timm_el.launch import LaunchError, split_argv

    assert split_argv(["--loss", "encouraging", "t.py", "/data", "--log-end=0.5", "-b", "8", "--bonus", "log"]) == (
        ["--loss", "encouraging", "--log-end=0.5", "--bonus", "log"], "t.py", ["/data", "-b", "8"])
    # near misses are the script's; after "--" nothing is taken
    assert split_argv(["t.py", "--loss-scale", "2", "--log-interval", "5", "--", "--loss", "x"]) == (
        [], "t.py", ["--loss-scale", "2", "--log-interval", "5", "--loss", "x"])
    assert split_argv(["-h"]) == (["-h"], None, [])
    assert split_argv(["t.py", "-h"]) == ([], "t.py", ["-h"])
    with pytest.raises(LaunchError, match="unknown option -b before the script"):
        split_argv(["-b", "8", "t.py"])


def test_patch_is_undone_and_later_losses_are_timms(tmp_path):
    import timm.loss
    import torch.nn as nn

    from timm_el import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss
    from timm_el.launch import LossPatch

    originals = (nn.CrossEntropyLoss, timm.loss.LabelSmoothingCrossEntropy, timm.loss.SoftTargetCrossEntropy,
                 timm.loss.create_classification_loss, timm.task.classification.create_classification_loss)
    lines = []
    with LossPatch({"log_end": 0.75}, str(tmp_path / "train.py"), log=lines.append) as patch:
        assert nn.CrossEntropyLoss is not originals[0] and issubclass(nn.CrossEntropyLoss, originals[0])
        proxy = timm.loss.SoftTargetCrossEntropy
        # timm's and torch's own constructions do not count (JsdCrossEntropy's inner loss, in timm/loss/jsd.py)
        jsd = timm.loss.JsdCrossEntropy._timm_el_launch_original(num_splits=2, smoothing=0.1)
        assert type(jsd.cross_entropy_loss) is originals[1] and patch.installed is None
        # this test module is outside timm and torch: the first loss it builds is the training loss
        first = proxy()
        assert type(first) is EncouragingSoftTargetLoss and patch.installed is first
        assert nn.CrossEntropyLoss is originals[0]  # names put back at once
        second = proxy()  # a name imported before keeps building the original
        assert type(second) is originals[2]

        class Sub(proxy):  # subclassing a stand-in still works
            pass
        assert type(Sub()) is Sub
    assert (nn.CrossEntropyLoss, timm.loss.LabelSmoothingCrossEntropy, timm.loss.SoftTargetCrossEntropy,
            timm.loss.create_classification_loss, timm.task.classification.create_classification_loss) == originals
    assert len(lines) == 1 and "EncouragingSoftTargetLoss" in lines[0] and "test_launch.py:" in lines[0]
    with LossPatch({"log_end": 0.5}, "train.py", log=lines.append):
        loss = timm.loss.create_classification_loss(smoothing=0.1)
        assert type(loss) is EncouragingLabelSmoothingLoss and loss.cfg.log_end == 0.5 and loss.smoothing == 0.1
        assert type(timm.loss.create_classification_loss(smoothing=0.1)) is originals[1]
    assert timm.loss.create_classification_loss is originals[3]
