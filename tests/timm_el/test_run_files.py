"""timm_el.run_files: the run's name and folder, and what happens when the output folder is read-only or the
disk is full (one line, no partial file; the runs are real, ``timm_cli.TINY``, in a user + mount namespace:
tests/confined.py).
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

from timm_el import run_files as el_run_files
from timm_el import train as el_train

from confined import files_under, run_confined
from timm_cli import TINY, cli_env, error_line


def test_task_name(tmp_path):
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--model", "mnist_cnn", "--dataset",
                                                        "torch/mnist"])) == "mnist_mnist_cnn"
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--model", "resnet18"])) == \
        "imagefolder_resnet18"
    assert el_run_files._task_name(el_train.parse_args([str(tmp_path), "--task-name", "cifar10_r50"])) == "cifar10_r50"


def test_read_only_output_folder(tiny_source, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs", "1",
                         "--output", out, "--experiment", "x"], readonly=[out], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2
    assert error_line(proc) == f"timm-el-train: error: --output {out}: cannot write there (Read-only file system)"
    assert list(out.iterdir()) == []


def test_output_folder_under_a_read_only_one(tiny_source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "new" / "runs"
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs", "1",
                         "--output", out], readonly=[parent], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2
    assert error_line(proc) == \
        f"timm-el-train: error: --output {out}: {parent}: cannot write there (Read-only file system)"


def test_read_only_run_directory_on_resume(tiny_source, finished_run, tmp_path):
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = files_under(run_dir)
    proc = run_confined([sys.executable, "-m", "timm_el.train", tiny_source, *TINY, "--epochs",
                         "2", "--resume", run_dir / "last.pth.tar"], readonly=[run_dir], cwd=tmp_path, env=cli_env())
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
                         "--output", out, "--experiment", "x"], full={out: size}, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 1
    assert error_line(proc) == f"timm-el-train: error: cannot write {out}/x/last.pth.tar: No space left on device"
    left = proc.leftovers[os.fspath(out.resolve())]
    assert not [name for name in left if name.endswith(".tmp") or "/eval/" in name or name.startswith("eval")]
    expected = {"x/args.yaml", "x/log.txt"}
    if saved_epochs:
        expected |= {"x/summary.csv", "x/last.pth.tar", "x/model_best.pth.tar", "x/checkpoint-0.pth.tar"}
    assert set(left) == expected
