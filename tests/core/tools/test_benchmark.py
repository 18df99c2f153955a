"""Smoke test of ``python -m encouraging_loss.tools.benchmark`` (tiny shapes)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "encouraging_loss.tools.benchmark", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


def test_help():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--json" in proc.stdout


def test_quick_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--quick", "--shapes", "32x50", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [ln for ln in lines if ln.startswith("impl")]
    assert header and "vs CE" in header[0] and "peak MiB" in header[0]
    data = json.loads(out.read_text())
    assert {"date", "torch", "device", "threads"} <= set(data["meta"])
    rows = {r["impl"]: r for r in data["results"]}
    assert {"torch_ce", "paper_el", "reference", "fused"} <= set(rows)
    assert rows["torch_ce"]["time_vs_ce"] == 1.0
    for impl, r in rows.items():
        if r.get("note") == "unavailable":
            continue
        assert (r["N"], r["V"], r["dtype"], r["device"]) == (32, 50, "float32", "cpu")
        assert r["time_ms"] > 0 and r["time_vs_ce"] > 0
        assert any(ln.startswith(impl) for ln in lines)
        # each case is also reported on stderr as it finishes (a time-limited run keeps its numbers)
        assert f"  32x50 float32 {impl}: {r['time_ms']:.3f} ms" in proc.stderr
    assert rows["floor"]["time_ms"] > 0  # the bandwidth floor is measured in the same run
    assert "fused_inplace" not in rows and "paper_el_compiled" not in rows  # CUDA-only rows


def test_projection_rows(tmp_path):
    out = tmp_path / "proj.json"
    proc = _run("--projection", "--quick", "--shapes", "48x70x8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"linear_ce", "linear_el", "fused_linear_el"}
    for r in rows.values():
        assert (r["N"], r["V"], r["H"]) == (48, 70, 8) and r["time_ms"] > 0 and r["mem_mib"] is not None
    assert any(ln.startswith("fused_linear_el") for ln in proc.stdout.splitlines())


def test_tune_dry_run_in_the_interpreter_and_errors():
    env_bad = _run("--tune")
    assert env_bad.returncode == 2
    assert "--tune times the Triton kernel: it needs --device cuda" in env_bad.stderr
    assert "Traceback" not in env_bad.stderr
    proc = _run("--projection", "--tune")
    assert proc.returncode == 2 and "give one" in proc.stderr
    proc = _run("--repeats", "0")
    assert proc.returncode == 2 and "--repeats must be >= 1, got 0" in proc.stderr
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "encouraging_loss.tools.benchmark", "--tune", "--quick", "--shapes",
                           "4x40", "--dtypes", "float32"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<- fastest" in proc.stdout and "single" in proc.stdout and "stream" in proc.stdout
    lines = proc.stdout.splitlines()
    # both kernels timed, each with its launch_config default marked, and the sum against torch_ce
    for kernel in ("stats", "grad"):
        rows = [ln.split() for ln in lines if len(ln.split()) >= 7 and ln.split()[2] == kernel]
        assert len(rows) >= 2, proc.stdout
        assert sum("(default)" in " ".join(r) for r in rows) == 1, proc.stdout
    assert any(ln.split()[2:4] == ["torch_ce", "fwd+bwd"] for ln in lines if len(ln.split()) > 4)
    assert "kernel time fwd+bwd (stats + grad) vs torch_ce fwd+bwd:" in proc.stdout


def test_tune_summary_picks_the_fastest_and_sums_against_ce():
    from encouraging_loss.tools.benchmark import tune_summary

    base = {"N": 8, "V": 100, "dtype": "float32"}
    rows = [
        {**base, "kernel": "torch_ce", "path": "fwd+bwd", "block": 0, "warps": 0, "time_ms": 4.0},
        {**base, "kernel": "floor", "path": "copy", "block": 0, "warps": 0, "time_ms": 0.5},
        {**base, "kernel": "stats", "path": "single", "block": 128, "warps": 4, "time_ms": 2.0, "default": True},
        {**base, "kernel": "stats", "path": "stream", "block": 64, "warps": 8, "time_ms": 1.0, "default": False},
        {**base, "kernel": "grad", "path": "stream", "block": 128, "warps": 4, "time_ms": 1.0, "default": False},
        {**base, "kernel": "grad", "path": "stream", "block": 64, "warps": 8, "time_ms": 3.0, "default": True},
    ]
    (rec,) = tune_summary(rows)
    assert rec["stats"]["best"] == {"path": "stream", "block": 64, "warps": 8, "time_ms": 1.0}
    assert rec["grad"]["best"]["block"] == 128 and rec["grad"]["default"]["time_ms"] == 3.0
    assert rec["best_vs_ce"] == pytest.approx((1.0 + 1.0) / 4.0)
    assert rec["default_vs_ce"] == pytest.approx((2.0 + 3.0) / 4.0)
    assert rec["torch_ce_ms"] == 4.0 and rec["floor_ms"] == 0.5


def test_weighted_rows_when_named(tmp_path):
    """--impls with torch_ce_weighted,fused_weighted: F.cross_entropy(weight=...) and the fused EL with the same
    class weights, the fused one also as a ratio to the weighted CE."""
    out = tmp_path / "w.json"
    proc = _run("--quick", "--shapes", "32x50", "--impls", "torch_ce,torch_ce_weighted,fused_weighted",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"torch_ce", "torch_ce_weighted", "fused_weighted"}
    w = rows["fused_weighted"]
    assert w["time_vs_ce_weighted"] == w["time_ms"] / rows["torch_ce_weighted"]["time_ms"]
    assert w["backend"] == "eager"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("fused_weighted")][0]
    assert f"vs weighted CE {w['time_vs_ce_weighted']:.2f}x" in line


def test_weighted_benchmark_loss_is_the_weighted_mean():
    import torch

    from encouraging_loss.bonus import BonusConfig
    from encouraging_loss.tools import benchmark as B

    z, t = B.make_inputs(40, 30, torch.float64, "cpu")
    ce = B.make_loss("torch_ce_weighted", BonusConfig(rho=0.0), B.EPS)(z, t)
    el = B.make_loss("fused_weighted", BonusConfig(rho=0.0), B.EPS)(z, t)
    torch.testing.assert_close(el, ce)
