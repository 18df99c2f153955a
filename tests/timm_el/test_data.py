"""timm_el.data: MNIST's IDX files read (``load_mnist``), and images that cannot be read: a validation image
stops the run naming it (in the main process and in a data-loader worker), a training image is skipped, named
and counted in the result record. The runs are real (timm's ``test_resnet`` on CPU, ``timm_cli.TINY``).
"""
import os
from pathlib import Path

import numpy as np
import pytest

from encouraging_loss.tools.results import read_record
from timm_el import load_mnist
from timm_el import train as el_train

from timm_cli import TINY, error_line, run_cli

TRAIN_PER_CLASS = 12  # tiny_source's training images per class: the validation images are numbered on


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


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


def test_load_mnist(shared_data, tmp_path):
    images, labels = load_mnist(shared_data, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_images, train_labels = load_mnist(shared_data / "mnist", "train", limit=100)
    assert train_images.shape == (100, 28, 28) and train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert 0 < train_images.mean() < 255 and train_images.max() == 255
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of train, test, got 'valid'"):
        load_mnist(shared_data, "valid")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not a uint8 idx file with 3 dimension"):
        load_mnist(tmp_path, "test")


