"""scripts/gpu_check.sh, the one-call GPU session, as its CPU dry run
(``DEVICE=cpu``): every step runs at tiny sizes and leaves its file; the
budget and the per-step limits are obeyed."""
import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out, tmp_path, **env):
    full = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, CARRY=str(tmp_path / "no-carry"),
                OMP_NUM_THREADS="2", **env)
    full.pop("DATA_BIN", None)
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=full, timeout=900)


def test_dry_run_leaves_every_result(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, tmp_path)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "done (status 0)" in log and "FAILED" not in log
    assert "fairseq whole steps skipped" in log  # no carried data-bin and no DATA_BIN
    env = (out / "env.txt").read_text()
    assert env.startswith("torch ") and "device cpu" in env
    for name in ("loss.json", "projection.json", "train.json", "sass.json"):
        assert json.loads((out / name).read_text()), name
    tune = out / "tune.json"
    assert json.loads(tune.read_text())["summary"] or "tune dry run skipped" in log
    assert json.loads((out / "train.json").read_text())["timm"]["fp32"]["ratio"] > 0


def test_spent_budget_skips_steps_and_fails(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, tmp_path, BUDGET="5")
    log = (out / "log.txt").read_text()
    assert proc.returncode == 1
    assert log.count("SKIPPED (budget spent)") >= 4 and "done (status 1)" in log
    assert not (out / "loss.json").exists()
