"""timm_el.robustness: the decisions of scripts/mnist_robustness.sh (EL_SPEC 6) on synthetic inputs.

An el-analyze attack report (issue 19's interface 1: ``models[name]["attacks"][attack]`` with norm, samples,
subset, eps, accuracy, margin_mean, and ``models[name]["input_gradient"]``) is written by hand with known
accuracies, so that the records, the el-results summary beside the paper's numbers, robustness.md and the
plots can be checked cell by cell. The published CSV is checked against the paper's numbers (EL_SPEC 6, Tables
7 and 11). The script itself runs end to end in tests/scripts/test_mnist_robustness.py.
"""
import csv
import json
import math

import pytest

pytest.importorskip("timm")
from matplotlib.image import imread

from encouraging_loss.tools.results import load_published
from timm_el import robustness as R
from timm_el.attacks import ATTACKS, L2_EPS, LINF_EPS


def accuracy(name, attack, k, seed):
    """The synthetic accuracy of model ``name`` under ``attack`` at the k-th eps: EL one point above CE,
    seed s adds s (so over seeds 1 and 2: mean + 1.5, std sqrt(0.5))."""
    return 90.0 - 10 * k + (1.0 if name == "EL" else 0.0) + seed + (0.5 if attack.endswith("_l2") else 0.0)


def make_report(seed, attacks, names=("CE", "EL"), samples=20, aa_samples=4):
    models = {}
    for name in names:
        done = {}
        for a in attacks:
            eps = list(LINF_EPS if ATTACKS[a].norm == "Linf" else L2_EPS)
            subset = a.startswith(("apgd", "autoattack"))
            done[a] = {"norm": ATTACKS[a].norm, "samples": aa_samples if subset else samples, "subset": subset,
                       "eps": eps, "accuracy": [accuracy(name, a, k, seed) for k in range(len(eps))],
                       "margin_mean": [1.0 - 0.1 * k for k in range(len(eps))]}
        models[name] = {"accuracy": 98.0, "attacks": done,
                        "input_gradient": {"samples": samples, "zero_fraction": 0.25 if name == "EL" else 0.0}}
    return {"models": models}


def write_reports(work, columns=("clean", "fgsm"), seeds=(1, 2), **kwargs):
    for c in columns:
        for s in seeds:
            out = work / c / "attacks" / f"seed{s}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(make_report(s, R.COLUMN_ATTACKS[c], **kwargs)))
    return work


# ----------------------------------------------------------------------------- the paper's numbers


def test_published_csv_holds_the_papers_tables(tmp_path):
    path = R.write_published(tmp_path / "paper.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cell = {(r["task"], r["checkpoint"], r["loss"], r["metric"]): float(r["mean"]) for r in rows}
    assert len(rows) == len(cell) == 5 * 2 * 7  # five panels, CE and EL, seven eps each
    # Table 11 (clean training, AutoAttack), EL_SPEC 6
    assert cell["mnist_robustness_clean", "autoattack", "ce", "acc@0"] == 98.69
    assert cell["mnist_robustness_clean", "autoattack", "el", "acc@0"] == 99.04
    assert cell["mnist_robustness_clean", "autoattack", "ce", "acc@0.1"] == 74.89
    assert cell["mnist_robustness_clean", "autoattack", "el", "acc@0.25"] == 0.26
    assert cell["mnist_robustness_clean", "autoattack", "ce", "acc@0.3"] == 0.0
    assert cell["mnist_robustness_clean", "autoattack_l2", "el", "acc@1"] == 84.03
    assert cell["mnist_robustness_clean", "autoattack_l2", "ce", "acc@3"] == 0.05
    assert cell["mnist_robustness_clean", "autoattack_l2", "el", "acc@100"] == 0.0
    # Table 7 (adversarial training)
    assert cell["mnist_robustness_fgsm", "fgsm", "ce", "acc@0"] == 95.43
    assert cell["mnist_robustness_fgsm", "fgsm", "el", "acc@0.3"] == 94.15
    assert cell["mnist_robustness_pgd", "pgd", "ce", "acc@0.2"] == 84.51
    assert cell["mnist_robustness_pgd", "pgd", "el", "acc@0.05"] == 95.77
    assert cell["mnist_robustness_pgd_l2", "pgd_l2", "ce", "acc@3"] == 10.83
    assert cell["mnist_robustness_pgd_l2", "pgd_l2", "el", "acc@10"] == 76.22
    assert cell["mnist_robustness_pgd_l2", "pgd_l2", "ce", "acc@0.3"] == 98.38
    assert all(r["std"] == "" for r in rows)  # the paper gives none
    # el-results reads it
    published = load_published(path)
    assert len(published) == 70 and published[0].std is None and published[0].checkpoint == "autoattack"
    # the columns asked for; the smoke run's tasks
    rows = R.published_rows(["fgsm"], smoke=True)
    assert {r["task"] for r in rows} == {"mnist_robustness_fgsm_smoke"} and len(rows) == 14


def test_each_paper_panel_fits_its_attacks_grid():
    for (column, attack), by_loss in R.PAPER.items():
        assert attack in R.COLUMN_ATTACKS[column]
        for values in by_loss.values():
            assert len(values) == len(R.eps_grid(attack)) == 7
    assert R.eps_grid("autoattack_l2") == (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    assert [R.metric_name(e) for e in (0.0, 0.05, 1.0, 100.0)] == ["acc@0", "acc@0.05", "acc@1", "acc@100"]
    # Table 7: each adversarially trained column attacked by its own attack, plus APGD-DLR of the same norm
    for column in ("fgsm", "pgd", "pgd_l2"):
        own, check = R.COLUMN_ATTACKS[column]
        assert own == column and ATTACKS[check].kind == "APGD" and ATTACKS[check].norm == ATTACKS[own].norm
    assert set(R.COLUMN_ATTACKS["clean"]) == set(ATTACKS)


# ----------------------------------------------------------------------------- report -> records


def test_report_records(tmp_path):
    report = make_report(2, R.COLUMN_ATTACKS["fgsm"])
    records = R.report_records(report, column="fgsm", seed=2, source="fgsm/attacks/seed2/report.json")
    assert [(r["loss"], r["checkpoint"]) for r in records] == [
        ("ce", "fgsm"), ("ce", "apgd_dlr"), ("el", "fgsm"), ("el", "apgd_dlr")]
    r = records[2]
    assert r["schema"] == "el-result/1" and r["task"] == "mnist_robustness_fgsm" and r["seed"] == 2
    assert r["run"] == "el-seed2"
    assert list(r["metrics"]) == ["acc@0", "acc@0.05", "acc@0.1", "acc@0.15", "acc@0.2", "acc@0.25", "acc@0.3",
                                  "zero_grad_fraction"]
    assert r["metrics"]["acc@0.1"] == accuracy("EL", "fgsm", 2, 2) and r["metrics"]["zero_grad_fraction"] == 0.25
    assert r["info"]["samples"] == 20 and r["info"]["subset"] is False and r["info"]["norm"] == "Linf"
    assert records[1]["info"]["samples"] == 4 and records[1]["info"]["subset"] is True
    assert records[0]["metrics"]["zero_grad_fraction"] == 0.0
    # the smoke run's task; one loss only
    smoke = R.report_records(report, column="fgsm", seed=2, smoke=True, losses=["el"])
    assert {x["task"] for x in smoke} == {"mnist_robustness_fgsm_smoke"} and {x["loss"] for x in smoke} == {"el"}
    # el-results reads what it writes
    from encouraging_loss.tools.results import read_record

    (tmp_path / "r.json").write_text(json.dumps(r))
    rec = read_record(tmp_path / "r.json")
    assert rec.task == "mnist_robustness_fgsm" and rec.checkpoint == "fgsm" and rec.metrics == r["metrics"]


def test_report_records_refuses_a_broken_report():
    good = make_report(1, ["pgd"])
    cases = []
    bad = json.loads(json.dumps(good))
    bad["models"]["CE"]["attacks"]["pgd"]["accuracy"].pop()
    cases.append((bad, "models.CE.attacks.pgd: eps and accuracy must be lists of the same length"))
    bad = json.loads(json.dumps(good))
    bad["models"]["EL"]["attacks"]["pgd"]["accuracy"][3] = float("nan")
    cases.append((bad, r"models.EL.attacks.pgd.accuracy: nan is not a finite number"))
    bad = json.loads(json.dumps(good))
    bad["models"]["ResNet"] = bad["models"].pop("CE")
    cases.append((bad, "model 'ResNet' is not one of CE, EL"))
    bad = json.loads(json.dumps(good))
    bad["models"]["CE"]["attacks"] = {}
    cases.append((bad, "model CE has no attacks"))
    cases.append(({"models": {}}, "no models"))
    for report, message in cases:
        with pytest.raises(R.RobustnessError, match=message):
            R.report_records(report, column="pgd", seed=1, source="r.json")


def test_report_problem_says_what_is_missing(tmp_path):
    names, attacks = ["CE", "EL"], list(R.COLUMN_ATTACKS["pgd"])
    assert R.report_problem(tmp_path, names, attacks).endswith("report.json was not written")
    (tmp_path / "report.json").write_text('{"models": {"CE": ')
    assert "report.json" in R.report_problem(tmp_path, names, attacks)
    (tmp_path / "report.json").write_text(json.dumps(make_report(1, ["pgd"])))
    assert R.report_problem(tmp_path, names, attacks).endswith("model CE was not attacked by apgd_dlr")
    (tmp_path / "report.json").write_text(json.dumps(make_report(1, attacks, names=["CE"])))
    assert R.report_problem(tmp_path, names, attacks).endswith("has no model EL")
    assert R.report_problem(tmp_path, ["CE"], attacks) is None
    report = make_report(1, attacks)
    report["models"]["EL"]["attacks"]["pgd"]["accuracy"] = []
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert R.report_problem(tmp_path, names, attacks).endswith("model EL, attack pgd: no accuracy for every eps")
    (tmp_path / "report.json").write_text(json.dumps(make_report(1, attacks)))
    assert R.report_problem(tmp_path, names, attacks) is None


def test_analyze_command(tmp_path):
    cmd = R.analyze_command(tmp_path, "pgd_l2", 3, max_samples=500, aa_max_samples=50, device="cpu", python="py")
    assert cmd[:5] == ["py", "-m", "timm_el.analyze", str(tmp_path / "pgd_l2" / "runs" / "ce-seed3"),
                       str(tmp_path / "pgd_l2" / "runs" / "el-seed3")]
    text = " ".join(cmd)
    assert "--names CE EL" in text and "--attack pgd_l2,apgd_dlr_l2" in text and "--dataset torch/mnist" in text
    assert f"--out {tmp_path / 'pgd_l2' / 'attacks' / 'seed3'}" in text and "--split test" in text
    assert "--max-samples 500" in text and "--aa-max-samples 50" in text and "--device cpu" in text
    assert "--attack fgsm,pgd,pgd_l2,apgd_dlr,apgd_dlr_l2,autoattack,autoattack_l2" in " ".join(
        R.analyze_command(tmp_path, "clean", 1))
    assert "--max-samples" not in " ".join(R.analyze_command(tmp_path, "clean", 1, losses=["el"]))
    assert R.train_flags("clean") == [] and R.train_flags("pgd", ["-b", "64"]) == ["--adv-train", "pgd", "-b", "64"]


# ----------------------------------------------------------------------------- tables and plots


def test_results_tables_and_plots(tmp_path, capsys):
    work = write_reports(tmp_path)
    paths, written = R.results(work, ["clean", "fgsm"], [1, 2])
    assert written
    out = work / "results"
    records = sorted((out / "records").rglob("*.json"))
    assert len(records) == 2 * 2 * (7 + 2)  # seeds x losses x attacks
    assert (out / "records" / "fgsm" / "seed2" / "el__apgd_dlr.json").is_file()
    # el-results: mean +- std over the seeds beside the paper's
    summary = (out / "summary.md").read_text()
    assert "## mnist_robustness_clean, checkpoint autoattack" in summary
    assert "## mnist_robustness_fgsm, checkpoint apgd_dlr" in summary
    auto = summary.split("## mnist_robustness_clean, checkpoint autoattack\n")[1].split("## ")[0]
    assert "| ce | 2 | 91.50 +- 0.71 | 81.50 +- 0.71 |" in auto
    assert "| ce (published) |  | 98.69 +- - | 93.51 +- - | 74.89 +- - |" in auto
    assert "| el (published) |  | 99.04 +- - | 94.99 +- - |" in auto
    # robustness.md: Table 11 (Linf and L2 side by side), Table 7, the other attacks, the masking indicator
    md = (out / "robustness.md").read_text()
    t11 = md.split("## Table 11: clean training, AutoAttack\n")[1].split("## ")[0]
    lines = t11.strip().splitlines()
    assert lines[0] == ("| Linf eps | AutoAttack CE | AutoAttack EL | paper CE | paper EL | L2 eps | AutoAttack-L2 CE "
                        "| AutoAttack-L2 EL | paper CE | paper EL |")
    assert lines[2] == ("| 0 (none) | 91.50 ± 0.71 | 92.50 ± 0.71 | 98.69 | 99.04 | 0 (none) | 92.00 ± 0.71 | "
                        "93.00 ± 0.71 | 98.69 | 99.04 |")
    assert lines[4] == ("| 0.1 | 71.50 ± 0.71 | 72.50 ± 0.71 | 74.89 | 79.31 | 1 | 72.00 ± 0.71 | 73.00 ± 0.71 | "
                        "80.76 | 84.03 |")
    assert len([x for x in lines if x.startswith("| ")]) == 1 + 7  # the header and seven eps
    assert "Samples: AutoAttack, AutoAttack-L2: 4 test images (a fixed seeded subset)." in t11
    t7 = md.split("## Table 7: ")[1].split("## ")[0]
    assert "| Linf eps | FGSM CE | FGSM EL | paper CE | paper EL |" in t7 and "PGD CE" not in t7
    assert "| 0.3 | 31.50 ± 0.71 | 32.50 ± 0.71 | 87.87 | 94.15 |" in t7
    assert "Samples: FGSM: 20 test images." in t7
    other = md.split("## clean training: the other attacks (no published numbers)\n")[1].split("## ")[0]
    assert other.splitlines()[1].startswith("| Linf eps | FGSM CE | FGSM EL | PGD CE | PGD EL | APGD-DLR CE | "
                                            "APGD-DLR EL | L2 eps | PGD-L2 CE |")
    assert "## FGSM adversarial training: the other attacks" in md
    assert "| clean | 0.0000 ± 0.0000 | 0.2500 ± 0.0000 |" in md
    # the plots: a PNG per column, not blank
    for column in ("clean", "fgsm"):
        image = imread(out / f"robustness_{column}.png")
        assert image.shape[0] > 300 and image.std() > 0.05
    # the same inputs: skipped; a report changed: written again
    assert R.results(work, ["clean", "fgsm"], [1, 2])[1] is False
    assert "results: up to date" in capsys.readouterr().err
    write_reports(work, columns=("fgsm",), seeds=(2,), samples=30)
    assert R.results(work, ["clean", "fgsm"], [1, 2])[1] is True
    assert "Samples: FGSM: 20 / 30 test images." in (out / "robustness.md").read_text()
    # fewer seeds: the records of the others are gone, a single run has no std
    R.results(work, ["fgsm"], [1])
    assert sorted(p.parent.name for p in (out / "records").rglob("*.json")) == ["seed1"] * 4
    assert "| 0.3 | 31.00 | 32.00 | 87.87 | 94.15 |" in (out / "robustness.md").read_text()


def test_results_refuses_missing_reports_and_models(tmp_path):
    with pytest.raises(R.RobustnessError, match=r"no attack report .*clean/attacks/seed1/report.json "
                                                r"\(run the attack stage\)"):
        R.results(tmp_path, ["clean"], [1])
    write_reports(tmp_path, columns=("pgd",), seeds=(1,), names=("EL",))
    with pytest.raises(R.RobustnessError, match="report.json: no model CE"):
        R.results(tmp_path, ["pgd"], [1])
    assert R.results(tmp_path, ["pgd"], [1], losses=["el"])[1]


def test_markdown_marks_cells_with_fewer_runs():
    records = R.report_records(make_report(1, ["pgd"]), column="pgd", seed=1)
    records += [r for r in R.report_records(make_report(2, ["pgd"]), column="pgd", seed=2) if r["loss"] == "el"]
    md = R.render_markdown(records, seeds=[1, 2])
    assert "| 0.05 | 81.00 (n=1) | 82.50 ± 0.71 | 92.32 | 95.77 |" in md
    assert "| 0 (none) | 91.00 (n=1) | 92.50 ± 0.71 | 94.30 | 96.88 |" in md  # the paper's 94.3 as printed
    assert "mean ± std over seeds 1, 2" in md


# ----------------------------------------------------------------------------- prepare, train, command line


def test_prepare_keeps_a_prepared_folder(tmp_path, capsys):
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    (data / "prepared.json").write_text(json.dumps({"data": "/somewhere", "train_limit": None, "test_limit": None}))
    assert R.prepare(tmp_path / "work")["data"] == "/somewhere"
    assert "prepared already from /somewhere" in capsys.readouterr().err
    with pytest.raises(R.RobustnessError, match="was prepared with limits None/None, not 100/None"):
        R.prepare(tmp_path / "work", train_limit=100)
    with pytest.raises(R.RobustnessError, match="--data: directory not found"):
        R.prepare(tmp_path / "other", tmp_path / "missing")


def _finished(run):
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "last.json").write_text(json.dumps({
        "schema": "el-result/1", "task": "t", "loss": "ce", "seed": 1, "run": run.name, "checkpoint": "last",
        "metrics": {"top1": 99.0}}))


def test_train_skips_finished_runs_without_starting_anything(tmp_path, capsys):
    # the layout the lead's runs use: WORK/clean/runs/<loss>-seed<seed>
    for loss in ("ce", "el"):
        _finished(tmp_path / "clean" / "runs" / f"{loss}-seed1")
    assert R.train(tmp_path, ["clean"], [1]) == 0
    err = capsys.readouterr().err
    assert "train clean ce-seed1: finished" in err and "train clean el-seed1: finished" in err
    # a run to do needs the prepared data
    with pytest.raises(R.RobustnessError, match="data is not prepared"):
        R.train(tmp_path, ["clean", "fgsm"], [1])
    with pytest.raises(R.RobustnessError, match="--log-end applies to the el runs"):
        R.train(tmp_path, ["clean"], [1], ["ce"], log_end=0.5)


def test_train_dry_run_gives_the_adversarial_flag(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared.json").write_text("{}")
    assert R.train(tmp_path, ["pgd"], [2], ["el"], log_end=0.5, smoke=True, dry_run=True) == 0
    err = capsys.readouterr().err
    command = [line for line in err.splitlines() if "-m timm_el.train" in line]
    assert len(command) == 1, err
    assert "--adv-train pgd" in command[0] and "--log-end 0.5" in command[0] and "--epochs 1" in command[0]
    assert f"--output {tmp_path / 'pgd' / 'runs'} --experiment el-seed2" in command[0]
    assert "--task-name mnist_robustness_mnist_ta_cnn_smoke" in command[0]
    assert not (tmp_path / "pgd").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--columns", "clean,foo"], "--columns: unknown value 'foo' (clean, fgsm, pgd, pgd_l2)"),
    (["attack", "--seeds", "1,x"], "attack: error: argument --seeds: 'x' is not a non-negative integer"),
    (["attack", "--seeds", "1,1"], "--seeds: a seed given twice (1 1)"),
    (["attack", "--losses", "ce,mse"], "--losses: unknown value 'mse' (ce, el)"),
    (["attack", "--max-samples", "0"], "--max-samples must be an integer >= 1, got 0"),
    (["results", "--columns", "pgd,pgd"], "--columns: 'pgd' given twice"),
    (["results", "--", "-b", "3"], "flags after -- go to the train command only, got '-b 3'"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        R.main([argv[0], "--work", str(tmp_path / "w"), *argv[1:]])
    assert exc.value.code == 2
    prefix = "timm_el.robustness " if ": error: " in message else "timm_el.robustness: error: "
    assert capsys.readouterr().err.strip().splitlines() == [prefix + message]
    assert not (tmp_path / "w").exists()


def test_published_command(tmp_path, capsys):
    assert R.main(["published", "--out", str(tmp_path / "p.csv"), "--columns", "clean"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert len(rows) == 28 and {r["checkpoint"] for r in rows} == {"autoattack", "autoattack_l2"}
    assert math.isclose(float(rows[0]["mean"]), 98.69)


def test_smoke_leaves_autoattack_out():
    """A smoke run attacks without AutoAttack (its minimum cost per eps dominated the smoke run); the scale-free
    APGD-DLR stays, and the real run keeps every attack of the paper."""
    assert R.column_attacks('clean') == R.COLUMN_ATTACKS['clean']
    assert R.column_attacks('clean', smoke=True) == ('fgsm', 'pgd', 'pgd_l2', 'apgd_dlr', 'apgd_dlr_l2')
    assert R.column_attacks('pgd', smoke=True) == R.COLUMN_ATTACKS['pgd']
    cmd = R.analyze_command('W', 'clean', 1, smoke=True)
    assert cmd[cmd.index('--attack') + 1] == 'fgsm,pgd,pgd_l2,apgd_dlr,apgd_dlr_l2'
    cmd = R.analyze_command('W', 'clean', 1)
    assert 'autoattack,autoattack_l2' in cmd[cmd.index('--attack') + 1]
