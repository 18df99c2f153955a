"""``python -m transformers_el.benchmark``: the tiny in-process run, the subprocess-per-case memory measurement
(the fused projection holds less than the library's cross-entropy where the logits dominate), the ratios
consistent with the times, and one-line errors."""
import csv
import json

import pytest

pytest.importorskip("transformers")

from transformers_el import benchmark  # noqa: E402


def _table_rows(stdout):
    """The Markdown table's data rows as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| vocab")]


def test_quick_run_table_and_json_ratios_agree_with_the_times(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert benchmark.main(["--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["impl"] for r in rows] == ["ce", "el", "el_fused"]
    assert data["meta"]["model"].startswith("LlamaForCausalLM hidden 32, 1 layers")
    ce = rows[0]
    assert (ce["vocab"], ce["batch"], ce["seq"]) == (1000, 2, 32)
    for r in rows:
        assert r["time_ms"] > 0 and r["mem_mib"] >= 0
        assert r["time_vs_ce"] == pytest.approx(r["time_ms"] / ce["time_ms"])
        if ce["mem_mib"] > 0:
            assert r["mem_vs_ce"] == pytest.approx(r["mem_mib"] / ce["mem_mib"])
    table = _table_rows(captured.out)
    assert [cells[2] for cells in table] == ["ce", "el", "el_fused"]
    for cells, r in zip(table, rows):
        assert cells[:2] == ["1000", "2x32"]
        assert cells[3] == f"{r['time_ms']:.1f}" and cells[4] == f"{r['time_vs_ce']:.2f}x"
        # and with the times as shown: each rounded to 0.05 ms at most, the ratio to 0.005
        shown, shown_ce = float(cells[3]), float(table[0][3])
        slack = shown / shown_ce * (0.05 / shown + 0.05 / shown_ce) + 0.0051
        assert float(cells[4][:-1]) == pytest.approx(shown / shown_ce, abs=slack)
    assert table[0][4] == "1.00x"
    assert "vocab 1000, 2x32 tokens, el_fused:" in captured.err  # progress lines on stderr


def test_subprocess_memory_fused_projection_below_cross_entropy(tmp_path, capsys, monkeypatch):
    # 1024 tokens x 8000 classes: 31 MiB of logits, the largest tensor of the step; the fused path holds a
    # chunk of 256 rows of them. The eager back end: no one-off compilation in the test's subprocesses.
    monkeypatch.setenv("EL_FUSED_BACKEND", "eager")
    out = tmp_path / "bench.csv"
    argv = ["--device", "cpu", "--vocab", "8000", "--seq", "512", "--batch", "2", "--hidden", "32", "--layers", "1",
            "--repeats", "1", "--impls", "ce,el_fused", "--threads", "1", "--out", str(out)]
    assert benchmark.main(argv) == 0
    with open(out, newline="") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"ce", "el_fused"}
    ce, fused = rows["ce"], rows["el_fused"]
    assert ce["tokens"] == "1024" and float(ce["mem_vs_ce"]) == 1.0
    assert float(ce["mem_mib"]) > 60  # logits, their log-softmax and gradient: 3 x 31 MiB at least
    assert float(fused["mem_vs_ce"]) < 0.5
    assert float(fused["mem_vs_ce"]) == pytest.approx(float(fused["mem_mib"]) / float(ce["mem_mib"]), rel=1e-3)
    assert float(fused["time_vs_ce"]) == pytest.approx(float(fused["time_ms"]) / float(ce["time_ms"]), rel=1e-3)
    assert "subprocess per case" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--impls", "ce,nope"], "--impls: unknown value 'nope'"),
    (["--vocab", "0"], "--vocab must be positive integers"),
    (["--out", "bench.txt"], "--out bench.txt: give a .csv or .json file"),
    (["--hidden", "100"], "--hidden 100: must be a multiple of 64"),
])
def test_bad_flags_stop_with_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--quick", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0]


def test_existing_out_needs_force(tmp_path, capsys):
    out = tmp_path / "b.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--quick", "--out", str(out)])
    assert exc.value.code == 2 and "exists; give --force" in capsys.readouterr().err
    assert out.read_text() == "{}"
