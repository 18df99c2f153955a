"""scripts/graph.sh and pyg_el.recipe (issue 21, point 3): the paper's graph runs (section 5.2 / Fig. 4, EL_SPEC 6).

End to end on a tiny TU dataset the test writes (TOY.zip under a --data folder, 40 graphs of 2 classes, the TU
raw format): 2 runs of CE and EL with a tiny SAGPool (-- --hidden 8 --max-epochs 3 --patience 1 --batch-size 8).
Checked: the steps' order (interleaved: run 0 CE, run 0 EL, run 1 CE, run 1 EL), the records and their settings,
el-results' summary, graph.md's numbers recomputed from the result.json files (means, stds, the paired
difference by seed, won / tied / lost, epochs, seconds), graph.png; a second run trains nothing and leaves
every file as it was. Bad options are one line, exit status 2, and create nothing. The results stage on
hand-made records in the layout of a run folder being filled (unfinished runs, runs beyond --runs), and the
paired difference, verdicts and settings checks on hand-made records.
"""
import json
import math
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

pytest.importorskip("torch_geometric")

from pyg_el import recipe  # noqa: E402  (after the skip: the module needs torch)

SCRIPT = ROOT / "scripts" / "graph.sh"
TINY = ["--", "--hidden", "8", "--max-epochs", "3", "--patience", "1", "--batch-size", "8"]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def script(*args, check=True, timeout=300):
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def toy_zip(path: Path, name: str = "TOY", n: int = 40, seed: int = 0) -> Path:
    """A TU archive (``NAME/NAME_{A,graph_indicator,graph_labels,node_labels}.txt``, 1-based ids, labels 1 and
    2): ``n`` chains of 5 to 8 nodes, class 1 mostly node label 2, class 0 mostly node label 0."""
    rng = random.Random(seed)
    a, indicator, node_labels, graph_labels, first = [], [], [], [], 1
    for g in range(n):
        y, size = g % 2, rng.randint(5, 8)
        labels = rng.choices((0, 1, 2), weights=(0.1, 0.3, 0.6) if y else (0.6, 0.3, 0.1), k=size)
        for i in range(size - 1):
            a += [f"{first + i}, {first + i + 1}", f"{first + i + 1}, {first + i}"]
        indicator += [str(g + 1)] * size
        node_labels += [str(x) for x in labels]
        graph_labels.append(str(y + 1))
        first += size
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for part, lines in (("A", a), ("graph_indicator", indicator), ("graph_labels", graph_labels),
                            ("node_labels", node_labels)):
            zf.writestr(f"{name}/{name}_{part}.txt", "\n".join(lines) + "\n")
    return path


def mean_std(values):
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("graph")
    data = base / "data"
    toy_zip(data / "tu" / "TOY.zip")
    work = base / "work"
    args = ["--work", work, "--data", data, "--datasets", "TOY", "--runs", "2", *TINY]
    first = script(*args)
    files = sorted(p for p in work.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second = script(*args)
    return work, data, first, second, stamps


def test_end_to_end(recipe_run):
    from matplotlib.image import imread

    work, data, first, _, _ = recipe_run
    assert (work / "data" / "tu" / "TOY.zip").read_bytes() == (data / "tu" / "TOY.zip").read_bytes()
    # interleaved: pyg_el.train --runs 1 for CE then EL, then --runs 2 for both
    steps = [line.split(": python -m")[0] for line in first.stderr.splitlines() if line.startswith("== train TOY")]
    assert steps == ["== train TOY run 0 ce (1/4)", "== train TOY run 0 el (2/4)", "== train TOY run 1 ce (3/4)",
                     "== train TOY run 1 el (4/4)"]
    records = {}
    for loss in ("ce", "el"):
        settings = json.loads((work / "runs" / f"TOY-{loss}" / "settings.json").read_text())
        assert settings["loss"] == {"ce": "ce", "el": "encouraging"}[loss]
        assert settings["log_end"] == (0.75 if loss == "el" else None)
        assert (settings["hidden"], settings["max_epochs"], settings["patience"], settings["batch_size"],
                settings["seed"]) == (8, 3, 1, 8, 777)
        for r in range(2):
            rec = json.loads((work / "runs" / f"TOY-{loss}" / f"run{r}" / "result.json").read_text())
            assert (rec["task"], rec["loss"], rec["seed"], rec["run"]) == ("TOY", loss, 777 + r, f"TOY-{loss}/run{r}")
            records[loss, r] = rec
    summary = (work / "results" / "summary.md").read_text()
    assert "## TOY, checkpoint best_valid" in summary and "| ce | 2 |" in summary and "| el | 2 |" in summary
    assert (work / "results" / "TOY__curve__valid_acc.png").is_file()

    # graph.md, recomputed from the records
    md = (work / "results" / "graph.md").read_text()
    acc = {loss: [records[loss, r]["metrics"]["test_acc"] for r in range(2)] for loss in ("ce", "el")}
    (mc, sc), (me, se) = mean_std(acc["ce"]), mean_std(acc["el"])
    diffs = [acc["el"][r] - acc["ce"][r] for r in range(2)]
    md_, sd_ = mean_std(diffs)
    tally = (sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs))

    def mean_of(loss, key, where="metrics"):
        return sum(records[loss, r][where][key] for r in range(2)) / 2

    row = (f"| TOY | {mc:.2f} ± {sc:.2f} (n=2) | {me:.2f} ± {se:.2f} (n=2) | {me - mc:+.2f} | "
           f"{md_:+.2f} ± {sd_:.2f} (n=2) | {tally[0]} / {tally[1]} / {tally[2]} | "
           f"{mean_of('ce', 'epochs'):.0f} ({mean_of('ce', 'best_epoch'):.0f}) / "
           f"{mean_of('el', 'epochs'):.0f} ({mean_of('el', 'best_epoch'):.0f}) | "
           f"{mean_of('ce', 'wall_s', 'info'):.0f} / {mean_of('el', 'wall_s', 'info'):.0f} |")
    assert row in md.splitlines(), md
    for r in range(2):
        assert f"| {777 + r} | {acc['ce'][r]:.2f} | {acc['el'][r]:.2f} | {diffs[r]:+.2f} |" in md
    assert "exact numbers of its Fig. 4 are not in our copy (EL_SPEC 6)" in md
    assert "EL improves over CE on both PROTEINS and NCI1" in md
    verdict = [line for line in md.splitlines() if line.startswith("- TOY: ")]
    assert len(verdict) == 1 and f"{md_:+.2f} points on average over 2 paired runs" in verdict[0]
    assert "EL: log_end 0.75" in md and "hidden 8" in md
    image = imread(work / "results" / "graph.png")
    assert image.shape[0] > 300 and image.std() > 0.05


def test_rerun_is_a_no_op(recipe_run):
    work, _, first, second, stamps = recipe_run
    assert "0 of 4 steps done" in first.stderr and "4 of 4 steps done" in second.stderr
    assert "TOY.zip is a copy of" in second.stderr and "results: up to date" in second.stderr
    assert "python -m pyg_el.train" not in second.stderr and "wrote" not in second.stderr
    now = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert now == stamps  # nothing written, nothing added
    assert second.stdout == (work / "results" / "graph.md").read_text()  # the table, printed again


def test_other_settings_in_a_work_directory_are_refused(recipe_run, capsys):
    work, data, _, _, _ = recipe_run
    with pytest.raises(SystemExit) as stop:
        recipe.main(["--prog", "graph.sh", "check", "--work", str(work), "--data", str(data), "--datasets", "TOY",
                     "--runs", "2", "--", "--hidden", "16", "--max-epochs", "3", "--patience", "1",
                     "--batch-size", "8"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"graph.sh: error: {work}/runs/TOY-ce holds runs made with --hidden 8, this command has --hidden 16; give "
        "the same flags to continue them, or another --work"]


def test_train_plan_redoes_only_an_unfinished_run(recipe_run, tmp_path):
    import shutil

    work, data, _, _, _ = recipe_run
    copy = tmp_path / "work"
    shutil.copytree(work / "runs", copy / "runs")
    (copy / "runs" / "TOY-el" / "run1" / "result.json").unlink()  # EL's run 1 interrupted
    plan = recipe.train_plan(copy, ["TOY"], ["ce", "el"], 3, data=str(data), extra=TINY[1:])
    assert [(d, r, loss, done) for d, r, loss, _, done in plan] == [
        ("TOY", 1, "ce", True), ("TOY", 1, "el", True), ("TOY", 2, "ce", True), ("TOY", 2, "el", False),
        ("TOY", 3, "ce", False), ("TOY", 3, "el", False)]
    assert plan[3][3][plan[3][3].index("--runs") + 1] == "2" and plan[3][3][plan[3][3].index("--out") + 1] == \
        str(copy / "runs" / "TOY-el")


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs: '0' is not an integer >= 1"),  # the script's own check
    # python -m pyg_el.recipe check, before anything is created
    (["--datasets", "TOY,FOO"], "--datasets: unknown dataset 'FOO' (the paper's: PROTEINS, NCI1; another TU "
                                "dataset needs {data}/tu/FOO.zip or {data}/FOO.zip)"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    data = tmp_path / "data"
    toy_zip(data / "TOY.zip")
    work = tmp_path / "work"
    proc = script("--work", work, "--data", data, "--datasets", "TOY", *args, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["graph.sh: error: " + message.format(data=data)]
    assert not work.exists()


@pytest.mark.parametrize("args, message", [
    # what graph.sh passes to its check (the same command; in this process: no second interpreter start)
    (["--losses", "ce,foo"], "--losses: unknown value 'foo' (ce, el)"),
    (["--losses", "el,el"], "--losses: 'el' given twice"),
    (["--datasets", "TOY,TOY"], "--datasets: 'TOY' given twice"),
    (["--datasets", "PROTEINS"], "--data {data}: no PROTEINS.zip (looked for {data}/tu/PROTEINS.zip and "
                                 "{data}/PROTEINS.zip); leave --data out to download it"),
    (["--log-end", "1.5"], "argument --log-end: '1.5' is not a number in (0, 1]"),
    (["--", "--loss", "ce"], "-- --loss: set by the recipe; use its --losses"),
    (["--", "--dropout", "1.5"], "pyg_el.train: --dropout must be in [0, 1), got 1.5"),
])
def test_check_errors_are_one_line(tmp_path, capsys, args, message):
    data = tmp_path / "data"
    toy_zip(data / "TOY.zip")
    work = tmp_path / "work"
    own, extra = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
    argv = ["--prog", "graph.sh", "check", "--work", str(work), "--data", str(data), "--datasets", "TOY", *own]
    with pytest.raises(SystemExit) as stop:
        recipe.main(argv + extra)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["graph.sh: error: " + message.format(data=data)]
    assert not work.exists()


def test_help_names_the_defaults_and_the_cost():
    text = " ".join(script("--help").stdout.split())  # the words, not the line breaks
    for needle in ("--work DIR [runs/graph; runs/graph-smoke with --smoke]",
                   "[PROTEINS,NCI1; PROTEINS with --smoke]", "--runs N runs per dataset and loss [10; 1 with --smoke]",
                   "--seed S seed of run 0; run r uses S + r [777, SAGPool's]",
                   "--log-end LE the EL runs' --log-end, in (0, 1] [0.75]",
                   "--threads N CPU threads per run (also OMP_NUM_THREADS) [1]", "DIR/tu/NAME.zip", "Cost (measured",
                   "PROTEINS (1,113 graphs)", "NCI1 (4,110 graphs)", "Fig. 4 numbers are not in our copy",
                   "A GPU is not needed", "keep one thread"):
        assert needle in text, needle


# ----------------------------------------------------------------------------- the module on hand-made records


SETTINGS = {"dataset": "PROTEINS", "seed": 777, "batch_size": 128, "lr": 0.0005, "hidden": 128, "patience": 50}


def rec(loss, seed, acc, dataset="PROTEINS", epochs=100, best=50, wall=60.0, **settings):
    el = {"loss": "encouraging", "log_end": 0.75} if loss == "el" else {"loss": "ce", "log_end": None}
    return {"schema": "el-result/1", "task": dataset, "loss": loss, "seed": seed,
            "run": f"{dataset}-{loss}/run{seed - 777}", "checkpoint": "best_valid",
            "metrics": {"test_acc": acc, "valid_acc": 75.0, "best_epoch": best, "epochs": epochs},
            "info": {"wall_s": wall, "settings": {**SETTINGS, "dataset": dataset, **el, **settings}},
            "curve": "curve.csv"}


def test_paired_difference_pairs_runs_by_seed():
    ce = [rec("ce", 777 + k, acc) for k, acc in enumerate([70.0, 72.0, 74.0, 76.0, 78.0])]
    el = [rec("el", 778 + k, acc) for k, acc in enumerate([74.0, 74.0, 75.0, 81.0, 60.0])]
    random.Random(1).shuffle(el)
    p = recipe.paired_difference(ce, el)
    # seeds 778..781 in both: EL - CE = +2, 0, +1, +3; 777 (CE) and 782 (EL) unpaired
    assert p["pairs"] == [(778, 72.0, 74.0, 2.0), (779, 74.0, 74.0, 0.0), (780, 76.0, 75.0, -1.0),
                          (781, 78.0, 81.0, 3.0)]
    assert p["n"] == 4 and p["mean"] == pytest.approx(1.0) and p["std"] == pytest.approx(math.sqrt(10 / 3))
    assert (p["won"], p["tied"], p["lost"]) == (2, 1, 1)
    assert p["unpaired"] == {"ce": [777], "el": [782]}
    half = 3.182 * math.sqrt(10 / 3) / 2  # t(0.975, 3 df) * std / sqrt(n)
    assert p["ci"] == pytest.approx((1.0 - half, 1.0 + half))
    assert recipe.paired_difference(ce, [])["n"] == 0 and recipe.paired_difference(ce, [])["mean"] is None
    with pytest.raises(recipe.RecipeError, match="seed 777 in two runs"):
        recipe.paired_difference(ce + [rec("ce", 777, 50.0)], el)


@pytest.mark.parametrize("ce, el, start", [
    ([70, 71, 72, 73], [72, 73.5, 73.5, 75], "PROTEINS: EL is above CE, as the paper claims: +2.00 points"),
    ([70, 71, 72, 73], [68, 68.5, 70.5, 71], "PROTEINS: EL is below CE, against the paper's claim: -2.00 points"),
    ([70, 71, 72, 73], [72, 70, 74, 70], "PROTEINS: no clear difference: EL − CE is +0.00 points"),
    ([70], [72], "PROTEINS: one pair only (EL − CE = +2.00 points); too few runs for a verdict."),
    ([70], [], "PROTEINS: no CE and EL runs with the same seed yet; no verdict."),
])
def test_verdict(ce, el, start):
    p = recipe.paired_difference([rec("ce", 777 + k, float(a)) for k, a in enumerate(ce)],
                                 [rec("el", 777 + k, float(a)) for k, a in enumerate(el)])
    assert recipe.verdict("PROTEINS", p).startswith(start)


def test_settings_must_be_one_experiment():
    recipe.check_same_settings("PROTEINS", {"ce": [rec("ce", 777, 70.0), rec("ce", 778, 71.0)],
                                            "el": [rec("el", 777, 72.0)]})  # EL differs in the loss only
    with pytest.raises(recipe.RecipeError) as err:
        recipe.check_same_settings("PROTEINS", {"ce": [rec("ce", 777, 70.0)],
                                                "el": [rec("el", 777, 72.0), rec("el", 778, 71.0, log_end=1.0)]})
    assert str(err.value) == ("PROTEINS el: PROTEINS-el/run1 was trained with --log-end 1.0, PROTEINS-el/run0 "
                              "with 0.75; the runs of one loss must share their settings (move the odd ones aside)")
    with pytest.raises(recipe.RecipeError, match=r"the ce and el runs differ in --lr \(0.0005 vs 0.001\)"):
        recipe.check_same_settings("PROTEINS", {"ce": [rec("ce", 777, 70.0)], "el": [rec("el", 777, 72.0, lr=0.001)]})


def test_run_arguments():
    args = recipe.run_arguments("NCI1", "el", 3, work="W", extra=["--bonus-rho", "0.5", "--log-every", "1"],
                                smoke=True)
    assert args == ["--dataset", "NCI1", "--root", "W/data/tu", "--loss", "encouraging", "--log-end", "0.75",
                    "--runs", "3", "--seed", "777", "--out", "W/runs/NCI1-el", "--threads", "1", "--log-every", "1",
                    "--max-epochs", "2", "--patience", "1", "--bonus-rho", "0.5"]
    ce = recipe.run_arguments("NCI1", "ce", 1, work="W", extra=["--bonus-rho", "0.5", "--pooling=global"])
    assert ce[4:6] == ["--loss", "ce"] and "--bonus-rho" not in ce and "--log-end" not in ce
    assert ce[-1] == "--pooling=global"
    for extra, message in ((["--seed", "3"], "-- --seed: set by the recipe; use its --seed"),
                           (["--log-end=1"], "-- --log-end: set by the recipe; use its --log-end"),
                           (["--no-such"], "-- unknown python -m pyg_el.train option --no-such"),
                           (["--lr"], "-- --lr needs a value")):
        with pytest.raises(recipe.RecipeError) as err:
            recipe.run_arguments("NCI1", "ce", 1, work="W", extra=extra)
        assert str(err.value) == message


def write_run(work, r, record, finished=True):
    folder = Path(work) / "runs" / f"{record['task']}-{record['loss']}" / f"run{r}"
    folder.mkdir(parents=True)
    (folder / "curve.csv").write_text("epoch,train_loss,valid_loss,valid_acc,bonus_rho,seconds\n"
                                      "1,0.7,0.6,70.0,1.0,0.4\n2,0.6,0.5,75.0,1.0,0.4\n")
    if finished:
        (folder / "result.json").write_text(json.dumps(record))


def test_results_on_a_folder_being_filled(tmp_path):
    # the layout of pyg_el.train --out folders while the recipe runs: PROTEINS with 3 CE and 2 EL runs and EL's
    # run 2 unfinished, NCI1 with one CE run only
    work = tmp_path / "work"
    ce, el = [70.0, 74.0, 78.0], [73.0, 73.0]
    for r, a in enumerate(ce):
        write_run(work, r, rec("ce", 777 + r, a, wall=50.0 + r))
    for r, a in enumerate(el):
        write_run(work, r, rec("el", 777 + r, a, epochs=120, best=60, wall=80.0))
    write_run(work, 2, rec("el", 779, 0.0), finished=False)
    write_run(work, 0, rec("ce", 777, 65.0, dataset="NCI1"))
    paths, written = recipe.results(work, ["PROTEINS", "NCI1"])
    assert written
    md = paths["graph.md"].read_text()
    assert "| PROTEINS | 74.00 ± 4.00 (n=3) | 73.00 ± 0.00 (n=2) | -1.00 | +1.00 ± 2.83 (n=2) | 1 / 0 / 1 | " \
           "100 (50) / 120 (60) | 51 / 80 |" in md
    assert "| NCI1 | 65.00 (n=1) | – | – | – | – | 100 (50) / – (–) | 60 / – |" in md
    assert "| 779 | 78.00 | – | unpaired |" in md
    assert "PROTEINS el: 1 run not finished (no result.json), left out" in md
    assert "- NCI1: no CE and EL runs with the same seed yet; no verdict." in md
    assert (work / "results" / "PROTEINS__best_valid__test_acc.png").is_file() and paths["graph.png"].is_file()
    assert "| el | 2 |" in (work / "results" / "summary.md").read_text()
    assert recipe.results(work, ["PROTEINS", "NCI1"])[1] is False  # nothing changed: skipped
    # --runs 2: CE's run 2 is left out (and its pair is gone from the tables)
    paths, written = recipe.results(work, ["PROTEINS"], runs=2, plots=False)
    md = paths["graph.md"].read_text()
    assert written and "| PROTEINS | 72.00 ± 2.83 (n=2) |" in md and "beyond --runs 2" in md
    assert not (work / "results" / "NCI1__best_valid__test_acc.png").exists()  # the previous writing's plot
    with pytest.raises(recipe.RecipeError, match="no finished runs in"):
        recipe.results(work, ["MUTAG"])


def test_loss_settings_are_the_el_flags():
    from encouraging_loss.tools.el_flags import EL_FLAG_DEFAULTS

    assert recipe.LOSS_SETTINGS == ("loss", *EL_FLAG_DEFAULTS)
