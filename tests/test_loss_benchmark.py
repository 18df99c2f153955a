"""Smoke test of ``python -m encouraging_loss.benchmark`` (tiny shapes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "encouraging_loss.benchmark", *args],
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
