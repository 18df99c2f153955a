"""timm_el.checkpoints: the run's saver and its resume. A crafted checkpoint history never reaches a file
outside the run, a checkpoint that would run code is refused, a run killed mid-epoch resumes to the very
same weights, a checkpoint without saved random generators resumes with a warning. The runs are real
(timm's ``test_resnet`` on CPU, ``timm_cli.TINY``: 3 classes x 12 training and x 4 validation images).
"""
import argparse
import os
import shutil
from pathlib import Path

import pytest
import torch

from encouraging_loss.tools.files import load_checkpoint_safely
from encouraging_loss.tools.results import read_record
from timm_el import checkpoints as el_checkpoints
from timm_el import train as el_train

from timm_cli import TINY, cli_env, read_summary, run_cli


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
        env = cli_env()
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
