"""The image recipes end to end (issue 8, item 4): the shell scripts, every stage.

The MNIST recipe (scripts/mnist.sh) runs on a small ImageFolder built from the
real MNIST files of ../shared/data (10 classes x 40 training PNGs from the
training set, 10 x 20 validation PNGs from the test set), two losses x one
seed, one epoch of a narrowed mnist_cnn (flags after ``--``). Checked: each
run's directory (args.yaml with its loss, summary.csv, checkpoints, the
el-result records), the results table (both losses, EL - CE) and PNGs that
decode, that a second run of the recipe skips the finished runs and that an
interrupted run continues from its last.pth.tar. Every recipe refuses a bad
option with one line and creates nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPTS = ("mnist.sh", "cifar.sh", "imagenet_resnet50.sh", "imagenet_efficientnet_b0.sh")
# one short epoch of a narrow mnist_cnn on the CPU
TINY = ["--epochs", "1", "-b", "50", "-j", "0", "--log-interval", "4", "--lr", "0.05",
        "--model-kwargs", "stem_width=16", "widths=(16,32,32)", "depths=(1,1,1)", "feature_dim=64"]




def recipe(script, work, *args, check=True, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["bash", str(ROOT / "scripts" / script)] + (["--work", str(work)] if work else []) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def mnist_folder(mnist_folder_of):
    """MNIST as an ImageFolder: train/<digit>/*.png (40 each), val/<digit>/*.png (20 each)."""
    return mnist_folder_of(40, 20)


@pytest.fixture(scope="module")
def mnist_run(mnist_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("mnist_recipe")
    args = ["--data", mnist_folder, "--losses", "ce,el", "--seeds", "1", "--", *TINY]
    first = recipe("mnist.sh", work, *args)
    return work, args, first


def test_mnist_recipe_end_to_end(mnist_run):
    work, _, first = mnist_run
    import yaml

    for loss, cli_loss in (("ce", "ce"), ("el", "encouraging")):
        run = work / "runs" / f"{loss}-seed1"
        assert (run / "last.pth.tar").is_file() and (run / "model_best.pth.tar").is_file(), sorted(run.iterdir())
        cfg = yaml.safe_load((run / "args.yaml").read_text())
        assert cfg["loss"] == cli_loss and cfg["seed"] == 1 and cfg["model"] == "mnist_cnn"
        # the paper's flags, with the ones after -- replacing them
        assert cfg["opt"] == "momentum" and cfg["weight_decay"] == 5e-4 and cfg["decay_milestones"] == [50, 64]
        assert cfg["epochs"] == 1 and cfg["batch_size"] == 50 and cfg["lr"] == 0.05 and cfg["no_aug"]
        assert (cfg["log_end"] == 0.75) if loss == "el" else (cfg.get("log_end") is None)
        summary = (run / "summary.csv").read_text().splitlines()
        assert summary[0].startswith("epoch") and "eval_top1" in summary[0] and len(summary) == 2
        for tag in ("last", "best"):
            rec = json.loads((run / "eval" / f"{tag}.json").read_text())
            assert rec["schema"] == "el-result/1" and rec["task"] == "mnist" and rec["loss"] == loss
            assert rec["seed"] == 1 and rec["run"] == f"{loss}-seed1" and rec["checkpoint"] == tag
            assert 0.0 <= rec["metrics"]["top1"] <= 100.0 and 0.0 <= rec["metrics"]["top5"] <= 100.0
            assert (run / "eval" / rec["curve"]).resolve() == (run / "summary.csv").resolve()
    # the results stage: both losses, the difference, PNGs that decode
    table = (work / "results" / "summary.md").read_text()
    assert "## mnist, checkpoint last" in table and "## mnist, checkpoint best" in table
    assert any(line.startswith("| ce | 1 |") for line in table.splitlines())
    assert any(line.startswith("| el | 1 |") for line in table.splitlines())
    assert "| EL - CE |" in table
    rows = (work / "results" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # 2 runs x (last, best)
    import matplotlib.image as mpimg

    pngs = sorted((work / "results").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"mnist__last__top1.png", "mnist__best__top1.png", "mnist__curve__eval_top1.png"} <= names, names
    for png in pngs:
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    assert "== train el seed 1" in first.stderr and "--resume" not in first.stderr


def test_rerun_skips_finished_runs(mnist_run):
    work, args, _ = mnist_run
    files = [work / "runs" / f"{loss}-seed1" / name for loss in ("ce", "el")
             for name in ("last.pth.tar", "eval/last.json", "summary.csv")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = recipe("mnist.sh", work, *args)
    assert again.stderr.count("finished") == 2 and again.stderr.count("skipping") == 2, again.stderr
    assert "timm_el.train" not in again.stderr  # no training command was started
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert (work / "results" / "summary.md").is_file()


def test_interrupted_run_resumes_from_last_checkpoint(mnist_run):
    work, args, _ = mnist_run
    run = work / "runs" / "el-seed1"
    checkpoint = (run / "last.pth.tar").stat().st_mtime_ns
    # an interrupted run: the checkpoint is there, the records are not
    for name in ("last.json", "best.json"):
        (run / "eval" / name).unlink()
    again = recipe("mnist.sh", work, "--data", args[1], "--losses", "el", "--seeds", "1", "--stages", "train",
                   "--", *TINY)
    assert f"resuming from {run / 'last.pth.tar'}" in again.stderr, again.stderr
    assert f"--resume {run / 'last.pth.tar'}" in again.stderr
    assert json.loads((run / "eval" / "last.json").read_text())["loss"] == "el"
    # the checkpoint was at the last epoch: nothing more was trained, the curve was kept
    assert (run / "last.pth.tar").stat().st_mtime_ns == checkpoint
    assert len((run / "summary.csv").read_text().splitlines()) == 2
    assert not (work / "runs" / "el-seed1-1").exists()


SHELL_REFUSALS = [
    (["--stages", "train,eval"], "--stages: unknown stage 'eval' (train, results)"),
    (["--losses", "focal"], "--losses: unknown loss 'focal' (ce, el)"),
    (["--seeds", "1 x"], "--seeds: 'x' is not a non-negative integer"),
    (["--gpus", "two"], "--gpus: 'two' is not a non-negative integer"),
    (["--losses", "ce", "--log-end", "0.5"], "--log-end applies to the el runs"),
    (["--bogus"], "unknown option --bogus"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", SHELL_REFUSALS, ids=[a[1].split(":")[0] for a in SHELL_REFUSALS])
def test_recipes_refuse_bad_options(tmp_path, script, args, message):
    work = tmp_path / "work"
    proc = recipe(script, work, "--data", tmp_path, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert lines[0].startswith(f"{script}: error: ")
    assert not work.exists()


CHECKED_REFUSALS = [
    ("mnist.sh", [], "--data: the dataset directory is required"),
    ("mnist.sh", ["--data", "{missing}"], "--data-dir: directory not found"),
    ("mnist.sh", ["--data", "{data}", "--", "--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    ("mnist.sh", ["--data", "{data}", "--", "--seed", "3"], "-- --seed: set by the recipe; use the recipe's --seeds"),
    ("mnist.sh", ["--data", "{data}", "--", "--no-such-flag"], "unknown timm-el-train option --no-such-flag"),
    ("mnist.sh", ["--data", "{data}", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    ("mnist.sh", ["--data", "{data}", "--gpus", "3"], "the paper's batch of 256 does not divide over 3 processes"),
    ("mnist.sh", ["--data", "{data}", "--nodes", "2", "--node-rank", "2"], "--node-rank must be in [0, 1]"),
    ("cifar.sh", ["--dataset", "torch/mnist"], "--dataset: 'torch/mnist' is not one of torch/cifar10, torch/cifar100"),
    ("cifar.sh", ["--model", "vit_base_patch16_224"], "--model: 'vit_base_patch16_224' is not one of resnet50"),
    ("imagenet_resnet50.sh", ["--data", "{data}", "--", "--bonus", "exp"], "--bonus must be one of"),
]


@pytest.mark.parametrize("script, args, message", CHECKED_REFUSALS, ids=[c[2][:30] for c in CHECKED_REFUSALS])
def test_recipes_check_every_run_before_creating_anything(mnist_folder, tmp_path, script, args, message):
    work = tmp_path / "work"
    args = [a.format(data=mnist_folder, missing=tmp_path / "missing") for a in args]
    proc = recipe(script, work, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not work.exists()


def test_recipe_help():
    for script in SCRIPTS:
        proc = recipe(script, None, "--help")
        for word in ("--work DIR", "--stages", "--seeds", "--gpus", "--nodes", "--data", "-- FLAGS", "last.pth.tar"):
            assert word in proc.stdout, (script, word)
    assert "48 hours" in recipe("imagenet_resnet50.sh", None, "--help").stdout
    assert "158 hours" in recipe("imagenet_efficientnet_b0.sh", None, "--help").stdout
    assert "[runs/cifar10_resnet50]" in recipe("cifar.sh", None, "--help").stdout


def test_mnist_smoke_learns_and_is_marked(mnist_folder_of, tmp_path):
    """--smoke on real MNIST digits (2,500 training images): one short epoch of a narrow mnist_cnn learns
    well above chance (10 %); its records, table and plots name the task mnist_smoke."""
    data = mnist_folder_of(250, 100)
    work = tmp_path / "smoke"
    proc = recipe("mnist.sh", work, "--data", data, "--smoke", "--", "-j", "0")
    assert "(smoke run: not a result)" in proc.stderr and "seeds 1" in proc.stderr, proc.stderr[-3000:]
    import yaml

    for loss in ("ce", "el"):
        run = work / "runs" / f"{loss}-seed1"
        assert not (work / "runs" / f"{loss}-seed2").exists()
        cfg = yaml.safe_load((run / "args.yaml").read_text())
        assert cfg["epochs"] == 1 and cfg["batch_size"] == 64 and cfg["model_kwargs"]["stem_width"] == 16
        rec = json.loads((run / "eval" / "last.json").read_text())
        assert rec["task"] == "mnist_smoke" and rec["loss"] == loss
        assert rec["metrics"]["top1"] > 50.0, rec["metrics"]
    table = (work / "results" / "summary.md").read_text()
    assert "## mnist_smoke, checkpoint last" in table and "## mnist, " not in table
    assert (work / "results" / "mnist_smoke__last__top1.png").is_file()


@pytest.mark.parametrize("script, work", [("mnist.sh", "runs/mnist-smoke"), ("cifar.sh", "runs/cifar10_resnet50-smoke"),
                                          ("imagenet_resnet50.sh", "runs/imagenet_resnet50-smoke")])
def test_smoke_runs_go_to_their_own_work_directory(tmp_path, script, work):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), "--smoke", "--stages", "results"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert f"(smoke run: not a result): work directory {work}, stages" in proc.stderr, proc.stderr
    assert (tmp_path / work).is_dir() and not (tmp_path / work.replace("-smoke", "")).exists()
    help_text = recipe(script, None, "--help").stdout
    assert "--smoke" in help_text and "<task>_smoke" in help_text


def test_cifar_smoke_reads_the_real_runs_data(tmp_path):
    # the default --data of cifar.sh is WORK/data: a smoke run keeps the real work directory's
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cifar.sh"), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "runs/cifar10_resnet50/data" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
