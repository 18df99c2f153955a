"""timm_el.mnist_ood: the data preparation and the summary of scripts/mnist_fashion_ood.sh
(the script itself runs end to end in tests/timm_el/test_analyze.py)."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("timm")
from timm_el import mnist_ood as M
from timm_el.data import load_mnist, read_idx


def test_write_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    M.write_idx(tmp_path / "x-idx3-ubyte", images)
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) and len(raw) == 16 + 24
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte", 3), images)


def test_prepare_from_the_shared_layout(shared_data, tmp_path, capsys):
    from timm.data import create_dataset

    root = tmp_path / "data"
    record = M.prepare(root, shared_data, train_limit=30, test_limit=20)
    assert record["counts"] == {"mnist/train": 30, "mnist/test": 20, "fashion_mnist/train": 30,
                                "fashion_mnist/test": 20}
    # the first images and labels, unchanged, in torchvision's layout, readable without a download
    for name, folder in (("torch/mnist", "mnist"), ("torch/fashion_mnist", "fashion-mnist")):
        images, labels = load_mnist(shared_data / folder, "test", limit=20)
        ds = create_dataset(name, root=str(root), split="test", download=False)
        assert len(ds) == 20
        for k in (0, 19):
            image, label = ds[k]
            assert label == labels[k] and np.array_equal(np.asarray(image), images[k])
    assert len(create_dataset("torch/mnist", root=str(root), split="train", download=False)) == 30
    # prepared the same way: kept; other limits: refused
    stamp = (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").stat().st_mtime_ns
    assert M.prepare(root, shared_data, train_limit=30, test_limit=20) == record
    assert "prepared already" in capsys.readouterr().err
    assert (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").stat().st_mtime_ns == stamp
    with pytest.raises(M.MnistOodError, match="was prepared from .* with limits 30/20, not .* with 40/20"):
        M.prepare(root, shared_data, train_limit=40, test_limit=20)


def test_prepare_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(M.MnistOodError, match="--data: directory not found"):
        M.prepare(tmp_path / "r", tmp_path / "missing")
    with pytest.raises(M.MnistOodError, match="--train-limit must be an integer >= 1, got 0"):
        M.prepare(tmp_path / "r", tmp_path, train_limit=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MnistOodError, match="no mnist files"):
        M.prepare(tmp_path / "r", tmp_path / "empty")
    with pytest.raises(SystemExit) as exc:
        M.main(["prepare", "--root", str(tmp_path / "r"), "--data", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"timm_el.mnist_ood: error: --data: directory not found: {str(tmp_path / 'missing')!r}"]


def _report(folder, values):
    """A report.json with models CE / EL: (accuracy, AUROC, FPR95) per model, the same for every score."""
    models = {}
    for name, (acc, auc, fpr) in values.items():
        models[name] = {"accuracy": acc, "ood": {s: {"auroc": auc, "fpr95": fpr} for s in
                                                 ("min_energy", "msp", "free_energy")}}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"models": models}))
    return folder


def test_summary_over_seeds_beside_the_paper(tmp_path, capsys):
    a = _report(tmp_path / "seed1", {"CE": (99.0, 90.0, 30.0), "EL": (99.2, 96.0, 10.0)})
    b = _report(tmp_path / "seed2", {"CE": (99.4, 92.0, 20.0), "EL": (99.4, 98.0, 12.0)})
    summary = M.summarize_reports([a, b])
    ce = summary["models"]["CE"]
    assert ce["accuracy"]["mean"] == pytest.approx(99.2) and ce["accuracy"]["n"] == 2
    assert ce["min_energy/auroc"] == {"mean": pytest.approx(91.0), "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert summary["models"]["EL"]["min_energy/fpr95"]["std"] == pytest.approx(math.sqrt(2))
    assert M.main(["summary", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over 2 seed(s)" in out
    assert "| CE | 99.20 ± 0.28 | 91.00 ± 1.41 | 95.68 | 25.00 ± 7.07 | 20.92 |" in out
    assert "| EL | 99.30 ± 0.14 | 97.00 ± 1.41 | 98.04 | 11.00 ± 1.41 | 8.69 |" in out
    assert (tmp_path / "out" / "ood_summary.md").read_text() == out
    assert json.loads((tmp_path / "out" / "ood_summary.json").read_text())["paper"] == M.PAPER
    # one seed: no std
    assert "| CE | 99.00 | 90.00 | 95.68 | 30.00 | 20.92 |" in M.render_summary(M.summarize_reports([a]))


def test_summary_refuses_missing_or_incomplete_reports(tmp_path):
    with pytest.raises(M.MnistOodError, match="no report.json"):
        M.summarize_reports([tmp_path])
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"models": {"CE": {"accuracy": 1.0, "ood": None}}}))
    with pytest.raises(M.MnistOodError, match="model CE has no OOD results"):
        M.summarize_reports([folder])
