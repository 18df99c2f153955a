"""timm_el.longtail_recipe: the decisions of scripts/longtail_small.sh and scripts/inat2018.sh (EL_SPEC 6, Table 3).

Each row's training command is built and put through timm-el-train's own parser (loss, bonus, DRW, cRT flags; the
flags after -- going to the rows they apply to; the paper's iNaturalist schedule). The run records a finished run
writes (``eval/last.json`` with top1 and the shot groups) are written by hand with known accuracies, so that the
records, el-results' summary, longtail.md (the table beside the paper's numbers, the direction verdicts) and the
plot can be checked cell by cell, and skipping / resuming decided from hand-made run directories. An iNaturalist
root in the official format is written small to check the smoke run's slice with the project's own loader. The
scripts run end to end in tests/scripts/test_longtail_recipes.py.
"""
import csv
import json
import math
import os

import pytest

pytest.importorskip("timm")
from matplotlib.image import imread

from encouraging_loss.tools.results import load_published
from timm_el import longtail_recipe as L
from timm_el import recipe as R
from timm_el.train import build_parser, parse_args

ALL = [r.name for r in L.ROWS]


def value(args, flag):
    """The value of the last ``flag`` in a command."""
    return args[len(args) - args[::-1].index(flag)]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.fixture
def work(tmp_path):
    """A work directory with a prepared (empty) WORK/data: timm-el-train's parser wants the folder."""
    (tmp_path / "w" / "data").mkdir(parents=True)
    (tmp_path / "w" / "data" / "prepared.json").write_text("{}")
    return tmp_path / "w"


def cli(args):
    return parse_args(args, build_parser())


# ----------------------------------------------------------------------------- rows and the paper's numbers


def test_rows_and_published_numbers_are_the_papers_table(tmp_path):
    assert ALL == ["ce", "el_conservative", "el_normal", "el_aggressive", "crt", "crt_el", "drw", "drw_el", "focal",
                   "halted_focal"]
    assert [r.label for r in L.ROWS][:4] == ["CE", "+ conservative bonus", "+ normal bonus", "+ aggressive bonus"]
    path = L.write_published(tmp_path / "paper.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cell = {(r["loss"], r["metric"]): float(r["mean"]) for r in rows}
    assert len(rows) == len(cell) == 10 * 4 and {r["task"] for r in rows} == {"inat2018_resnet50"}
    # Table 3 / Table 9 (EL_SPEC 6): All / Many / Medium / Few
    assert [cell["ce", m] for m in L.METRICS] == [64.3, 74.1, 65.9, 59.8]
    assert [cell["el_aggressive", m] for m in L.METRICS] == [66.3, 75.1, 67.4, 62.6]
    assert [cell["crt_el", m] for m in L.METRICS] == [66.8, 71.7, 67.6, 64.6]
    assert [cell["drw_el", m] for m in L.METRICS] == [70.3, 69.0, 70.1, 70.9]
    assert [cell["halted_focal", m] for m in L.METRICS] == [63.6, 73.1, 64.6, 59.7]
    assert cell["el_conservative", "few"] == 61.2 and cell["focal", "all"] == 62.9 and cell["drw", "many"] == 71.0
    assert all(r["std"] == "" and r["checkpoint"] == "last" for r in rows)
    assert len(load_published(path)) == 40  # el-results reads it
    assert {r["task"] for r in L.published_rows(smoke=True)} == {"inat2018_resnet50_smoke"}


@pytest.mark.parametrize("row, loss, log_end, bonus_start, drw, crt_from", [
    ("ce", "ce", None, None, None, None),
    ("el_conservative", "encouraging", 0.75, 0.0, None, None),
    ("el_normal", "encouraging", 1.0, 0.0, None, None),
    ("el_aggressive", "encouraging", 1.0, 0.5, None, None),
    ("crt", "ce", None, None, None, "ce"),
    ("crt_el", "ce", None, None, None, "el_normal"),
    ("drw", "ce", None, None, 12, None),
    ("drw_el", "encouraging", 1.0, 0.0, 12, None),
    ("focal", "focal", None, None, None, None),
    ("halted_focal", "halted_focal", None, None, None, None),
])
def test_each_row_is_its_flags(work, parser, row, loss, log_end, bonus_start, drw, crt_from):
    args = L.run_arguments("longtail_small", row, 2, work=work, parser=parser)
    if crt_from:  # the cRT stage starts from the source row's run; the parser reads that run's checkpoint
        assert value(args, "--crt-from") == str(work / "runs" / f"{crt_from}-seed2")
        k = args.index("--crt-from")
        args = args[:k] + args[k + 2:]
    assert args[:4] == ["--data-dir", str(work / "data"), "--dataset", "torch/fashion_mnist"]
    assert value(args, "--output") == str(work / "runs") and value(args, "--experiment") == f"{row}-seed2"
    assert value(args, "--task-name") == "longtail_fashion_mnist"
    ns = cli(args)
    assert ns.loss == loss and ns.seed == 2 and ns.model == "mnist_cnn" and ns.batch_size == 64
    assert (ns.log_end, ns.bonus_start) == (log_end, bonus_start)
    assert ns.drw_epoch == drw
    assert (ns.long_tail_ratio, ns.long_tail_max) == (100, 1000)
    assert ns.epochs == (4 if crt_from else 16) and ns.lr == 0.1 and ns.sched == "cosine"
    assert ns.model_kwargs == {"stem_width": 16, "widths": (16, 32, 32), "depths": (1, 1, 1), "feature_dim": 64}
    if loss in ("focal", "halted_focal"):
        assert ns.focal_gamma == 2.0 and ns.halt_point == (0.5 if loss == "halted_focal" else None)


def test_flags_after_the_separator_go_to_the_rows_they_apply_to(work, parser):
    extra = ["--bonus-rho", "0.5", "--drw-beta", "0.99", "--focal-gamma", "1", "--halt-point", "0.4", "-j", "3",
             "--lr", "0.2"]

    def ns(row, **kw):
        args = L.run_arguments("longtail_small", row, 1, work=work, parser=parser, extra=extra, **kw)
        if "--crt-from" in args:
            k = args.index("--crt-from")
            args = args[:k] + args[k + 2:]
        return cli(args)

    for row in ALL:
        got = ns(row)
        assert got.workers == 3 and got.lr == 0.2  # everything else: every run of both stages
        assert got.bonus_rho == (0.5 if got.loss == "encouraging" else None), row
        assert got.drw_beta == (0.99 if row.startswith("drw") else None), row
        assert got.focal_gamma == (1.0 if "focal" in row else None), row
        assert got.halt_point == (0.4 if row == "halted_focal" else None), row
    # the recipe's epochs options: the representation and the cRT stage each; DRW keeps its fraction
    assert ns("ce", epochs=20).epochs == 20 and ns("crt", epochs=20, crt_epochs=5).epochs == 5
    assert ns("drw", epochs=20).drw_epoch == 15 and ns("drw", epochs=20, drw_epoch=3).drw_epoch == 3
    # -b per GPU: the preset's global batch divided, unless -b is given
    assert ns("ce", gpus=4).batch_size == 16
    args = L.run_arguments("longtail_small", "ce", 1, work=work, parser=parser, extra=["-b", "32"], gpus=4)
    assert args.count("-b") == 1 and value(args, "-b") == "32"
    # a smoke run: the preset's smoke flags, the cRT smoke epochs, the task marked
    smoke = L.run_arguments("longtail_small", "crt", 1, work=work, parser=parser, smoke=True)
    assert value(smoke, "--epochs") == "1" and value(smoke, "--long-tail-max") == "150"
    assert value(smoke, "--task-name") == "longtail_fashion_mnist_smoke"
    assert value(L.run_arguments("longtail_small", "drw", 1, work=work, smoke=True), "--drw-epoch") == "1"
    mnist = L.run_arguments("longtail_small", "ce", 1, work=work, parser=parser, dataset="torch/mnist")
    assert value(mnist, "--dataset") == "torch/mnist" and value(mnist, "--task-name") == "longtail_mnist"
    resumed = L.run_arguments("longtail_small", "ce", 1, work=work, parser=parser, resume=work / "x.pth.tar")
    assert value(resumed, "--resume") == str(work / "x.pth.tar")


def test_inat2018_is_kang_et_al_s_schedule(tmp_path, parser):
    root = tmp_path / "inat"
    root.mkdir()
    args = L.run_arguments("inat2018", "el_aggressive", 1, work=tmp_path / "w", data=str(root), parser=parser,
                           gpus=8)
    ns = cli(args)
    assert ns.data_dir == str(root) and ns.dataset == "inat2018" and value(args, "--task-name") == "inat2018_resnet50"
    # classifier-balancing's config/iNaturalist18/feat_uniform.yaml and dataloader.py; 200 epochs as the release
    assert (ns.model, ns.opt, ns.lr, ns.momentum, ns.weight_decay, ns.sched, ns.min_lr, ns.epochs) == \
        ("resnet50", "momentum", 0.2, 0.9, 1e-4, "cosine", 0.0, 200)
    assert ns.batch_size == 64 and not ns.pretrained and ns.warmup_epochs == 0 and ns.smoothing == 0
    assert ns.color_jitter == 0 and ns.mean == [0.466, 0.471, 0.380] and ns.std == [0.195, 0.194, 0.192]
    assert ns.crop_pct == 0.875 and (ns.log_end, ns.bonus_start) == (1.0, 0.5)
    assert cli(L.run_arguments("inat2018", "drw", 1, work=tmp_path, data=str(root), parser=parser)).drw_epoch == 180
    crt = L.run_arguments("inat2018", "crt_el", 1, work=tmp_path, data=str(root), parser=parser)
    assert value(crt, "--epochs") == "30" and value(crt, "--lr") == "0.2" and value(crt, "-b") == "512"
    assert value(crt, "--loss") == "ce" and value(crt, "--crt-from") == str(tmp_path / "runs" / "el_normal-seed1")
    # the recipe's preset is a timm_el.recipe preset too: CE and EL runs of the representation
    assert R.PRESETS["inat2018"].global_batch == 512 and R.PRESETS["longtail_small"].dataset == "torch/fashion_mnist"


@pytest.mark.parametrize("kwargs, message", [
    ({"extra": ["--epochs", "3"]}, "-- --epochs: set by the recipe; use the recipe's --epochs / --crt-epochs"),
    ({"extra": ["--loss", "ce"]}, "-- --loss: set by the recipe; use the recipe's --rows"),
    ({"extra": ["--crt-from", "x"]}, "-- --crt-from: set by the recipe; use the recipe's --rows crt,crt_el"),
    ({"extra": ["--drw-epoch", "3"]}, "-- --drw-epoch: set by the recipe; use the recipe's --drw-epoch"),
    ({"extra": ["--nonsense"]}, "-- unknown timm-el-train option --nonsense"),
    ({"dataset": "torch/cifar10"}, "--dataset: 'torch/cifar10' is not one of torch/fashion_mnist, torch/mnist"),
    ({"drw_epoch": 16}, "--drw-epoch 16 must be in [1, 15] with 16 epochs (plain training first, then re-weighted)"),
    ({"epochs": 1}, "--epochs 1: DRW needs at least 2 epochs (plain, then re-weighted)"),
    ({"gpus": 3}, "the paper's batch of 64 does not divide over 3 processes (--gpus x --nodes); set the per-process "
                  "batch with -- -b N"),
])
def test_bad_options_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(L.LongTailError) as err:
        L.run_arguments("longtail_small", "drw", 1, work=tmp_path, **kwargs)
    assert str(err.value) == message


def test_default_drw_epoch():
    small, inat = L.RECIPES["longtail_small"], L.RECIPES["inat2018"]
    assert L.default_drw_epoch(inat) == 180 and L.default_drw_epoch(inat, 90) == 81  # the release's 180 of 200
    assert L.default_drw_epoch(small) == 12 and L.default_drw_epoch(small, 8) == 6
    assert L.default_drw_epoch(small, 2) == 1 and L.default_drw_epoch(small, smoke=True) == 1


def test_plan_runs_adds_the_representations_crt_needs():
    assert L.plan_runs(["crt_el"]) == (["el_normal"], ["crt_el"])
    assert L.plan_runs(["drw", "crt", "ce"]) == (["ce", "drw"], ["crt"])
    assert L.plan_runs(ALL) == ([r for r in ALL if not r.startswith("crt")], ["crt", "crt_el"])
    with pytest.raises(L.LongTailError, match=r"^--rows: unknown value 'cRT' \(ce, el_conservative, "):
        L.plan_runs(["cRT"])
    with pytest.raises(L.LongTailError, match=r"^--rows: 'ce' given twice$"):
        L.plan_runs(["ce", "ce"])


# ----------------------------------------------------------------------------- skip and resume


def run_record_of(row, seed, top1, many, medium, few, task="longtail_fashion_mnist"):
    metrics = {"top1": top1, "top5": 99.0, "many": many, "medium": medium, "few": few}
    return {"schema": "el-result/1", "task": task, "loss": "ce", "seed": seed, "run": f"{row}-seed{seed}",
            "checkpoint": "last", "metrics": {k: v for k, v in metrics.items() if v is not None},
            "info": {"epoch": 7, "shot_groups": {"many_above": 100, "few_below": 20, "many_classes": 5,
                                                 "medium_classes": 3, "few_classes": 2}},
            "curve": "../summary.csv"}


def finish(work, row, seed, **metrics):
    run = work / "runs" / f"{row}-seed{seed}"
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "last.json").write_text(json.dumps(run_record_of(row, seed, **metrics)))
    return run


def test_stage_plan_skips_finished_runs_and_resumes_interrupted_ones(work, capsys):
    finish(work, "ce", 1, top1=70, many=80, medium=60, few=40)
    (work / "runs" / "el_normal-seed1").mkdir()
    (work / "runs" / "el_normal-seed1" / "last.pth.tar").write_bytes(b"x")  # interrupted
    (work / "runs" / "ce-seed2" / "eval").mkdir(parents=True)  # stopped in its first epoch
    (work / "runs" / "ce-seed2" / "eval" / "last.json").write_text('{"schema": "el-res')  # cut off: not finished
    plan = L.stage_plan("train", work, ["crt", "crt_el"], [1, 2])
    assert [(row, seed, state) for row, seed, _, state in plan] == [
        ("el_normal", 1, "resume"), ("ce", 2, "incomplete"), ("el_normal", 2, "new")]
    err = capsys.readouterr().err
    assert "train: also ce, el_normal (the representation of crt, crt_el)" in err
    assert "train ce-seed1: finished" in err
    # cRT: only once its source run is finished
    assert [(r, s, st) for r, s, _, st in L.stage_plan("crt", work, ["crt"], [1])] == [("crt", 1, "new")]
    with pytest.raises(L.LongTailError) as err:
        L.stage_plan("crt", work, ["crt", "crt_el"], [1])
    assert str(err.value) == (f"no finished el_normal run for seed 1 ({work}/runs/el_normal-seed1), the "
                              "representation of crt_el; run the train stage")
    finish(work, "crt", 1, top1=71, many=70, medium=65, few=60)
    assert L.stage_plan("crt", work, ["crt"], [1]) == []


def test_train_checks_every_command_then_runs_them(work, capsys):
    # a dry run prints each command; an unprepared WORK/data and a bad flag are refused before anything runs
    assert L.train("longtail_small", ["ce", "focal"], [3], work=work, dry_run=True, extra=["-j", "0"]) == 0
    err = capsys.readouterr().err
    assert "train ce-seed3 (1/2): " in err and "train focal-seed3 (2/2): " in err
    assert "--loss focal --seed 3" in err and "-j 0" in err and not (work / "runs").exists()
    with pytest.raises(L.LongTailError, match="^timm-el-train: --long-tail-ratio must be a number >= 1"):
        L.train("longtail_small", ["ce"], [3], work=work, dry_run=True, extra=["--long-tail-ratio", "0.5"])
    (work / "data" / "prepared.json").unlink()
    with pytest.raises(L.LongTailError, match=r"data is not prepared \(run the prepare stage\)$"):
        L.train("longtail_small", ["ce"], [3], work=work, dry_run=True)
    # every command is checked (with an empty folder for the data still to be prepared): nothing is created
    L.check("longtail_small", ALL, [1, 2], work=work / "new", data=None, dataset=None, epochs=None,
            crt_epochs=None, drw_epoch=None, gpus=1, smoke=False)
    assert not (work / "new").exists()


# ----------------------------------------------------------------------------- records and tables

#: hand-written accuracies (All, Many, Medium, Few) of seed 1; seed 2 adds 1 point everywhere
MEASURED = {
    "ce": (60.0, 90.0, 50.0, 20.0),
    "el_conservative": (61.0, 90.5, 51.0, 22.0),
    "el_normal": (62.0, 91.0, 52.0, 24.0),
    "el_aggressive": (59.0, 88.0, 49.0, 19.0),
    "crt": (65.0, 85.0, 60.0, 40.0),
    "crt_el": (66.0, 86.0, 61.0, 42.0),
    "drw": (70.0, 80.0, 70.0, 60.0),
    "drw_el": (71.0, 79.0, 71.0, 62.0),
    "focal": (58.0, 89.0, 48.0, 18.0),
    "halted_focal": (60.0, 89.5, 50.0, 20.0),
}


@pytest.fixture
def finished_table(work):
    for seed in (1, 2):
        for row, (a, m, md, f) in MEASURED.items():
            finish(work, row, seed, top1=a + seed - 1, many=m + seed - 1, medium=md + seed - 1, few=f + seed - 1)
    return work


def test_run_record():
    rec = L.run_record(run_record_of("drw", 2, 70.5, 80, 70, None), row="drw", seed=2, source="runs/x.json")
    assert rec["loss"] == "drw" and rec["seed"] == 2 and rec["run"] == "drw-seed2" and rec["checkpoint"] == "last"
    assert rec["metrics"] == {"all": 70.5, "many": 80.0, "medium": 70.0}  # an empty few-shot group: left out
    assert rec["task"] == "longtail_fashion_mnist" and rec["info"]["label"] == "DRW"
    assert rec["info"]["source"] == "runs/x.json" and rec["info"]["shot_groups"]["few_classes"] == 2
    plain = run_record_of("ce", 1, 70, 1, 1, 1)
    plain["metrics"] = {"top1": 70.0, "top5": 90.0}
    with pytest.raises(L.LongTailError, match="^runs/x.json: no shot-group accuracy"):
        L.run_record(plain, row="ce", seed=1, source="runs/x.json")
    bad = run_record_of("ce", 1, 70, 1, float("nan"), 1)
    with pytest.raises(L.LongTailError, match=r"^s: metrics.medium: nan is not a finite number$"):
        L.run_record(bad, row="ce", seed=1, source="s")


def test_direction_verdicts():
    from encouraging_loss.tools.results import describe

    stats = {"ce": {"all": describe([60, 62]), "few": describe([20, 30]), "medium": describe([50])},
             "el_normal": {"all": describe([63, 65]), "few": describe([21, 31]), "medium": describe([49])},
             "crt": {"medium": describe([51]), "all": describe([55, 57])}}
    d = L.direction(stats, "el_normal", "ce", "all")
    assert d["delta"] == 3 and d["paper"] == 1.5 and d["verdict"] == "agrees"
    assert math.isclose(d["se"], math.sqrt(2 / 2 + 2 / 2))
    assert L.direction(stats, "el_normal", "ce", "few")["verdict"] == "noise"  # +1 within sqrt(50/2 + 50/2)
    assert L.direction(stats, "el_normal", "ce", "medium")["verdict"] == "opposite"  # one seed: by sign
    assert L.direction(stats, "crt", "ce", "all")["verdict"] == "opposite"  # -6 against the paper's +0.6
    assert L.direction(stats, "crt", "ce", "medium")["verdict"] == "paper flat"  # 65.9 and 65.9
    assert L.direction(stats, "crt", "ce", "few") is None


def test_results_from_finished_runs(finished_table, capsys):
    work = finished_table
    paths, written = L.results("longtail_small", work, ALL, [1, 2])
    assert written
    records = [json.loads(p.read_text()) for p in sorted((work / "results" / "records").rglob("*.json"))]
    assert len(records) == 20 and {r["task"] for r in records} == {"longtail_fashion_mnist"}
    drw2 = json.loads((work / "results" / "records" / "seed2" / "drw.json").read_text())
    assert drw2["metrics"] == {"all": 71.0, "many": 81.0, "medium": 71.0, "few": 61.0} and drw2["loss"] == "drw"
    # el-results: baseline ce, treatment el_normal
    summary = paths["summary.md"].read_text()
    assert "## longtail_fashion_mnist, checkpoint last" in summary
    assert "| ce | 2 | 60.50 +- 0.71 | 90.50 +- 0.71 | 50.50 +- 0.71 | 20.50 +- 0.71 |" in summary
    assert "| EL_NORMAL - CE |  | +2.00 | +1.00 | +2.00 | +4.00 |" in summary
    assert "(published)" not in summary  # the paper's numbers are iNaturalist's, another task
    md = paths["longtail.md"].read_text()
    assert md.startswith("# Imbalanced classification: Fashion-MNIST at ratio 100")
    assert ("| `drw_el` | DRW + normal bonus | 71.50 ± 0.71 | 79.50 ± 0.71 | 71.50 ± 0.71 | 62.50 ± 0.71 | 70.3 | "
            "69.0 | 70.1 | 70.9 |") in md
    assert "Classes per shot group (the training set's): many 5, medium 3, few 2 (many > 100, few < 20" in md
    table = md.split("## Direction")[1]
    # + normal bonus vs CE: +2 / +1 / +2 / +4 with a standard error of 0.71: all agree with the paper's direction
    assert ("| + normal bonus vs CE | +2.00 (+1.5) agrees | +1.00 (+0.3) agrees | +2.00 (+0.7) agrees | "
            "+4.00 (+2.6) agrees |") in table
    # + aggressive bonus went the other way here; cRT's Many fell as the paper's did; cRT medium: the paper is flat
    assert "| + aggressive bonus vs CE | -1.00 (+2.0) opposite |" in table
    assert "| cRT vs CE | +5.00 (+0.6) agrees | -5.00 (-2.7) agrees | +10.00 (+0.0) paper flat |" in table
    assert "| DRW + normal bonus vs DRW | +1.00 (+2.2) agrees | -1.00 (-2.0) agrees |" in table
    assert "| halted focal loss vs focal loss | +2.00 (+0.7) agrees |" in table
    # by hand: every difference is +-1 std error of 0.71 from its pair; Many of + conservative bonus and of halted
    # focal (+0.5) is noise, the four of the aggressive bonus opposite, cRT's Medium against the paper's 0.0 flat
    assert "Verdicts: agrees 29, noise 2, opposite 4, paper flat 1." in md
    image = imread(paths["longtail.png"])
    assert image.shape[0] > 400 and image.std() > 0.05
    # up to date: skipped; a changed run: written again
    assert L.results("longtail_small", work, ALL, [1, 2]) == (paths, False)
    assert "results: up to date" in capsys.readouterr().err
    finish(work, "ce", 2, top1=10, many=10, medium=10, few=10)
    _, written = L.results("longtail_small", work, ALL, [1, 2])
    assert written and "| ce | 2 | 35.00 +- 35.36 |" in paths["summary.md"].read_text()


def test_results_of_the_papers_recipe_show_the_published_numbers(tmp_path):
    work = tmp_path / "w"
    for row in ("ce", "el_normal"):
        run = work / "runs" / f"{row}-seed1" / "eval"
        run.mkdir(parents=True)
        record = run_record_of(row, 1, 60, 70, 60, 50, task="inat2018_resnet50")
        (run / "last.json").write_text(json.dumps(record))
    paths, _ = L.results("inat2018", work, ["ce", "el_normal"], [1], plots=False)
    summary = paths["summary.md"].read_text()
    assert "| el_normal (published) |  | 65.80 +- - | 74.40 +- - | 66.60 +- - | 62.40 +- - |" in summary
    assert "| EL_NORMAL - CE (published) |  | +1.50 | +0.30 | +0.70 | +2.60 |" in summary
    md = paths["longtail.md"].read_text()
    assert "| row | method | All | Many | Medium | Few | paper All |" in md and "iNat 2018" not in md
    assert "longtail.png" not in paths


def test_results_errors(finished_table):
    work = finished_table
    os.remove(work / "runs" / "crt_el-seed2" / "eval" / "last.json")
    with pytest.raises(L.LongTailError) as err:
        L.results("longtail_small", work, ALL, [1, 2])
    assert str(err.value) == (f"no finished crt_el run for seed 2 ({work}/runs/crt_el-seed2/eval/last.json was not "
                              "written); run the crt stage")
    finish(work, "focal", 1, top1=60, many=60, medium=60, few=60)
    record = json.loads((work / "runs" / "focal-seed1" / "eval" / "last.json").read_text())
    record["task"] = "longtail_mnist"
    (work / "runs" / "focal-seed1" / "eval" / "last.json").write_text(json.dumps(record))
    with pytest.raises(L.LongTailError, match=r"^the runs belong to different tasks \(longtail_fashion_mnist, "
                                              r"longtail_mnist\)"):
        L.results("longtail_small", work, ["ce", "focal"], [1])


# ----------------------------------------------------------------------------- data


def write_inat(root, counts=(9, 7, 5, 3, 2, 1, 4, 1, 1, 2, 3, 1), val=2):
    """A small iNaturalist 2018 root in the official format: category ids 100.. (in reverse file order),
    ``counts[k]`` training and ``val`` validation images of category 100 + k, 8x8 PNGs."""
    from PIL import Image

    docs = {}
    for split in ("train", "val"):
        images, annotations = [], []
        for k in reversed(range(len(counts))):
            for i in range(counts[k] if split == "train" else val):
                name = f"train_val2018/Plantae/{100 + k}/{split}{i}.png"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (k * 20, i * 20, 0)).save(root / name)
                images.append({"id": len(images) + (0 if split == "train" else 1000), "file_name": name})
                annotations.append({"id": len(annotations), "image_id": images[-1]["id"], "category_id": 100 + k})
        docs[split] = {"images": images, "annotations": annotations,
                       "categories": [{"id": 100 + k, "name": f"species {k}"} for k in range(len(counts))]}
        (root / f"{split}2018.json").write_text(json.dumps(docs[split]))
    return root


def test_slice_inat_is_read_by_the_inat2018_loader(tmp_path):
    from timm_el.longtail import dataset_labels, inat2018_dataset

    root = write_inat(tmp_path / "inat")
    out = tmp_path / "w" / "data"
    record = L.slice_inat(root, out, classes=4, train_per_class=3, val_per_class=1)
    assert record["counts"] == {"train": 3 + 3 + 3 + 3, "val": 4} and record["classes"] == 4
    assert (out / "train_val2018").is_symlink()
    doc = json.loads((out / "train2018.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["species 0", "species 1", "species 2", "species 3"]
    train = inat2018_dataset(str(out), "train")
    labels = dataset_labels(train)
    assert sorted(labels.tolist()) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert len(inat2018_dataset(str(out), "val", train=train)) == 4
    # the prepare stage: a smoke run slices (SMOKE_DATA), keeps a slice made the same way, refuses another
    work = tmp_path / "w2"
    done = L.prepare("inat2018", work, str(root), smoke=True)
    assert done["classes"] == 10 and done["counts"]["val"] == 20
    assert L.prepare("inat2018", work, str(root), smoke=True) == json.loads((work / "data" / "prepared.json")
                                                                             .read_text())
    assert L.prepare("inat2018", tmp_path / "w3", str(root)) is None  # the real run reads the root in place


@pytest.mark.parametrize("recipe, data, smoke, message", [
    ("inat2018", None, False, "--data: the iNaturalist 2018 root is required (train2018.json, val2018.json and the "
                              "image folders they name)"),
    ("inat2018", "empty", False, "--data '{empty}': no train2018.json (an iNaturalist 2018 root holds "
                                 "train2018.json and val2018.json)"),
    ("inat2018", "empty", True, "--data '{empty}': no train2018.json (an iNaturalist 2018 root holds "
                                "train2018.json and val2018.json)"),
    ("longtail_small", "missing", False, "--data: directory not found: '{missing}'"),
])
def test_prepare_errors(tmp_path, recipe, data, smoke, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing")}
    with pytest.raises(L.LongTailError) as err:
        L.prepare(recipe, tmp_path / "w", paths.get(data), smoke=smoke)
    assert str(err.value) == message.format(**paths)


def test_prepare_refuses_other_limits(tmp_path):
    data = tmp_path / "w" / "data"
    data.mkdir(parents=True)
    (data / "prepared.json").write_text(json.dumps({"data": "/x", "train_limit": 2000, "test_limit": 200}))
    with pytest.raises(L.LongTailError, match=r"was prepared from /x with other limits .*use another --work or "
                                              r"delete it$"):
        L.prepare("longtail_small", tmp_path / "w")


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    (["check", "longtail_small", "--rows", "ce,foo"], "--rows: unknown value 'foo' (ce, el_conservative, el_normal, "
     "el_aggressive, crt, crt_el, drw, drw_el, focal, halted_focal)"),
    (["check", "longtail_small", "--seeds", "1,1"], "--seeds: 1 given twice"),
    (["results", "longtail_small", "--seeds", "x"], "argument --seeds: 'x' is not a non-negative integer"),
    (["check", "longtail_small", "--epochs", "0"], "argument --epochs: '0' is not an integer >= 1"),
    (["check", "longtail_small", "--", "--resume", "x"], "-- --resume: set by the recipe"),
    (["results", "longtail_small", "--", "-j", "0"], "flags after -- go to the check, train and crt commands only, "
                                                     "got '-j 0'"),
])
def test_main_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        L.main([argv[0], argv[1], "--work", str(tmp_path / "w"), *argv[2:]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"error: {message}"), err
    assert not (tmp_path / "w").exists()


def test_the_scripts_name_their_error_lines(tmp_path, capsys):
    with pytest.raises(SystemExit):
        L.main(["--prog", "longtail_small.sh", "results", "longtail_small", "--work", str(tmp_path), "--rows", "x"])
    assert capsys.readouterr().err.startswith("longtail_small.sh: error: --rows: unknown value 'x' (ce, ")
