"""timm_el.train (``timm-el-train``) when things go wrong: a crafted checkpoint history, hostile
checkpoints, unreadable images, a one-class folder, bad --config files, read-only folders, a full
disk, and a run killed mid-epoch that must resume to the very same weights.

The runs are real (timm's ``test_resnet`` on CPU) on a tiny ImageFolder of MNIST digits: 3 classes
x 12 training and x 4 validation images, a few seconds a run.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from confined import files_under, run_confined  # noqa: E402
from encouraging_loss.tools.files import load_checkpoint_safely  # noqa: E402
from encouraging_loss.tools.results import read_record  # noqa: E402
from test_timm_train import _env, read_summary, restore_logging, run_cli  # noqa: E402,F401 -- a fixture
from timm_el import load_mnist  # noqa: E402
from timm_el import checkpoints as el_checkpoints  # noqa: E402
from timm_el import train as el_train  # noqa: E402

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 12, 4
# 6 updates per epoch; default augmentation (random crops and flips: python's and torch's RNG)
TINY = ["--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "6", "--lr", "0.05",
        "--warmup-epochs", "0", "-j", "0", "--log-interval", "2", "--seed", "1", "--val-split", "val"]


@pytest.fixture(scope="module")
def tiny_source(shared_data, tmp_path_factory) -> Path:
    """``train/<digit>/*.png`` and ``val/<digit>/*.png`` for the digits 0, 1, 2."""
    root = tmp_path_factory.mktemp("tiny_folder")
    images, labels = load_mnist(shared_data, "train", limit=400)
    counts = [0] * CLASSES
    for image, label in zip(images, labels):
        label = int(label)
        if label >= CLASSES or counts[label] >= TRAIN_PER_CLASS + VAL_PER_CLASS:
            continue
        split = "train" if counts[label] < TRAIN_PER_CLASS else "val"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{counts[label]:03d}.png")
        counts[label] += 1
    assert counts == [TRAIN_PER_CLASS + VAL_PER_CLASS] * CLASSES
    return root


@pytest.fixture
def tiny(tiny_source, tmp_path) -> Path:
    """A copy of the tiny folder this test may damage."""
    return Path(shutil.copytree(tiny_source, tmp_path / "data"))


def error_line(proc) -> str:
    """The one error line of a failed run (and no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("timm-el-train: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


def _plain(value):
    """A checkpoint's contents, tensors copied out of the (memory-mapped) file."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def rewrite_checkpoint(path: Path, change) -> None:
    """Replace the checkpoint ``path`` (a new file: its hard links keep the old one) by ``change(contents)``."""
    saved = _plain(load_checkpoint_safely(path, allowed=[argparse.Namespace]))
    change(saved)
    torch.save(saved, path.with_name("new.tmp"))
    os.replace(path.with_name("new.tmp"), path)


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_source, tmp_path_factory) -> Path:
    """A finished 1-epoch run (to copy and resume)."""
    out = tmp_path_factory.mktemp("finished")
    run_cli(tiny_source, *TINY, "--epochs", "1", "--output", out, "--experiment", "run", cwd=out)
    return out / "run"


# ----------------------------------------------------------------------------- 1. the checkpoint history


@pytest.mark.usefixtures("restore_logging")
def test_resume_never_touches_files_named_in_a_crafted_checkpoint_history(tiny_source, finished_run, tmp_path):
    """A checkpoint's saver history naming files outside the run (absolute, ``../``) and a
    ``checkpoint-0.pth.tar`` that is a link to a file outside: resuming with --checkpoint-hist 1
    deletes or rewrites none of them; the run's own history comes from its own files."""
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("a.pth.tar", "b.pth.tar", "linked.pth.tar"):
        (victims / name).write_bytes(b"precious " + name.encode())
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "work" / "run"))

    def craft(saved):  # timm's CheckpointSaver history format; the worst entries are pruned first
        saved["saver"] = {
            "checkpoint_files": [(str(victims / "a.pth.tar"), -1.0), ("../../victims/b.pth.tar", -2.0)],
            "best_epoch": 0, "best_metric": 100.0, "pending": (None, None)}

    rewrite_checkpoint(run_dir / "last.pth.tar", craft)
    (run_dir / "checkpoint-0.pth.tar").unlink()
    (run_dir / "checkpoint-0.pth.tar").symlink_to(victims / "linked.pth.tar")
    before = {p.name: p.read_bytes() for p in victims.iterdir()}

    assert el_train.main([str(tiny_source), *TINY, "--epochs", "2", "--checkpoint-hist", "1",
                          "--resume", str(run_dir / "last.pth.tar")]) == 0
    assert {p.name: p.read_bytes() for p in victims.iterdir()} == before
    assert (run_dir / "checkpoint-0.pth.tar").is_symlink()  # not ours to touch either
    assert (run_dir / "checkpoint-1.pth.tar").is_file()
    assert el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")["epoch"] == 1
    assert "saver" not in el_checkpoints._load_checkpoint_meta(run_dir / "last.pth.tar")


# ----------------------------------------------------------------------------- 2. hostile checkpoints


class _Evil:
    """Unpickling this creates the file ``marker`` (it must never happen)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("flag", ["--resume", "--initial-checkpoint"])
def test_checkpoint_that_would_run_code_is_refused(tiny_source, tmp_path, capsys, monkeypatch, flag):
    """Even where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks torch to unpickle anything."""
    marker = tmp_path / "marker"
    hostile = tmp_path / "shared.pth.tar"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Evil(marker)}, hostile)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny_source), *TINY, "--epochs", "1", flag, str(hostile), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"timm-el-train: error: {flag} {hostile}: refused, it holds objects that are not plain data"), err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # stopped before any work


# ----------------------------------------------------------------------------- 3. the data


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


@pytest.mark.usefixtures("restore_logging")
def test_unreadable_validation_image_stops_naming_it(tiny, tmp_path, capsys):
    """timm would quietly score the next image (and its label) in its place."""
    bad = truncate(tiny / "val" / "1" / f"{TRAIN_PER_CLASS + 1:03d}.png")
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny), *TINY, "--epochs", "1", "--output", str(tmp_path / "out"), "--experiment", "v"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"timm-el-train: error: --val-split 'val': cannot read image {bad}: "), err[-3:]
    assert "truncated" in err[-1] and sum("error" in line for line in err) == 1
    run_dir = tmp_path / "out" / "v"
    assert not (run_dir / "summary.csv").exists() and not (run_dir / "eval").exists()
    assert not list(run_dir.glob("*.pth.tar"))


def test_unreadable_validation_image_in_a_worker_process(tiny, tmp_path):
    bad = truncate(tiny / "val" / "2" / f"{TRAIN_PER_CLASS:03d}.png")
    proc = run_cli(tiny, *TINY, "-j", "1", "--epochs", "1", "--output", tmp_path / "out", "--experiment", "v",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith(f"timm-el-train: error: --val-split 'val': cannot read image {bad}: "), line
    assert not (tmp_path / "out" / "v" / "summary.csv").exists()


def test_unreadable_training_image_is_skipped_named_and_counted(tiny, tmp_path):
    """Skipped as timm does, but named once in the log and counted per epoch (worker processes too)."""
    bad = truncate(tiny / "train" / "0" / "003.png")
    proc = run_cli(tiny, *TINY, "-j", "1", "--epochs", "2", "--output", tmp_path, "--experiment", "t", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count(f"Training image {bad} cannot be read") == 1
    assert "Epoch 0: 1 training image(s) skipped (unreadable); 1 in this run so far." in log
    assert "Epoch 1: 1 training image(s) skipped (unreadable); 2 in this run so far." in log
    run_dir = tmp_path / "t"
    assert (run_dir / "log.txt").read_text().count(f"Training image {bad} cannot be read") == 1
    for name in ("last", "best"):
        info = read_record(run_dir / "eval" / f"{name}.json").info
        assert info["skipped_train_images"] == 2
        assert info["unreadable_train_images"] == [os.path.join("train", "0", "003.png")]


# ----------------------------------------------------------------------------- 4. files


CONFIGS = [
    ("list.yaml", "- loss: ce\n- epochs: 3\n", "holds a YAML list, expected a mapping of timm-el-train flags"),
    ("scalar.yaml", "42\n", "holds a YAML number, expected a mapping"),
    ("broken.yaml", "loss: [ce\nepochs: 3\n", "not valid YAML ("),
    ("empty_list.yaml", "[]\n", "holds a YAML list, expected a mapping"),
    ("binary.yaml", b"\xff\xfe\x00binary", "not UTF-8 text (byte 0)"),
    ("nul.yaml", "loss: ce\n\0\0", "holds NUL bytes"),
    ("deep.yaml", "[" * 100_000 + "]" * 100_000, "nested too deeply to be a file of flags"),
]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("name, content, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_file_is_one_line(tiny_source, tmp_path, capsys, name, content, message):
    config = tmp_path / name
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny_source), "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"timm-el-train: error: --config {str(config)!r}: ") \
        and message in err[0], err


def test_read_only_output_folder(tiny_source, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs", "1",
                         "--output", out, "--experiment", "x"], readonly=[out], cwd=tmp_path, env=_env())
    assert proc.returncode == 2
    assert error_line(proc) == f"timm-el-train: error: --output {out}: cannot write there (Read-only file system)"
    assert list(out.iterdir()) == []


def test_output_folder_under_a_read_only_one(tiny_source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "new" / "runs"
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs", "1",
                         "--output", out], readonly=[parent], cwd=tmp_path, env=_env())
    assert proc.returncode == 2
    assert error_line(proc) == \
        f"timm-el-train: error: --output {out}: {parent}: cannot write there (Read-only file system)"


def test_read_only_run_directory_on_resume(tiny_source, finished_run, tmp_path):
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = files_under(run_dir)
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs",
                         "2", "--resume", run_dir / "last.pth.tar"], readonly=[run_dir], cwd=tmp_path, env=_env())
    assert proc.returncode == 2
    assert error_line(proc) == f"timm-el-train: error: --resume {run_dir}: cannot write there (Read-only file system)"
    assert files_under(run_dir) == before


@pytest.mark.parametrize("size, saved_epochs", [(1_000_000, []), (4_500_000, [0])])
def test_full_disk_stops_with_one_line_and_no_partial_file(tiny_source, tmp_path, size, saved_epochs):
    """On a disk too small for the (3 MB) checkpoints, the run stops at the first checkpoint that
    does not fit, naming it; what is left is whole: no temporary file, no summary row without
    its checkpoint, no record."""
    out = tmp_path / "disk"
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs", "2",
                         "--output", out, "--experiment", "x"], full={out: size}, cwd=tmp_path, env=_env())
    assert proc.returncode == 1
    assert error_line(proc) == f"timm-el-train: error: cannot write {out}/x/last.pth.tar: No space left on device"
    left = proc.leftovers[os.fspath(out.resolve())]
    assert not [name for name in left if name.endswith(".tmp") or "/eval/" in name or name.startswith("eval")]
    expected = {"x/args.yaml", "x/log.txt"}
    if saved_epochs:
        expected |= {"x/summary.csv", "x/last.pth.tar", "x/model_best.pth.tar", "x/checkpoint-0.pth.tar"}
    assert set(left) == expected


# ----------------------------------------------------------------------------- 6. exact resume


def _digest(folder: Path) -> str:
    return (folder / "rank0.sha256").read_text()


@pytest.mark.parametrize("workers, epochs, kill_at, extra", [
    # killed after the 4th update of epoch 1; mixup draws from numpy's RNG; the plateau schedule has a state
    # (and its warmup sets the learning rate when it is made), the history is ranked by the loss
    (0, 3, "1:3", ["--mixup", "0.2", "--sched", "plateau", "--warmup-epochs", "1", "--patience-epochs", "0",
                   "--eval-metric", "loss"]),
    (1, 2, "1:save", []),  # killed while writing epoch 1's checkpoint; a worker process loads the images
], ids=["workers0-mid-epoch-plateau", "workers1-during-save"])
def test_killed_run_resumes_bit_identical(tiny_source, tmp_path, workers, epochs, kill_at, extra):
    """Killed, then --resume RUN/last.pth.tar: the same final weights, bit for bit, the same
    summary.csv, the same checkpoint files as a run that was never interrupted."""
    flags = [*TINY, "-j", str(workers), "--epochs", str(epochs), "--checkpoint-hist", "2", *extra]

    def run(name, *more, env_extra=None, check=True):
        env = _env()
        env[el_train.DIGEST_ENV] = str(tmp_path / f"digest-{name}")
        env.update(env_extra or {})
        return run_cli(tiny_source, *flags, *more, cwd=tmp_path, env=env, check=check)

    run("straight", "--output", tmp_path, "--experiment", "straight")
    killed = run("killed", "--output", tmp_path, "--experiment", "again",
                 env_extra={el_checkpoints.KILL_ENV: kill_at}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = tmp_path / "again"
    assert not (tmp_path / "digest-killed").exists()
    assert el_checkpoints._load_checkpoint_meta(again / "last.pth.tar")["epoch"] == 0  # the previous one, whole
    if kill_at.endswith("save"):
        assert list(again.glob(".last.pth.tar.*.tmp"))  # the write that was cut short
    proc = run("resumed", "--resume", again / "last.pth.tar")
    assert "Random number generators restored from the checkpoint." in proc.stderr + proc.stdout

    assert _digest(tmp_path / "digest-resumed") == _digest(tmp_path / "digest-straight")
    straight = tmp_path / "straight"
    assert read_summary(again) == read_summary(straight)
    rows = read_summary(again)[1]
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    names = sorted(p.name for p in again.iterdir() if p.name.endswith(".pth.tar"))
    assert names == sorted(p.name for p in straight.iterdir() if p.name.endswith(".pth.tar"))
    # the --checkpoint-hist 2 best epochs (ties: the earlier), pruned within the run directory
    by_loss = "loss" in extra
    ranked = sorted(range(epochs), key=lambda e: (float(rows[e]["eval_loss"]) if by_loss
                                                  else -float(rows[e]["eval_top1"]), e))
    assert [n for n in names if n.startswith("checkpoint-")] == sorted(f"checkpoint-{e}.pth.tar" for e in ranked[:2])
    assert el_checkpoints._load_checkpoint_meta(again / "model_best.pth.tar")["epoch"] == ranked[0]
    assert not list(again.glob(".*.tmp"))
    for name in ("last", "best"):
        assert read_record(again / "eval" / f"{name}.json").metrics == \
            read_record(straight / "eval" / f"{name}.json").metrics


@pytest.mark.usefixtures("restore_logging")
def test_resume_without_saved_generators_warns(tiny_source, finished_run, tmp_path, capsys):
    """A checkpoint of an older timm-el-train (no RNG state) still resumes, saying it is not exact."""
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    rewrite_checkpoint(run_dir / "last.pth.tar", lambda saved: saved.pop("rng"))
    assert el_train.main([str(tiny_source), *TINY, "--epochs", "2", "--resume", str(run_dir / "last.pth.tar")]) == 0
    assert "--resume: the checkpoint holds no random number generator state" in capsys.readouterr().err
    assert [int(r["epoch"]) for r in read_summary(run_dir)[1]] == [0, 1]
