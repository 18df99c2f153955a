"""timm_el.analyze (el-analyze) and scripts/mnist_fashion_ood.sh, end to end on real data (CPU).

The script trains two tiny models (a narrowed mnist_cnn, one epoch on the first
500 MNIST training images of ../shared/data, CE and EL) through
scripts/mnist.sh, analyses them with MNIST test (first 200) in distribution and
Fashion-MNIST test (first 200) out of distribution, and prints the summary
beside the paper's numbers. The CLI then runs on the same checkpoints with the
shared data's idx folders, the linear probe and a plain state-dict checkpoint.
Checked: every number of the reports present and finite, every PNG decodes and
is not blank, the accuracy equals the training run's own validation top-1
(same preprocessing), a rerun skips every finished stage, and bad input fails
with one line.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confined import NO_SPACE, READ_ONLY, leftovers, one_error_line, run_confined
from helpers import PY, ROOT

pytest.importorskip("timm")
from matplotlib.image import imread

from encouraging_loss.tools.analysis import OOD_SCORES, REPORT_FILES
from timm_el import analyze as A

TINY = ["-b", "50", "-j", "0", "--log-interval", "100", "--lr", "0.05",
        "--model-kwargs", "stem_width=16", "widths=(16,32,32)", "depths=(1,1,1)", "feature_dim=64"]
KWARGS = ["stem_width=16", "widths=(16,32,32)", "depths=(1,1,1)", "feature_dim=64"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHON=sys.executable,
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def script(*args, check=True):
    cmd = ["bash", str(ROOT / "scripts" / "mnist_fashion_ood.sh"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def cli(*args, check=True):
    cmd = [sys.executable, "-m", "timm_el.analyze", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def script_args(work, shared_data):
    return ["--work", work, "--data", shared_data, "--train-limit", "500", "--test-limit", "200",
            "--epochs", "1", "--seeds", "1", "--", *TINY]


@pytest.fixture(scope="module")
def ood_run(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("ood")
    return work, script(*script_args(work, shared_data))


def _numbers(node, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for k, v in enumerate(node):
            yield from _numbers(v, f"{path}[{k}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def check_report(out: Path, names, *, ood=True, probe=False):
    """The report's files: JSON with every number finite, the Markdown table, PNGs that decode."""
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == list(names)
    for name, s in report["models"].items():
        numbers = dict(_numbers(s))
        assert numbers and all(math.isfinite(v) for v in numbers.values()), name
        assert 0 <= s["accuracy"] <= 100 and 0 <= s["ece"] <= 100
        for key in ("mean", "median", "q05", "q95", "negative_pct"):
            assert isinstance(s["margin"][key], float)
        for key in ("target_mean", "non_target_mean", "min_mean", "free_mean"):
            assert isinstance(s["energy"]["data"][key], float)
        assert len(s["energy_per_class"]["target"]) == 10 and len(s["reliability"]) == 15
        if ood:
            for score in OOD_SCORES:
                assert 0 <= s["ood"][score]["auroc"] <= 100 and 0 <= s["ood"][score]["fpr95"] <= 100
            assert isinstance(s["energy"]["ood"]["min_mean"], float)
        else:
            assert s["ood"] is None
        assert (s["probe"] is not None) == probe
        if probe:
            assert 0 <= s["probe"]["accuracy"] <= 100
    md = (out / "report.md").read_text()
    assert md.startswith("| measurement | " + " | ".join(names) + " |")
    pngs = [f for key, f in REPORT_FILES.items() if f.endswith(".png") and (ood or key != "ood_scores")]
    for png in pngs:
        image = imread(out / png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0.01, png
    return report


# ----------------------------------------------------------------------------- the script


def test_script_end_to_end(ood_run):
    work, proc = ood_run
    for loss in ("ce", "el"):
        args = (work / "runs" / f"{loss}-seed1" / "args.yaml").read_text()
        assert "dataset: torch/mnist" in args and "epochs: 1" in args
    prepared = json.loads((work / "data" / "prepared.json").read_text())
    assert prepared["counts"] == {"mnist/train": 500, "mnist/test": 200, "fashion_mnist/train": 500,
                                  "fashion_mnist/test": 200}
    report = check_report(work / "analysis" / "seed1", ["CE", "EL"])
    # el-analyze preprocesses as timm-el-train validates: the same top-1 on the same 200 images
    for name, loss in (("CE", "ce"), ("EL", "el")):
        record = json.loads((work / "runs" / f"{loss}-seed1" / "eval" / "last.json").read_text())
        assert report["models"][name]["accuracy"] == pytest.approx(record["metrics"]["top1"], abs=1e-6)
        assert report["models"][name]["n"] == 200 and report["models"][name]["ood"]["n"] == 200
    # the summary: the seed's numbers beside the paper's
    summary = json.loads((work / "analysis" / "ood_summary.json").read_text())
    for name in ("CE", "EL"):
        s = report["models"][name]["ood"]["min_energy"]
        assert summary["models"][name]["min_energy/auroc"]["mean"] == pytest.approx(s["auroc"])
        assert summary["models"][name]["min_energy/fpr95"]["mean"] == pytest.approx(s["fpr95"])
    ce = report["models"]["CE"]["ood"]["min_energy"]
    assert f"| CE | {report['models']['CE']['accuracy']:.2f} | {ce['auroc']:.2f} | 95.68 | {ce['fpr95']:.2f} | " \
           f"20.92 |" in proc.stdout
    assert "| EL |" in proc.stdout and "| 98.04 |" in proc.stdout and "| 8.69 |" in proc.stdout


def test_script_rerun_skips_finished_stages(ood_run, shared_data):
    work, _ = ood_run
    report = work / "analysis" / "seed1" / "report.json"
    before = report.stat().st_mtime_ns
    again = script(*script_args(work, shared_data))
    assert "prepared already" in again.stderr
    assert "ce-seed1: finished" in again.stderr and "el-seed1: finished" in again.stderr
    assert "analysis of seed 1: done" in again.stderr
    assert report.stat().st_mtime_ns == before
    assert "| paper AUROC |" in again.stdout


def test_script_refuses_bad_options(tmp_path):
    for args, message in ((["--seeds", "x"], "--seeds: 'x' is not a non-negative integer"),
                          (["--epochs", "0"], "--epochs: '0' is not an integer >= 1"),
                          (["--data", tmp_path / "missing"], "--data: directory not found"),
                          (["--stages", "train,plot"], "--stages: unknown stage 'plot'")):
        proc = script("--work", tmp_path / "w", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- the CLI


def test_cli_on_idx_folders_with_probe(ood_run, shared_data, tmp_path):
    work, _ = ood_run
    out = tmp_path / "report"
    proc = cli(work / "runs" / "ce-seed1", work / "runs" / "el-seed1", "--names", "CE", "EL",
               "--data-dir", shared_data / "mnist", "--ood-data-dir", shared_data / "fashion-mnist",
               "--max-samples", "150", "--probe", "--probe-epochs", "10", "--which", "best", "--out", out)
    report = check_report(out, ["CE", "EL"], probe=True)
    s = report["models"]["EL"]
    assert s["n"] == 150 and s["ood"]["n"] == 150 and s["probe"]["n_train"] == 150
    assert report["meta"]["models"]["EL"]["loss"] == "encouraging"
    assert report["meta"]["models"]["CE"]["checkpoint"].endswith("model_best.pth.tar")
    # the table printed is the one written
    assert proc.stdout == (out / "report.md").read_text()
    assert "linear probe accuracy (%)" in proc.stdout
    # an existing report is never overwritten without --force
    again = cli(work / "runs" / "ce-seed1", "--data-dir", shared_data / "mnist", "--out", out, check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"el-analyze: error: --out {str(out)!r}: a report exists ({out / 'report.json'}); use --force to overwrite it"]


def test_cli_plain_checkpoint_matches_the_run(ood_run, tmp_path, capsys):
    """A bare state dict with --model gives the same numbers as the training checkpoint."""
    work, _ = ood_run
    run = work / "runs" / "el-seed1"
    state = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=False)["state_dict"]
    torch.save(state, tmp_path / "plain.pth")
    common = ["--data-dir", work / "data", "--dataset", "torch/mnist", "--split", "test", "--max-samples", "60"]
    assert A.main([str(run), *map(str, common), "--out", str(tmp_path / "a")]) == 0
    assert A.main([str(tmp_path / "plain.pth"), "--model", "mnist_cnn", "--model-kwargs", *KWARGS,
                   *map(str, common), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())["models"]["el-seed1"]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["models"]["plain"]
    assert a == b
    check_report(tmp_path / "b", ["plain"], ood=False)
    assert not (tmp_path / "b" / "ood_scores.png").exists()


@pytest.mark.parametrize("make_args, message", [
    (lambda w, d, t: [t / "nope", "--data-dir", d / "mnist"], "CHECKPOINT '{t}/nope': checkpoint not found"),
    (lambda w, d, t: [t, "--data-dir", d / "mnist"], "CHECKPOINT '{t}': run directory without last.pth.tar"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", t / "missing"], "--data-dir: directory not found"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", d / "mnist", "--ood-data-dir", t / "gone"],
     "--ood-data-dir: directory not found"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", d / "mnist", "--dataset", "torch/mnist"],
     "--data-dir '{d}/mnist' (--dataset torch/mnist, split 'validation'): Dataset not found"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", t], "--data-dir '{t}' (ImageFolder, split"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", w / "runs" / "el-seed1", "--names", "A", "--data-dir", d],
     "--names: 1 name(s) for 2 checkpoint(s)"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", w / "runs" / "ce-seed1", "--data-dir", d],
     "--names: 'ce-seed1' twice"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", d, "--ema"], "--ema: CHECKPOINT"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", d, "-b", "0"], "--batch-size must be an integer >= 1"),
    (lambda w, d, t: [w / "runs" / "ce-seed1", "--data-dir", d, "--model", "resnet18"],
     "--model resnet18: CHECKPOINT"),
    (lambda w, d, t: [w / "data" / "prepared.json", "--data-dir", d], "CHECKPOINT {w}/data/prepared.json: not a "),
])
def test_bad_input_fails_with_one_line(ood_run, shared_data, tmp_path, capsys, make_args, message):
    work, _ = ood_run
    args = [str(a) for a in make_args(work, shared_data, tmp_path)] + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        A.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("el-analyze: error: "), err
    assert message.format(t=tmp_path, d=shared_data, w=work) in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_plain_checkpoint_needs_model(ood_run, shared_data, tmp_path, capsys):
    work, _ = ood_run
    state = torch.load(work / "runs" / "ce-seed1" / "last.pth.tar", map_location="cpu", weights_only=False)
    torch.save(state["state_dict"], tmp_path / "bare.pth")
    with pytest.raises(SystemExit):
        A.main([str(tmp_path / "bare.pth"), "--data-dir", str(shared_data / "mnist"), "--out", str(tmp_path / "o")])
    assert "give the architecture with --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        A.main([str(tmp_path / "bare.pth"), "--model", "mnist_cnn", "--data-dir", str(shared_data / "mnist"),
                "--out", str(tmp_path / "o")])
    assert "does not fit --model mnist_cnn" in capsys.readouterr().err  # the narrowed widths are missing


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        A.main(["--help"])
    out = capsys.readouterr().out
    assert "--ood-data-dir" in out and "--probe" in out and "(default: 15)" in out


# ----------------------------------------------------------------------------- damaged runs (issue 16)


def _train_namespace(*extra):
    from timm_el.train import build_parser

    return build_parser().parse_args(["--model", "mnist_cnn", "--model-kwargs", *TINY_KWARGS, *extra])


TINY_KWARGS = ["stem_width=8", "widths=(8,8,8)", "depths=(1,1,1)", "feature_dim=16"]


@pytest.fixture(scope="module")
def tiny_weights():
    """The state dict of an untrained, narrowed mnist_cnn (no training: the tests below are about files)."""
    import timm

    import timm_el  # noqa: F401 -- registers mnist_cnn

    torch.manual_seed(0)
    model = timm.create_model("mnist_cnn", num_classes=10, in_chans=1, stem_width=8, widths=(8, 8, 8),
                              depths=(1, 1, 1), feature_dim=16)
    return model.state_dict()


def _run_dir(folder: Path, weights, args=None, yaml_text=None) -> Path:
    folder.mkdir(parents=True)
    torch.save({"state_dict": weights, "epoch": 0, **({"args": args} if args is not None else {})},
               folder / "last.pth.tar")
    if yaml_text is not None:
        (folder / "args.yaml").write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
    return folder


def _one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        A.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("el-analyze: error: "), err
    return lines[0][len("el-analyze: error: "):]


@pytest.mark.parametrize("text, problem", [
    ("- --model\n- mnist_cnn\n", "holds a YAML list, expected a mapping of timm-el-train flags"),
    ("mnist_cnn\n", "holds a YAML string, expected a mapping of timm-el-train flags"),
    ("model: [mnist_cnn\nin_chans: 1\n", "not valid YAML ("),
    (b"model: mnist\xff_cnn\n", "not UTF-8 text (byte 12)"),
    ("model: mnist_cnn\n\0\0\0\0", "holds NUL bytes (a damaged or partly written file)"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to be a file of flags"),
    ("model: mnist_cnn\nin_chans: one\n",
     "training flag 'in_chans' is 'one', expected an integer >= 1 or null (give it with --in-chans)"),
    ("model: mnist_cnn\nmodel_kwargs: [1, 2]\n", "training flag 'model_kwargs' is [1, 2], expected a mapping"),
    ("model: mnist_cnn\n1: 2\n", "1 is not a training flag name"),
])
def test_args_yaml_that_is_no_mapping_of_flags(tiny_weights, shared_data, tmp_path, capsys, text, problem):
    """args.yaml as a list was an AttributeError traceback ('list' object has no attribute 'items'),
    a non-UTF-8 one a UnicodeDecodeError, a wrong-typed flag a crash deep inside timm."""
    run = _run_dir(tmp_path / "run", tiny_weights, yaml_text=text)
    line = _one_error_line(capsys, [run, "--data-dir", shared_data / "mnist", "--out", tmp_path / "out"])
    assert line.startswith(f"{run / 'args.yaml'}: {problem}"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, problem", [
    (lambda a: delattr(a, "model"), "its stored training flags name no model; give the architecture with --model"),
    (lambda a: setattr(a, "in_chans", "1"), "training flag 'in_chans' is '1', expected an integer >= 1 or null"),
    (lambda a: setattr(a, "img_size", True), "training flag 'img_size' is True, expected an integer >= 1"),
    (lambda a: setattr(a, "input_size", [1, 28]), "training flag 'input_size' is [1, 28], expected null or three"),
    (lambda a: setattr(a, "mean", ["a"]), "training flag 'mean' is ['a'], expected null or a list of numbers"),
    (lambda a: setattr(a, "model", 7), "training flag 'model' is 7, expected a timm model name (give it with --model)"),
])
def test_checkpoint_flags_missing_or_wrong_typed(tiny_weights, shared_data, tmp_path, capsys, change, problem):
    """A checkpoint whose args lacks a flag el-analyze reads was an AttributeError traceback."""
    args = _train_namespace()
    change(args)
    run = _run_dir(tmp_path / "run", tiny_weights, args=args)
    line = _one_error_line(capsys, [run, "--data-dir", shared_data / "mnist", "--out", tmp_path / "out"])
    assert problem in line and str(run / "last.pth.tar") in line, line
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_in_chans_takes_the_training_default(tiny_weights, shared_data, tmp_path, capsys):
    """``args`` without ``in_chans`` (an older timm-el-train): the training CLI's default, as for args.yaml
    (None: the model's own, 1 for mnist_cnn). It was ``AttributeError: ... 'in_chans'``."""
    args = _train_namespace()
    del args.in_chans, args.img_size, args.crop_pct
    run = _run_dir(tmp_path / "run", tiny_weights, args=args)
    assert A.main([str(run), "--data-dir", str(shared_data / "mnist"), "--max-samples", "20",
                   "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["models"]["run"]["n"] == 20 and report["meta"]["models"]["run"]["model"] == "mnist_cnn"


def test_ood_set_that_is_the_evaluated_set_is_refused(tiny_weights, shared_data, tmp_path, capsys):
    """``--ood-data-dir DATA`` (the folder holding mnist/ and fashion-mnist/) read DATA/mnist as the OOD set:
    MNIST against itself, AUROC about 50, without a word (issue 18). Now one line, before any model runs."""
    run = _run_dir(tmp_path / "run", tiny_weights, args=_train_namespace())
    line = _one_error_line(capsys, [run, "--data-dir", shared_data / "mnist", "--ood-data-dir", shared_data,
                                    "--out", tmp_path / "out"])
    assert line.startswith(f"--ood-data-dir {str(shared_data)!r}: holds the same 10000 images as --data-dir "
                           f"{str(shared_data / 'mnist')!r} (split 'validation')"), line
    assert not (tmp_path / "out").exists()
    # the same folder with another split, and Fashion-MNIST, are other images
    assert not A.same_images(A.open_dataset(A.DataSpec(str(shared_data / "mnist"), "", "test", "-", "-"), "L"),
                             A.open_dataset(A.DataSpec(str(shared_data / "mnist"), "", "train", "-", "-"), "L"))
    assert not A.same_images(A.open_dataset(A.DataSpec(str(shared_data / "mnist"), "", "test", "-", "-"), "L"),
                             A.open_dataset(A.DataSpec(str(shared_data / "fashion-mnist"), "", "test", "-", "-"),
                                            "L"))
    assert A.main([str(run), "--data-dir", str(shared_data / "mnist"), "--ood-data-dir",
                   str(shared_data / "fashion-mnist"), "--max-samples", "20", "--out", str(tmp_path / "ok")]) == 0


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, shared_data, capsys):
    """Checkpoints are read with weights_only=True passed explicitly (encouraging_loss.tools.files)."""
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "args": _RunsCode(marker)}, run / "last.pth.tar")
    line = _one_error_line(capsys, [run, "--data-dir", shared_data / "mnist", "--out", tmp_path / "out"])
    assert line.startswith(f"CHECKPOINT {run / 'last.pth.tar'}: refused, it holds objects that are not plain data")
    assert not marker.exists()


def test_out_that_cannot_be_created_fails_before_any_model_runs(tiny_weights, shared_data, tmp_path, capsys):
    """--out below a file was a FileExistsError traceback after every forward pass."""
    run = _run_dir(tmp_path / "run", tiny_weights, args=_train_namespace())
    (tmp_path / "file").write_text("x")
    line = _one_error_line(capsys, [run, "--data-dir", shared_data / "mnist", "--out", tmp_path / "file" / "out"])
    assert line == f"--out {tmp_path / 'file' / 'out'}: cannot be created, {tmp_path / 'file'} is not a folder"


def run(cmd, **kw):
    return run_confined([PY, *map(str, cmd)], env=_env(), cwd=ROOT, timeout=300, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A timm-el-train-style run directory: an untrained, narrowed mnist_cnn and its stored flags."""
    import timm
    import torch

    import timm_el  # noqa: F401 -- registers mnist_cnn
    from timm_el.train import build_parser

    run_dir = tmp_path_factory.mktemp("analyze") / "ce-seed1"
    run_dir.mkdir()
    kwargs = ["stem_width=8", "widths=(8,8,8)", "depths=(1,1,1)", "feature_dim=16"]
    args = build_parser().parse_args(["--model", "mnist_cnn", "--model-kwargs", *kwargs])
    torch.manual_seed(0)
    model = timm.create_model("mnist_cnn", num_classes=10, in_chans=1, stem_width=8, widths=(8, 8, 8),
                              depths=(1, 1, 1), feature_dim=16)
    torch.save({"state_dict": model.state_dict(), "args": args, "epoch": 0}, run_dir / "last.pth.tar")
    return run_dir


def _analyze(tiny_run, shared_data, out):
    return ["-m", "timm_el.analyze", tiny_run, "--data-dir", shared_data / "mnist", "--ood-data-dir",
            shared_data / "fashion-mnist", "--max-samples", "20", "--device", "cpu", "--out", out]


def test_analyze_read_only_out(tiny_run, shared_data, tmp_path):
    """It was an OSError traceback after every forward pass had run; now one line before any."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = run(_analyze(tiny_run, shared_data, ro / "report"), readonly=[ro])
    assert proc.returncode == 2
    assert one_error_line(proc, "el-analyze: error:") == \
        f"el-analyze: error: --out {ro / 'report'}: cannot create it in {ro} ({READ_ONLY})"
    assert "images" not in proc.stderr  # no model ran


def test_analyze_full_disk_leaves_nothing(tiny_run, shared_data, tmp_path):
    """A full disk left report.json, report.md and a cut-off margins.png."""
    out = tmp_path / "report"
    proc = run(_analyze(tiny_run, shared_data, out), full={out: 40_000})
    assert proc.returncode == 2
    line = one_error_line(proc, "el-analyze: error:")
    assert line.startswith(f"el-analyze: error: --out {str(out)!r}: cannot write {out}/") and line.endswith(NO_SPACE)
    assert leftovers(proc, out) == {}
