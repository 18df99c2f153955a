"""Tests of ``encouraging_loss.tools.results`` (records and curves written in tmp_path; no training)."""
import ast
import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from encouraging_loss.tools import results as R
from encouraging_loss.tools.results.plots import curve_runs, load_curves

from confined import NO_SPACE, READ_ONLY, files_under, leftovers, one_error_line, run_confined
from helpers import (
    PY,
    ROOT,
    command_env,
)

# ----------------------------------------------------------------------------- helpers


def write_record(folder, *, task="iwslt14_de_en", loss="ce", seed=1, checkpoint="avg_last10",
                 metrics=None, run=None, curve=None, name=None, **extra):
    """Write one el-result/1 record into ``folder`` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"schema": "el-result/1", "task": task, "loss": loss, "seed": seed,
            "run": run or f"{loss}-seed{seed}", "checkpoint": checkpoint,
            "metrics": metrics if metrics is not None else {"bleu": 35.0},
            "info": {"sacrebleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.4.0"}}
    if curve is not None:
        data["curve"] = curve
    data.update(extra)
    path = folder / (name or f"{task}-{checkpoint}-{loss}-{seed}.json")
    path.write_text(json.dumps(data))
    return path


def write_csv(path, header, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def translation_runs(root, ce=(35.0, 35.2, 35.4), el=(35.5, 35.6, 35.7), checkpoints=("avg_last10",),
                     task="iwslt14_de_en", with_curve=True):
    """Runs laid out as a recipe would: <root>/<run>/curve.csv and <root>/<run>/eval/<checkpoint>.json."""
    for loss, values in (("ce", ce), ("el", el)):
        for seed, value in enumerate(values, start=1):
            run_dir = Path(root) / task / f"{loss}-seed{seed}"
            if with_curve:
                write_csv(run_dir / "curve.csv", ["epoch", "valid_loss", "valid_nll_loss"],
                          [[e, 6 - 0.3 * e + 0.01 * seed, 5 - 0.3 * e + (0.2 if loss == "ce" else 0.0)]
                           for e in range(1, 6)])
            for k, ck in enumerate(checkpoints):
                write_record(run_dir / "eval", task=task, loss=loss, seed=seed, checkpoint=ck,
                             metrics={"bleu": value - k, "sacrebleu": value - 1 - k},
                             curve="../curve.csv" if with_curve else None, name=f"{ck}.json")


def parse_markdown_tables(text):
    """{heading: [{column: cell}, ...]} for each '## heading' followed by a pipe table."""
    tables, heading, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].strip(), None
            tables[heading] = []
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                tables[heading].append(dict(zip(header, cells)))
    return tables


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_png(path):
    """The PNG decodes, has a plausible size and is not a blank image."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300 and img.shape[2] in (3, 4), img.shape
    flat = img.reshape(-1, img.shape[2])
    assert len(np.unique(flat, axis=0)) > 10, f"{path} looks blank"


def run_main(capsys, *argv):
    rc = R.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- statistics


def test_describe_matches_hand_computed_values():
    st = R.describe([35.0, 35.2, 35.4])
    assert st.n == 3
    assert st.mean == pytest.approx(35.2, abs=1e-12)
    assert st.std == pytest.approx(0.2, abs=1e-12)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert (st.min, st.max) == (35.0, 35.4)
    st = R.describe([1, 2, 3, 4])
    assert st.mean == 2.5 and st.std == pytest.approx(math.sqrt(5 / 3), abs=1e-15)  # ddof=1, not sqrt(5/4)
    one = R.describe([35.1])
    assert (one.n, one.mean, one.std, one.min, one.max) == (1, 35.1, None, 35.1, 35.1)
    with pytest.raises(ValueError):
        R.describe([])


def test_summary_mean_std_and_difference(tmp_path):
    translation_runs(tmp_path)
    records = R.collect([tmp_path])
    assert len(records) == 6
    assert [r.loss for r in records] == ["ce"] * 3 + ["el"] * 3
    [g] = R.summarize(records)
    assert (g.task, g.checkpoint, g.metrics) == ("iwslt14_de_en", "avg_last10", ("bleu", "sacrebleu"))
    ce, el = g.losses
    assert (ce.loss, ce.n, ce.seeds) == ("ce", 3, (1, 2, 3))
    assert ce.stats["bleu"].mean == pytest.approx(35.2) and ce.stats["bleu"].std == pytest.approx(0.2)
    assert el.stats["bleu"].mean == pytest.approx(35.6) and el.stats["bleu"].std == pytest.approx(0.1)
    assert g.difference["bleu"] == pytest.approx(0.4) and g.difference["sacrebleu"] == pytest.approx(0.4)
    assert g.note is None and g.difference_label == "EL - CE"

    md = R.render_markdown([g])
    rows = parse_markdown_tables(md)["iwslt14_de_en, checkpoint avg_last10"]
    assert rows[0] == {"loss": "ce", "n": "3", "bleu": "35.20 +- 0.20", "sacrebleu": "34.20 +- 0.20"}
    assert rows[1] == {"loss": "el", "n": "3", "bleu": "35.60 +- 0.10", "sacrebleu": "34.60 +- 0.10"}
    assert rows[2] == {"loss": "EL - CE", "n": "", "bleu": "+0.40", "sacrebleu": "+0.40"}
    assert "| loss | n | bleu | sacrebleu |" in md
    assert "sacreBLEU signature: `nrefs:1|case:mixed" in md
    # decimals are configurable
    rows3 = parse_markdown_tables(R.render_markdown([g], decimals=3))["iwslt14_de_en, checkpoint avg_last10"]
    assert rows3[0]["bleu"] == "35.200 +- 0.200" and rows3[2]["bleu"] == "+0.400"


def test_paper_figures_round_as_published(tmp_path):
    # means 35.09 and 35.50: the difference prints as +0.41 (not +0.40 from float noise)
    translation_runs(tmp_path, ce=(35.02, 35.09, 35.16), el=(35.39, 35.50, 35.61), with_curve=False)
    md = R.render_markdown(R.summarize(R.collect([tmp_path])))
    rows = parse_markdown_tables(md)["iwslt14_de_en, checkpoint avg_last10"]
    assert rows[0]["bleu"] == "35.09 +- 0.07" and rows[1]["bleu"] == "35.50 +- 0.11"
    assert rows[2]["bleu"] == "+0.41"


def test_custom_baseline_and_treatment(tmp_path):
    for seed, (a, b) in enumerate([(76.0, 76.5), (76.2, 76.9)], start=1):
        write_record(tmp_path, task="imagenet_resnet50", loss="ce", seed=seed, checkpoint="best",
                     metrics={"top1": a, "top5": 93.0})
        write_record(tmp_path, task="imagenet_resnet50", loss="el_le0.5", seed=seed, checkpoint="best",
                     metrics={"top1": b, "top5": 93.1})
    [g] = R.summarize(R.collect([tmp_path]), baseline="ce", treatment="el_le0.5")
    assert g.difference_label == "EL_LE0.5 - CE"
    assert g.difference["top1"] == pytest.approx(0.6) and g.difference["top5"] == pytest.approx(0.1)
    # with the default treatment "el" absent: no difference, a note instead
    [g] = R.summarize(R.collect([tmp_path]))
    assert g.difference is None and "no 'el' runs" in g.note
    assert [s.loss for s in g.losses] == ["ce", "el_le0.5"]


def test_single_run_has_no_std(tmp_path):
    write_record(tmp_path, loss="ce", seed=1, metrics={"bleu": 35.1})
    write_record(tmp_path, loss="el", seed=1, metrics={"bleu": 35.4})
    write_record(tmp_path, loss="el", seed=2, metrics={"bleu": 35.6})
    [g] = R.summarize(R.collect([tmp_path]))
    assert g.losses[0].stats["bleu"].std is None
    rows = parse_markdown_tables(R.render_markdown([g]))["iwslt14_de_en, checkpoint avg_last10"]
    assert rows[0]["bleu"] == "35.10 +- -" and rows[0]["n"] == "1"
    assert rows[1]["bleu"] == "35.50 +- 0.14"
    assert rows[2]["bleu"] == "+0.40"
    assert "nan" not in R.render_markdown([g]).lower()

    out = tmp_path / "out"
    R.write_tables(R.collect([tmp_path]), [g], out)
    summary = read_csv(out / "summary.csv")
    ce = next(r for r in summary if r["loss"] == "ce")
    assert ce["n"] == "1" and ce["std"] == "" and float(ce["mean"]) == 35.1
    assert "nan" not in (out / "summary.csv").read_text().lower()


def test_missing_side_is_skipped_with_a_note(tmp_path):
    write_record(tmp_path, loss="ce", seed=1)
    write_record(tmp_path, loss="ce", seed=2, metrics={"bleu": 35.4})
    [g] = R.summarize(R.collect([tmp_path]))
    assert g.difference is None
    assert g.note == "EL - CE not computed: no 'el' runs for this task and checkpoint."
    md = R.render_markdown([g])
    rows = parse_markdown_tables(md)["iwslt14_de_en, checkpoint avg_last10"]
    assert [r["loss"] for r in rows] == ["ce"]
    assert g.note in md


def test_metric_missing_from_some_records(tmp_path):
    write_record(tmp_path, loss="ce", seed=1, metrics={"bleu": 35.0, "sacrebleu": 34.0})
    write_record(tmp_path, loss="ce", seed=2, metrics={"bleu": 35.2})
    write_record(tmp_path, loss="el", seed=1, metrics={"bleu": 35.5})
    [g] = R.summarize(R.collect([tmp_path]))
    assert g.difference["bleu"] == pytest.approx(0.4) and g.difference["sacrebleu"] is None
    rows = parse_markdown_tables(R.render_markdown([g]))["iwslt14_de_en, checkpoint avg_last10"]
    assert rows[0]["sacrebleu"] == "34.00 +- - (n=1)"
    assert rows[1]["sacrebleu"] == "-" and rows[2]["sacrebleu"] == "-"


def test_tasks_and_checkpoints_are_kept_apart(tmp_path):
    translation_runs(tmp_path / "a", checkpoints=("avg_last10", "best"), with_curve=False)
    translation_runs(tmp_path / "b", task="iwslt17_fr_en", ce=(37.0, 37.2), el=(37.7, 37.8),
                     checkpoints=("avg_last10", "best"), with_curve=False)
    records = R.collect([tmp_path / "a", tmp_path / "b"])
    assert len(records) == 2 * 6 + 2 * 4
    groups = {(g.task, g.checkpoint): g for g in R.summarize(records)}
    assert sorted(groups) == [("iwslt14_de_en", "avg_last10"), ("iwslt14_de_en", "best"),
                              ("iwslt17_fr_en", "avg_last10"), ("iwslt17_fr_en", "best")]
    # "best" values were written 1.0 lower than "avg_last10"
    assert groups[("iwslt14_de_en", "avg_last10")].losses[0].stats["bleu"].mean == pytest.approx(35.2)
    assert groups[("iwslt14_de_en", "best")].losses[0].stats["bleu"].mean == pytest.approx(34.2)
    assert groups[("iwslt17_fr_en", "avg_last10")].losses[0].n == 2
    assert groups[("iwslt17_fr_en", "avg_last10")].losses[1].stats["bleu"].mean == pytest.approx(37.75)
    assert groups[("iwslt17_fr_en", "best")].difference["bleu"] == pytest.approx(0.65)
    tables = parse_markdown_tables(R.render_markdown(list(groups.values())))
    assert set(tables) == {"iwslt14_de_en, checkpoint avg_last10", "iwslt14_de_en, checkpoint best",
                           "iwslt17_fr_en, checkpoint avg_last10", "iwslt17_fr_en, checkpoint best"}


# ----------------------------------------------------------------------------- collect


def test_collect_ignores_other_json_and_counts_a_file_once(tmp_path):
    write_record(tmp_path / "runs", loss="ce")
    (tmp_path / "runs" / "args.json").write_text(json.dumps({"lr": 0.1, "schema": "something-else"}))
    (tmp_path / "runs" / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "runs" / "notes.json").write_text("not json at all")
    (tmp_path / "runs" / "curve.csv").write_text("epoch\n")
    records = R.collect([tmp_path / "runs", tmp_path / "runs", tmp_path])
    assert len(records) == 1 and records[0].seed == 1 and records[0].metrics == {"bleu": 35.0}


def test_curve_path_is_relative_to_the_record(tmp_path):
    path = write_record(tmp_path / "run" / "eval", curve="../curve.csv")
    [rec] = R.collect([tmp_path])
    assert rec.curve == tmp_path / "run" / "curve.csv" and rec.curve_ref == "../curve.csv"
    assert rec.path == path


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("seed"), "'seed'"),
    (lambda d: d.pop("task"), "'task'"),
    (lambda d: d.update(metrics={"bleu": "35.1"}), "'metrics.bleu'"),
    (lambda d: d.update(metrics={"bleu": float("nan")}), "'metrics.bleu'"),
    (lambda d: d.update(metrics={}), "'metrics'"),
    (lambda d: d.update(seed="one"), "'seed'"),
    (lambda d: d.update(curve=3), "'curve'"),
    (lambda d: d.update(schema="el-result/9"), "'schema'"),
])
def test_malformed_record_names_file_and_field(tmp_path, capsys, change, field):
    path = write_record(tmp_path / "runs", loss="ce")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(R.RecordError) as info:
        R.collect([tmp_path / "runs"])
    assert str(path) in str(info.value) and field in str(info.value)
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and field in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_duplicate_records_are_refused(tmp_path):
    write_record(tmp_path / "a", loss="ce", seed=1)
    write_record(tmp_path / "b", loss="ce", seed=1)
    with pytest.raises(R.ResultsError, match="duplicate record"):
        R.collect([tmp_path])


# ----------------------------------------------------------------------------- command line and files


def test_cli_writes_tables_plots_and_prints_markdown(tmp_path, capsys):
    translation_runs(tmp_path / "runs", checkpoints=("avg_last10", "best"))
    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, tmp_path / "runs", "--out", out)
    assert rc == 0, err
    expected = {"results.csv", "summary.csv", "summary.md",
                "iwslt14_de_en__avg_last10__bleu.png", "iwslt14_de_en__avg_last10__sacrebleu.png",
                "iwslt14_de_en__best__bleu.png", "iwslt14_de_en__best__sacrebleu.png",
                "iwslt14_de_en__curve__valid_nll_loss.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        assert f"wrote {out / name}" in err
    assert "warning" not in err

    assert stdout == (out / "summary.md").read_text()
    tables = parse_markdown_tables(stdout)
    assert tables["iwslt14_de_en, checkpoint best"][0]["bleu"] == "34.20 +- 0.20"

    results = read_csv(out / "results.csv")
    assert len(results) == 12
    assert list(results[0]) == ["task", "checkpoint", "loss", "seed", "run", "bleu", "sacrebleu", "curve", "path"]
    row = next(r for r in results if r["loss"] == "el" and r["seed"] == "2" and r["checkpoint"] == "best")
    assert float(row["bleu"]) == 34.6 and row["run"] == "el-seed2"
    assert row["path"].endswith(os.path.join("el-seed2", "eval", "best.json"))
    assert row["curve"].endswith(os.path.join("el-seed2", "curve.csv"))

    summary = read_csv(out / "summary.csv")
    assert list(summary[0]) == ["task", "checkpoint", "loss", "metric", "n", "mean", "std", "min", "max"]
    ce_bleu = next(r for r in summary if (r["checkpoint"], r["loss"], r["metric"]) == ("avg_last10", "ce", "bleu"))
    assert (ce_bleu["n"], float(ce_bleu["mean"]), float(ce_bleu["std"])) == ("3", 35.2, 0.2)
    assert (float(ce_bleu["min"]), float(ce_bleu["max"])) == (35.0, 35.4)
    diff = next(r for r in summary if (r["checkpoint"], r["loss"], r["metric"]) == ("best", "EL - CE", "bleu"))
    assert float(diff["mean"]) == 0.4 and diff["n"] == diff["std"] == ""
    assert len(summary) == 2 * (2 * 2 + 2)

    for png in out.glob("*.png"):
        check_png(png)


def test_curves_are_deduplicated_per_run(tmp_path):
    translation_runs(tmp_path, checkpoints=("avg_last10", "best", "last"))
    records = R.collect([tmp_path])
    assert len(records) == 18
    runs = curve_runs(records, "iwslt14_de_en")
    assert len(runs) == 6 and {loss for loss, _, _ in runs} == {"ce", "el"}
    curves = load_curves(records, warn=pytest.fail)
    assert len(curves) == 6
    assert R.choose_curve_columns(records, curves, "iwslt14_de_en") == ["valid_nll_loss"]
    assert R.choose_curve_columns(records, curves, "iwslt14_de_en", ["valid_loss", "nope"]) == ["valid_loss"]
    png = R.plot_curves(records, tmp_path / "c.png", task="iwslt14_de_en", column="valid_loss", curves=curves)
    check_png(png)
    assert R.plot_curves(records, tmp_path / "d.png", task="iwslt14_de_en", column="nope", curves=curves) is None
    assert not (tmp_path / "d.png").exists()


def test_timm_summary_csv_curve(tmp_path, capsys):
    header = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    for loss, base in (("ce", 60.0), ("el", 62.0)):
        for seed in (1, 2):
            run_dir = tmp_path / "runs" / f"{loss}-{seed}"
            rows = [[e, 2.0 - 0.1 * e, 1.8 - 0.1 * e, base + 3 * e + seed, 85 + e, 0.1] for e in range(4)]
            if seed == 2:  # resumed at epoch 2: timm writes the header again and re-logs epoch 2
                rows = rows[:3] + [header, [2, 1.8, 1.6, 99.0, 90.0, 0.1]] + rows[3:]
            write_csv(run_dir / "summary.csv", header, rows)
            write_record(run_dir, task="mnist", loss=loss, seed=seed, checkpoint="best",
                         metrics={"top1": base + 37 + seed, "top5": 99.9}, curve="summary.csv",
                         name="result.json")
    curve = R.load_curve(tmp_path / "runs" / "ce-2" / "summary.csv")
    assert curve.epoch == [0.0, 1.0, 2.0, 3.0]
    assert curve.columns["eval_top1"] == [62.0, 65.0, 99.0, 71.0]  # the re-logged epoch 2 wins
    assert set(curve.columns) == set(header)

    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, tmp_path / "runs", "--out", out, "--decimals", "1")
    assert rc == 0, err
    assert (out / "mnist__curve__eval_top1.png").is_file()
    check_png(out / "mnist__curve__eval_top1.png")
    check_png(out / "mnist__best__top1.png")
    rows = parse_markdown_tables(stdout)["mnist, checkpoint best"]
    assert rows[0] == {"loss": "ce", "n": "2", "top1": "98.5 +- 0.7", "top5": "99.9 +- 0.0"}
    assert rows[2] == {"loss": "EL - CE", "n": "", "top1": "+2.0", "top5": "+0.0"}

    # an explicit column, repeatable
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out2", "--curve-column", "eval_loss",
                          "--curve-column", "lr")
    assert rc == 0, err
    assert {p.name for p in (tmp_path / "out2").glob("*curve*")} == {"mnist__curve__eval_loss.png",
                                                                     "mnist__curve__lr.png"}


def test_records_without_curve(tmp_path, capsys):
    translation_runs(tmp_path / "runs", with_curve=False)
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 0, err
    assert not list((tmp_path / "out").glob("*curve*"))
    assert "warning" not in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_missing_curve_warns_and_the_rest_runs(tmp_path, capsys):
    translation_runs(tmp_path / "runs")
    (tmp_path / "runs" / "iwslt14_de_en" / "el-seed3" / "curve.csv").unlink()
    rc, stdout, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "curve file not found" in warnings[0] and "el-seed3" in warnings[0]
    assert (tmp_path / "out" / "iwslt14_de_en__curve__valid_nll_loss.png").is_file()
    assert "EL - CE" in stdout


def test_no_curve_column_available_warns(tmp_path, capsys):
    write_csv(tmp_path / "runs" / "curve.csv", ["epoch", "something"], [[1, 2.0], [2, 1.0]])
    write_record(tmp_path / "runs", loss="ce", curve="curve.csv")
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 0, err
    assert "no curve plot" in err and not list((tmp_path / "out").glob("*curve*"))


def test_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    translation_runs(tmp_path / "runs", with_curve=False)
    out = tmp_path / "out"
    assert run_main(capsys, tmp_path / "runs", "--out", out)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "summary.md").write_text("edited by hand")
    rc, stdout, err = run_main(capsys, tmp_path / "runs", "--out", out)
    assert rc == 1 and stdout == ""
    assert err.strip().splitlines()[-1].startswith("error: refusing to overwrite")
    assert str(out / "results.csv") in err and str(out / "summary.md") in err and "--force" in err
    assert (out / "summary.md").read_text() == "edited by hand"
    assert (out / "results.csv").stat().st_mtime_ns == before["results.csv"]
    with pytest.raises(R.ResultsError, match="refusing to overwrite"):
        R.write_tables(R.collect([tmp_path / "runs"]), [], out)
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", out, "--force")
    assert rc == 0, err
    assert (out / "summary.md").read_text().startswith("## iwslt14_de_en")


def test_empty_and_missing_roots(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.json").write_text("{}")
    rc, stdout, err = run_main(capsys, tmp_path / "empty", "--out", tmp_path / "out")
    assert rc == 1 and stdout == ""
    assert err == f"error: no el-result/1 records found under {tmp_path / 'empty'} (1 JSON file searched)\n"
    rc, _, err = run_main(capsys, tmp_path / "nowhere", tmp_path / "empty", "--out", tmp_path / "out")
    assert rc == 1 and err == f"error: no such file or folder: {tmp_path / 'nowhere'}\n"
    assert not (tmp_path / "out").exists()


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        R.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--force", "--baseline", "--treatment", "--decimals", "--curve-column",
                 "--published", "--no-plots"):
        assert flag in text
    assert "(default: ce)" in text and "(default: el)" in text and "(default: 2)" in text
    with pytest.raises(SystemExit) as info:
        R.main(["x", "--out", "y", "--decimals", "-1"])
    assert info.value.code == 2 and "--decimals" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        R.main(["x"])  # --out is required
    assert info.value.code == 2


def test_published_rows(tmp_path, capsys):
    translation_runs(tmp_path / "runs", ce=(35.0, 35.1), el=(35.5, 35.6), with_curve=False)
    pub = write_csv(tmp_path / "paper.csv", ["task", "loss", "metric", "mean", "std"],
                    [["iwslt14_de_en", "ce", "bleu", 35.09, 0.07], ["iwslt14_de_en", "el", "bleu", 35.50, 0.11],
                     ["other_task", "ce", "bleu", 1.0, ""]])
    rc, stdout, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out", "--published", pub,
                               "--no-plots")
    assert rc == 0, err
    assert not list((tmp_path / "out").glob("*.png"))
    rows = parse_markdown_tables(stdout)["iwslt14_de_en, checkpoint avg_last10"]
    assert [r["loss"] for r in rows] == ["ce", "el", "EL - CE", "ce (published)", "el (published)",
                                          "EL - CE (published)"]
    assert rows[3]["bleu"] == "35.09 +- 0.07" and rows[3]["sacrebleu"] == "-"
    assert rows[5]["bleu"] == "+0.41"
    bad = write_csv(tmp_path / "bad.csv", ["task", "loss", "mean"], [["t", "ce", 1]])
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out3", "--published", bad)
    assert rc == 1 and "missing column(s) metric" in err


def test_file_names_are_safe():
    assert R.metric_plot_name("iwslt14 de/en", "avg_last10", "bleu") == "iwslt14_de_en__avg_last10__bleu.png"
    assert R.curve_plot_name("cifar-100", "eval_top1") == "cifar-100__curve__eval_top1.png"
    assert R.metric_plot_name("../x", "best", "top1") == "x__best__top1.png"


def test_module_is_framework_free():
    """Only the standard library at import time; matplotlib inside the plotting helpers only."""
    sources = sorted((ROOT / "encouraging_loss" / "tools" / "results").glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "records.py", "tables.py", "plots.py", "cli.py"}
    top, inner = set(), set()
    for source in sources:
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                roots = {n.split(".")[0] for n in names}
                (top if node in tree.body else inner).update(roots)
    assert not (top | inner) & {"torch", "fairseq", "timm", "fairseq_el", "timm_el", "numpy"}
    assert "matplotlib" not in top and inner <= {"matplotlib"}


# ----------------------------------------------------------------------------- damaged input (issue 16)


def test_record_nested_absurdly_deep_is_one_line(tmp_path, capsys):
    """A record nested 100,000 deep was a RecursionError traceback."""
    path = write_record(tmp_path / "runs", loss="ce")
    text = path.read_text()
    path.write_text(text[:-1] + ', "info": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err == f"error: result record {path}: nested too deeply to be a result record\n"
    # a record nested deeper than any record is (but not enough to break the parser)
    path.write_text(text[:-1] + ', "info": {"x": ' + "[" * 100 + "]" * 100 + "}}")
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 1 and err.count("\n") == 1 and str(path) in err and "nested more than" in err
    assert not (tmp_path / "out").exists()


def test_huge_metric_values_are_refused_naming_record_and_field(tmp_path, capsys):
    """1.7e308 is a finite float, but the mean of two is not: it was an OverflowError traceback
    (fsum), and a table of inf/nan where it got through. The record is refused, naming its field."""
    write_record(tmp_path / "runs", loss="ce", seed=1, metrics={"bleu": 35.0})
    big = write_record(tmp_path / "runs", loss="ce", seed=2, metrics={"bleu": 35.0, "sacrebleu": 1.7e308})
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and str(big) in err and "'metrics.sacrebleu'" in err
    assert "1.7e+308 is too large to be a measurement" in err
    assert not (tmp_path / "out").exists()
    # the limit itself is accepted, and everything made from it is finite
    big.write_text(big.read_text().replace("1.7e+308", "-1e100"))
    write_record(tmp_path / "runs", loss="el", seed=1, metrics={"bleu": 35.0, "sacrebleu": 1e100})
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 0, err
    assert "inf" not in out.lower() and "nan" not in out.lower()
    for name in ("summary.csv", "results.csv"):
        text = (tmp_path / "out" / name).read_text().lower()
        assert "inf" not in text and "nan" not in text


def test_describe_never_overflows():
    st = R.describe([1.7e308, 1.7e308])  # fsum overflowed before
    assert (st.mean, st.std) == (1.7e308, 0.0)
    st = R.describe([1.0e308, -1.0e308, 0.0])
    assert st.mean == 0.0 and st.std == pytest.approx(1e308)
    with pytest.raises(ValueError, match="too large for a float"):
        R.describe([1.7e308, -1.7e308])  # the std itself is beyond the largest float
    with pytest.raises(ValueError, match="finite"):
        R.describe([1.0, math.inf])


TIMM_HEADER = "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\r\n"
TIMM_ROWS = "0,2.0,1.8,60.0,85.0,0.1\r\n1,1.9,1.7,61.0,86.0,0.1\r\n"


@pytest.mark.parametrize("tail, problem", [
    (b"2,1.8,1.6,62.0,87.0,0.1\r\n" + b"\0" * 64, "line 5 holds NUL bytes (a damaged or partly written file)"),
    (b"2,1.8,1.6,62\0\0\0\0", "line 4 holds NUL bytes (a damaged or partly written file)"),
    (b"2,1.8,1.6,6", "line 4 ends without a line break (truncated mid-row?)"),
    (b"2,1.8,1.6,6\r\n", "line 4 has 4 cells, its header 6"),
    (b"2,1.8,1.6,62.0,87.0,0.12,1.7,1.5,63.0,88.0,0.1\r\n", "line 4 has 11 cells, its header 6"),
    (b"2,1.8,\xff\xfe,62.0,87.0,0.1\r\n", "line 4 is not UTF-8 text"),
])
def test_damaged_curve_is_one_line_and_writes_nothing(tmp_path, capsys, tail, problem):
    """summary.csv cut off by a crash: NUL bytes from a preallocated block, a row cut mid-way, two rows
    run together. Before, the damaged row was read as numbers (the NULs silently, "6" as a top-1 of 6)."""
    run_dir = tmp_path / "runs" / "ce-1"
    run_dir.mkdir(parents=True)
    curve = run_dir / "summary.csv"
    curve.write_bytes((TIMM_HEADER + TIMM_ROWS).encode() + tail)
    record = write_record(run_dir, task="mnist", loss="ce", seed=1, checkpoint="best", metrics={"top1": 61.0},
                          curve="summary.csv", name="result.json")
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 1 and out == "" and "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: curve {curve}: {problem}"), line
    assert f"named by {record}" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(R.CurveDamaged, match="summary.csv"):
        R.load_curve(curve)
    # --no-plots does not read curves: the tables are written
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out", "--no-plots")
    assert rc == 0, err


def test_curve_values_beyond_the_limit_are_left_out_with_a_warning(tmp_path, capsys):
    """A diverged epoch (1.7e308, inf) made matplotlib fail ("arange: cannot compute length")."""
    run_dir = tmp_path / "runs" / "ce-1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.csv").write_text(
        TIMM_HEADER.replace("\r\n", "\n") + "0,2.0,1.8,1.7e308,85.0,0.1\n1,1.9,inf,61.0,86.0,0.1\n"
        "2,1.8,1.6,62.0,87.0,0.1\n")
    write_record(run_dir, task="mnist", loss="ce", seed=1, checkpoint="best", metrics={"top1": 62.0},
                 curve="summary.csv", name="result.json")
    curve = R.load_curve(run_dir / "summary.csv", warn=lambda m: None)
    assert math.isnan(curve.columns["eval_top1"][0]) and curve.columns["eval_top1"][1:] == [61.0, 62.0]
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert rc == 0, err
    assert "2 value(s) not finite or beyond +-1e+100 (first: eval_loss at epoch 1) left out of the plots" in err
    check_png(tmp_path / "out" / "mnist__curve__eval_top1.png")


@pytest.mark.parametrize("content, problem", [
    (b"task,loss,metric,mean\niwslt14_de_en,ce,bleu,35.0\n\0\0\0\0",
     "--published {pub}: line 3 holds NUL bytes (a damaged or partly written file)"),
    (b"task,loss,metric,mean\niwslt14_de_en,ce\n", "{pub}:2: 2 cells, the header has 4 (a damaged line?)"),
    (b"task,loss,metric,mean\niwslt14_de_en,ce,bleu,1e309\n", "{pub}:2: mean inf is not a finite number"),
    (b"task,loss,metric,mean,std\niwslt14_de_en,ce,bleu,35,nan\n", "{pub}:2: std nan is not a finite number"),
    (b"task,loss,metric,mean\niwslt14_de_en,ce,bl\xffeu,35\n", "--published {pub}: line 2 is not UTF-8 text"),
])
def test_damaged_published_file_is_one_line(tmp_path, capsys, content, problem):
    """A short line was an AttributeError traceback (None.strip()), NUL bytes or inf went into the table."""
    translation_runs(tmp_path / "runs", with_curve=False)
    pub = tmp_path / "paper.csv"
    pub.write_bytes(content)
    rc, out, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out", "--published", pub)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: " + problem.format(pub=pub)), err


def test_a_folder_in_the_place_of_an_output_file(tmp_path, capsys):
    translation_runs(tmp_path / "runs", with_curve=False)
    (tmp_path / "out" / "summary.md").mkdir(parents=True)
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "out", "--force")
    assert rc == 1 and err.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'out' / 'summary.md'} is a folder, where the results write a file"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.md"]


def test_out_that_is_a_file(tmp_path, capsys):
    translation_runs(tmp_path / "runs", with_curve=False)
    (tmp_path / "file").write_text("x")
    rc, _, err = run_main(capsys, tmp_path / "runs", "--out", tmp_path / "file" / "out")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: --out {tmp_path / 'file' / 'out'}: cannot be created, "
                                            f"{tmp_path / 'file'} is not a folder")


def _env():
    return command_env(threads=1, checkout_on_path=True)


def run(cmd, **kw):
    return run_confined([PY, *map(str, cmd)], env=_env(), cwd=ROOT, timeout=300, **kw)


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
        assert one_error_line(proc, "error:") == message
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("size, fails_at", [(4096, "summary.csv"), (40_000, "png")])
def test_results_full_disk_leaves_nothing(tmp_path, size, fails_at):
    """A full disk left a 0-byte (or cut-off) PNG and the tables beside it; now nothing at all."""
    runs = _records(tmp_path / "runs")
    out = tmp_path / "out"
    proc = run(["-m", "encouraging_loss.tools.results", runs, "--out", out], full={out: size})
    line = one_error_line(proc, "error:")
    assert proc.returncode == 1 and proc.stdout == ""
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(f": {NO_SPACE}"), line
    assert line.split(": ")[-2].endswith(fails_at), line
    assert leftovers(proc, out) == {}


def test_results_full_disk_keeps_the_previous_tables(tmp_path):
    """--force over a previous run's files: a failed write leaves every one of them as it was."""
    previous = tmp_path / "previous"
    subprocess.run([PY, "-m", "encouraging_loss.tools.results", _records(tmp_path / "old", seeds=(1,)),
                    "--out", previous],
                   env=_env(), cwd=ROOT, check=True, capture_output=True)
    before = files_under(previous)
    assert len(before) == 6 and all(before.values())  # 3 tables, 2 metric plots, 1 curve plot
    out = tmp_path / "out"
    room = sum(-(-n // 4096) * 4096 for n in before.values()) + 8192  # the old files and a page or two
    proc = run(["-m", "encouraging_loss.tools.results", _records(tmp_path / "runs"), "--out", out, "--force"],
               full={out: room}, prefill={os.fspath(out.resolve()): previous})
    assert NO_SPACE in one_error_line(proc, "error:")
    assert leftovers(proc, out) == before
