"""Read-only and full output folders for the results table, el-analyze, el-quickstart and the image
recipe's run step (issue 16, "Reliability").

Each command runs as a user runs it (a subprocess) in a user + mount namespace where its output
folder is really read-only, or a tiny tmpfs that fills up ("No space left on device"); see
tests/confined.py. Checked: exit status non-zero, exactly one error line naming the folder or the
file, no traceback, and nothing partial left in a full folder: no 0-byte PNG, no half table, no
temporary file, and with --force the previous outputs exactly as they were.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from confined import files_under, needs_confinement, run_confined

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


@pytest.fixture(autouse=True)
def _confinable():
    needs_confinement()


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run(cmd, **kw):
    return run_confined([PY, *map(str, cmd)], env=_env(), cwd=ROOT, timeout=300, **kw)


def error_line(proc, prefix):
    """The one error line of a failed command (other stderr lines are progress)."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def leftovers(proc, folder):
    return proc.leftovers[os.fspath(Path(folder).resolve())]


# ----------------------------------------------------------------------------- python -m encouraging_loss.tools.results


def _records(root, seeds=(1, 2, 3)):
    """el-result/1 records of CE and EL runs with a timm summary.csv each."""
    for loss, base in (("ce", 60.0), ("el", 62.0)):
        for seed in seeds:
            run_dir = Path(root) / f"{loss}-{seed}"
            (run_dir / "eval").mkdir(parents=True)
            (run_dir / "summary.csv").write_text(
                "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n" +
                "".join(f"{e},{2 - 0.1 * e},{1.8 - 0.1 * e},{base + 3 * e + seed},{85 + e},0.1\n" for e in range(4)))
            (run_dir / "eval" / "best.json").write_text(json.dumps({
                "schema": "el-result/1", "task": "mnist", "loss": loss, "seed": seed, "run": f"{loss}-{seed}",
                "checkpoint": "best", "metrics": {"top1": base + seed, "top5": 99.0}, "curve": "../summary.csv"}))
    return Path(root)


def test_results_read_only_out(tmp_path):
    """It was an OSError traceback from mkdir / open."""
    runs = _records(tmp_path / "runs")
    ro = tmp_path / "ro"
    ro.mkdir()
    for out, message in ((ro / "new", f"error: --out {ro / 'new'}: cannot write there ({READ_ONLY})"),
                         (ro, f"error: --out {ro}: cannot write there ({READ_ONLY})")):
        proc = run(["-m", "encouraging_loss.tools.results", runs, "--out", out], readonly=[ro])
        assert proc.returncode == 1 and proc.stdout == ""
        assert error_line(proc, "error:") == message
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("size, fails_at", [(4096, "summary.csv"), (40_000, "png")])
def test_results_full_disk_leaves_nothing(tmp_path, size, fails_at):
    """A full disk left a 0-byte (or cut-off) PNG and the tables beside it; now nothing at all."""
    runs = _records(tmp_path / "runs")
    out = tmp_path / "out"
    proc = run(["-m", "encouraging_loss.tools.results", runs, "--out", out], full={out: size})
    line = error_line(proc, "error:")
    assert proc.returncode == 1 and proc.stdout == ""
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(f": {NO_SPACE}"), line
    assert line.split(": ")[-2].endswith(fails_at), line
    assert leftovers(proc, out) == {}


def test_results_full_disk_keeps_the_previous_tables(tmp_path):
    """--force over a previous run's files: a failed write leaves every one of them as it was."""
    previous = tmp_path / "previous"
    subprocess.run([PY, "-m", "encouraging_loss.tools.results", _records(tmp_path / "old", seeds=(1,)), "--out", previous],
                   env=_env(), cwd=ROOT, check=True, capture_output=True)
    before = files_under(previous)
    assert len(before) == 6 and all(before.values())  # 3 tables, 2 metric plots, 1 curve plot
    out = tmp_path / "out"
    room = sum(-(-n // 4096) * 4096 for n in before.values()) + 8192  # the old files and a page or two
    proc = run(["-m", "encouraging_loss.tools.results", _records(tmp_path / "runs"), "--out", out, "--force"],
               full={out: room}, prefill={os.fspath(out.resolve()): previous})
    assert NO_SPACE in error_line(proc, "error:")
    assert leftovers(proc, out) == before


# ----------------------------------------------------------------------------- el-analyze


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
    assert error_line(proc, "el-analyze: error:") == \
        f"el-analyze: error: --out {ro / 'report'}: cannot create it in {ro} ({READ_ONLY})"
    assert "images" not in proc.stderr  # no model ran


def test_analyze_full_disk_leaves_nothing(tiny_run, shared_data, tmp_path):
    """A full disk left report.json, report.md and a cut-off margins.png."""
    out = tmp_path / "report"
    proc = run(_analyze(tiny_run, shared_data, out), full={out: 40_000})
    assert proc.returncode == 2
    line = error_line(proc, "el-analyze: error:")
    assert line.startswith(f"el-analyze: error: --out {str(out)!r}: cannot write {out}/") and line.endswith(NO_SPACE)
    assert leftovers(proc, out) == {}


# ----------------------------------------------------------------------------- el-quickstart


QUICK = ["-m", "timm_el.quickstart", "--quick", "--epochs", "1", "--probe-epochs", "0", "--model", "mlp"]


def test_quickstart_read_only_out(tmp_path):
    """It was an OSError traceback after both models had trained; now one line before training."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = run(QUICK + ["--out", ro / "q"], readonly=[ro])
    assert proc.returncode == 2 and "epoch" not in proc.stdout
    assert error_line(proc, "el-quickstart: error:") == \
        f"el-quickstart: error: --out {ro / 'q'}: cannot create it in {ro} ({READ_ONLY})"


def test_quickstart_full_disk_leaves_nothing(tmp_path):
    """A full disk left a 0-byte PNG and a partial report.json / report.md (and no quickstart.json)."""
    out = tmp_path / "q"
    proc = run(QUICK + ["--out", out], full={out: 60_000})
    assert proc.returncode == 2
    line = error_line(proc, "el-quickstart: error:")
    assert line.startswith(f"el-quickstart: error: --out {out}: cannot write {out}/") and line.endswith(NO_SPACE)
    assert leftovers(proc, out) == {}


# ----------------------------------------------------------------------------- python -m timm_el.recipe train


def test_recipe_read_only_work(tmp_path):
    """An incomplete run (a directory without a checkpoint) in a read-only WORK was an OSError traceback
    from moving it aside; now one line before anything is tried."""
    work = tmp_path / "work"
    (work / "runs" / "ce-seed1").mkdir(parents=True)
    proc = run(["-m", "timm_el.recipe", "train", "mnist", "--work", work, "--data", tmp_path, "--loss", "ce",
                "--seed", "1"], readonly=[work])
    assert proc.returncode == 2
    assert error_line(proc, "timm_el.recipe") == \
        f"timm_el.recipe: error: --work {work / 'runs'}: cannot write there ({READ_ONLY})"
    assert "timm_el.train" not in proc.stderr  # nothing launched
    # moving aside itself, where it fails, is one line too
    proc = run(["-c", "import sys; from pathlib import Path; from timm_el import recipe\n"
                "try:\n    recipe._aside(Path(sys.argv[1]))\nexcept recipe.RecipeError as err:\n"
                "    sys.exit(f'error: {err}')", work / "runs" / "ce-seed1"], readonly=[work])
    assert error_line(proc, "error:") == (f"error: {work / 'runs' / 'ce-seed1'} holds no checkpoint and cannot be "
                                          f"moved aside to ce-seed1.incomplete: {READ_ONLY}")
