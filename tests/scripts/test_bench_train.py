"""scripts/bench_train.py end to end on CPU at tiny sizes: stock fairseq-train
(through ``python -m fairseq_cli.train``, as on a machine where fairseq is only
on PYTHONPATH) with CE and EL, the in-process model steps, a timm model; the
JSON and the table it prints. Timings are not asserted, only that they exist and
that the ratios are the ratios of the printed figures."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fairseq")
pytest.importorskip("timm")

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "bench_train.py"


def _run(*args, cwd, timeout=900):
    # a bare environment for the package: the script must find it on its own (not pip-installed on a GPU machine)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_bench_train_cpu_end_to_end(iwslt14_slice, tmp_path):
    sample = iwslt14_slice(300, 20, 20)
    out = tmp_path / "bench.json"
    proc = _run("--which", "fairseq", "timm", "--repeats", "1", "--updates", "4", "--step-repeats", "1",
                "--step-batches", "2", "--steps", "1", "--warmup", "1", "--batch", "2", "--img-size", "32",
                "--num-classes", "10", "--data-bin", sample / "bin", "--json", out, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["torch"]
    fs = res["fairseq"]
    assert len(fs["runs"]["ce"]) == 1 and len(fs["runs"]["el"]) == 1 and "el_proj" not in fs["runs"]
    assert fs["ratio"] == pytest.approx(fs["el"] / fs["ce"]) and fs["ce"] > 0
    steps = fs["steps"]
    assert set(steps["runs"]) == {"ce", "el", "el_proj"} and steps["ratio"] == pytest.approx(steps["el"] / steps["ce"])
    assert steps["el_proj_ratio"] == pytest.approx(steps["el_proj"] / steps["ce"])
    timm = res["timm"]["fp32"]
    assert timm["model"] == "resnet18" and timm["batch"] == 2
    assert timm["ratio"] == pytest.approx(timm["el"] / timm["ce"])
    table = {ln[:20].strip(): ln[20:].split() for ln in proc.stdout.splitlines()[-7:] if ln[:20].strip()}
    assert table["fairseq"][0] == "words/s" and float(table["fairseq"][3]) == pytest.approx(fs["ratio"], abs=1e-3)
    assert float(table["fairseq steps"][3]) == pytest.approx(steps["ratio"], abs=1e-3)
    assert float(table["fairseq steps proj"][2]) == pytest.approx(steps["el_proj"], abs=0.06)
    assert float(table["timm fp32"][3]) == pytest.approx(timm["ratio"], abs=1e-3)
    # no silent overwrite of the results
    again = _run("--which", "timm", "--json", out, cwd=tmp_path)
    assert again.returncode == 2 and f"--json {out} exists" in again.stderr


@pytest.mark.parametrize("flag", ["--steps", "--repeats", "--cli-repeats", "--step-batches", "--updates"])
def test_bench_train_rejects_non_positive_counts(flag, tmp_path):
    proc = _run(flag, "0", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert f"{flag} must be >= 1, got 0" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_train_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = _run("--device", "cuda", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--device cuda: no CUDA device is available" in proc.stderr
