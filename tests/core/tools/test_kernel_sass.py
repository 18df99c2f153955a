"""encouraging_loss.tools.kernel_sass: the kernels compiled for sm_90 without a GPU,
disassembled, instructions per element counted."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from encouraging_loss.tools import kernel_sass

from helpers import ROOT

try:
    kernel_sass.tool("nvdisasm")
    kernel_sass.tool("ptxas")
    HAVE_TOOLS = True
except FileNotFoundError:
    HAVE_TOOLS = False
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="this Triton ships no ptxas / nvdisasm")


@needs_tools
def test_report_counts_follow_the_work():
    dense = kernel_sass.kernel_report(1024, "float32", dense=True)
    target_only = kernel_sass.kernel_report(1024, "float32", dense=False)
    assert dense["block"] == 1024 and dense["warps"] == 4 and dense["arch"] == "sm_90"
    for kernel in ("stats", "grad"):
        # the bonus at every class costs code per element that the target-only bonus does not
        assert dense[kernel]["per_element"] > target_only[kernel]["per_element"] + 5
        assert dense[kernel]["sass"] == pytest.approx(dense[kernel]["per_element"] * 1024 / (32 * 4))
        assert dense[kernel]["spill_bytes"] == 0 and dense[kernel]["registers"] > 0
        # each logit read once: one 4-byte element per element, in 16-byte vector loads
        assert dense[kernel]["read_bytes_per_element"] == 4.0
    # float32 on a GPU: log(1 - p) by the hardware's log2, with exp and the reciprocal: a few MUFU per element,
    # no libdevice log (whose bit tricks show as LOP3) in the per-element code
    assert 2 <= dense["stats"]["mufu_per_element"] <= 6
    # float64 keeps the accurate log and computes in double
    f64 = kernel_sass.kernel_report(1024, "float64", dense=True)
    assert any(op.startswith("D") for op in f64["stats"]["top"])
    assert not any(op.startswith("D") for op in dense["stats"]["top"])


def test_compile_kernel_checks_the_arguments():
    from encouraging_loss.ops import triton_kernels as tk

    with pytest.raises(ValueError, match=r"_el_grad_kernel: arguments missing \[.*'BLOCK'.*\], unknown \['NOPE'\]"):
        kernel_sass.compile_kernel(tk._el_grad_kernel, kernel_sass.GRAD_ARGS, ["*fp32"] * 12, {"NOPE": 1}, 4)


@needs_tools
def test_cli_table_and_json(tmp_path):
    out = tmp_path / "sass.json"
    proc = subprocess.run([sys.executable, "-m", "encouraging_loss.tools.kernel_sass", "--vocab", "1024", "--dtypes",
                           "bfloat16", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    line = [ln for ln in proc.stdout.splitlines() if ln.split()[:2] == ["1024", "bfloat16"]][0]
    fields = line.replace("|", " ").split()
    assert float(fields[4]) == pytest.approx(row["stats"]["per_element"], abs=0.05)
    assert float(fields[9]) == pytest.approx(row["grad"]["per_element"], abs=0.05)
    # bfloat16 logits: 2 bytes read per element by each kernel
    assert float(fields[6]) == float(fields[11]) == row["stats"]["read_bytes_per_element"] == 2.0
    floor = 16384 * 1024 * (row["stats"]["per_element"] + row["grad"]["per_element"]) / kernel_sass.GPU_INSTR_PER_MS
    assert float(fields[-1]) == pytest.approx(floor, abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--vocab", "10k"], "--vocab must be comma-separated integers, got '10k'"),
    (["--vocab", "0"], "--vocab sizes must be >= 1, got '0'"),
    (["--dtypes", "float32,int8"], "--dtypes: unknown int8"),
])
def test_cli_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "encouraging_loss.tools.kernel_sass", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
