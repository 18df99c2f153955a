"""scripts/longtail_small.sh and scripts/inat2018.sh (issue 20, point 4): the small long-tailed recipe end to end on a
slice, the iNaturalist recipe's smoke slice, and their option errors.

The smoke run of longtail_small.sh (the preset's smoke flags: 2 epochs on the first 2,000 training and 200 test
images of ../shared/data's Fashion-MNIST at --long-tail-ratio 100 --long-tail-max 150, cRT 1 epoch) with the rows
ce, el_normal and crt_el (cRT from el_normal's run), seed 1. Checked: each run's flags (args.yaml), the long-tailed
subset and its shot groups in the run records, the el-result records, el-results' summary, longtail.md in the
full shape of the paper's table (all ten rows, the rows not run as dashes, the paper's numbers beside) and its
direction table, the PNG; a second run skips every stage without training anything. A stage that is killed says
which, and that running the command again resumes. Every bad option is one line, exit status 2, and creates
nothing.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT

pytest.importorskip("timm")

SCRIPTS = {name: ROOT / "scripts" / f"{name}.sh" for name in ("longtail_small", "inat2018")}
SLICE = ["--smoke", "--rows", "ce,el_normal,crt_el", "--", "-j", "0"]


def env(**extra):
    # one thread: the tiny runs gain nothing from two, and two threads lose ten times over on a busy machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def script(name, *args, check=True, timeout=600, **extra):
    proc = subprocess.run(["bash", str(SCRIPTS[name]), *map(str, args)], capture_output=True, text=True,
                          env=env(**extra), timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("name, args, message", [
    ("longtail_small", ["--stages", "train,plot"], "--stages: unknown stage 'plot' (prepare, train, crt, results)"),
    ("longtail_small", ["--epochs", "0"], "--epochs: '0' is not an integer >= 1"),
    ("longtail_small", ["--drw-epoch", "x"], "--drw-epoch: 'x' is not an integer >= 1"),
    ("longtail_small", ["--data", "/no/such/folder"], "--data: directory not found: '/no/such/folder'"),
    ("longtail_small", ["--seeds"], "--seeds needs a value"),
    ("longtail_small", ["--lr", "3"], "unknown option --lr (see --help)"),
    ("inat2018", ["--dataset", "torch/mnist"], "unknown option --dataset (see --help)"),
    # checked by python -m timm_el.longtail_recipe check (its own checks, then timm-el-train's parser's on every
    # run's command) before anything is created; the other messages: tests/timm_el/test_longtail_recipe.py
    ("longtail_small", ["--rows", "ce,cRT"], "--rows: unknown value 'cRT' (ce, el_conservative, el_normal, "
                                             "el_aggressive, crt, crt_el, drw, drw_el, focal, halted_focal)"),
    ("longtail_small", ["--", "--long-tail-ratio", "0.5"], "timm-el-train: --long-tail-ratio must be a number >= 1 "
                                                           "(n_max / n_min), got 0.5"),
])
def test_bad_options_are_one_line(tmp_path, name, args, message):
    work = tmp_path / "work"
    if name == "inat2018" and "--data" not in args:
        (tmp_path / "inat").mkdir()
        args = ["--data", tmp_path / "inat", *args]
    proc = script(name, "--work", work, *args, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"{name}.sh: error: {message}"]
    assert not work.exists()


def test_help_names_the_defaults_rows_and_costs():
    small = script("longtail_small", "--help", timeout=60).stdout
    for needle in ("--seeds LIST        [1,2,3; 1 with --smoke]", "--work DIR          [runs/longtail_small;",
                   "--epochs N          representation epochs [16; 2 with --smoke]",
                   "--crt-epochs N      cRT epochs [4; 1 with --smoke]", "--drw-epoch E", "[12, the last quarter;",
                   "1000, 599, 359, 215, 129 | 77, 46, 28 | 17, 10", "el_aggressive", "--bonus-start 0.5",
                   "halted_focal", "longtail.md", "Cost (measured: 2 CPU cores", "the three seeds about 35 minutes",
                   "A GPU is not needed", "OMP_NUM_THREADS=1"):
        assert needle in small, needle
    inat = script("inat2018", "--help", timeout=60).stdout
    for needle in ("--seeds LIST        [1; 1 with --smoke]", "SGD lr 0.2 momentum 0.9", "batch 512", "200 epochs",
                   "cls_crt.yaml: 30 epochs", "[180, the EL release's;", "Cost (a GPU job", "A100-days",
                   "DIR/train2018.json"):
        assert needle in inat, needle


def test_a_killed_stage_says_which_and_that_rerunning_resumes(tmp_path):
    # a "python" that is killed at once: the check dies of SIGKILL before anything; with --stages results the
    # results stage's does, and its line names it
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nkill -KILL $$\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    proc = script("longtail_small", "--work", work, "--stages", "results", check=False, timeout=60,
                  PYTHON=str(fake))
    assert proc.returncode == 137
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"longtail_small.sh: error: stage results ({work}/results) failed with exit status 137: "
                           "killed by signal 9 (SIGKILL); running the same command again writes them again: bash ")
    assert line.endswith("--work " + str(work) + " --stages results"), line


def test_inat2018_smoke_slices_the_root(tmp_path):
    # an iNaturalist 2018 root in the official format: 12 categories, 1..12 training and 3 validation images each
    root = tmp_path / "inat"
    for split in ("train", "val"):
        images, annotations = [], []
        for c in range(12):
            for i in range(c + 1 if split == "train" else 3):
                name = f"train_val2018/Aves/{c}/{split}{i}.jpg"
                images.append({"id": len(images), "file_name": name})
                annotations.append({"id": len(annotations), "image_id": len(images) - 1, "category_id": c})
        root.mkdir(exist_ok=True)
        (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                            "categories": [{"id": c} for c in range(12)]}))
    (root / "train_val2018").mkdir()
    work = tmp_path / "work"
    proc = script("inat2018", "--data", root, "--work", work, "--smoke", "--stages", "prepare", timeout=120)
    # the smoke slice: the first 10 classes, up to 6 training images (1+2+3+4+5+6+6+6+6+6) and 2 validation images
    assert "10 classes, 45 training and 20 validation images" in proc.stderr
    doc = json.loads((work / "data" / "train2018.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(10)) and (work / "data" / "train_val2018").is_symlink()
    # a root without the annotation files is refused in one line (and the stage named)
    proc = script("inat2018", "--data", root / "train_val2018", "--work", work, "--stages", "prepare", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-2] == (f"inat2018.sh: error: --data '{root}/train_val2018': no "
                                                    "train2018.json (an iNaturalist 2018 root holds train2018.json "
                                                    "and val2018.json)")


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("longtail") / "work"
    start = time.monotonic()
    first = script("longtail_small", "--work", work, "--data", shared_data, *SLICE)
    first_s = time.monotonic() - start
    start = time.monotonic()
    second = script("longtail_small", "--work", work, "--data", shared_data, *SLICE)
    return work, first, second, first_s, time.monotonic() - start


def test_smoke_run_end_to_end(smoke_run):
    import yaml
    from matplotlib.image import imread

    work, first, _, _, _ = smoke_run
    runs = {}
    for row in ("ce", "el_normal", "crt_el"):
        run = work / "runs" / f"{row}-seed1"
        cfg = yaml.safe_load((run / "args.yaml").read_text())
        runs[row] = json.loads((run / "eval" / "last.json").read_text())
        assert cfg["model"] == "mnist_cnn" and cfg["dataset"] == "torch/fashion_mnist"
        assert (cfg["long_tail_ratio"], cfg["long_tail_max"]) == (100, 150)
        assert cfg["epochs"] == (1 if row == "crt_el" else 2), row
        assert cfg["loss"] == ("encouraging" if row == "el_normal" else "ce"), row
        assert cfg["drw_epoch"] is None and cfg["log_end"] == (1.0 if row == "el_normal" else None), row
        assert runs[row]["task"] == "longtail_fashion_mnist_smoke"
        # the slice at ratio 100 from 150: 150 ... 2 images a class: one many-shot, three medium, six few
        assert runs[row]["info"]["shot_groups"] == {"many_above": 100, "few_below": 20, "many_classes": 1,
                                                    "medium_classes": 3, "few_classes": 6}
    cfg = yaml.safe_load((work / "runs" / "crt_el-seed1" / "args.yaml").read_text())
    assert cfg["crt_from"].startswith(str(work / "runs" / "el_normal-seed1"))
    assert not (work / "runs" / "crt-seed1").exists() and not (work / "runs" / "focal-seed1").exists()
    # records: one per row asked for, metrics all / many / medium / few from the run's record
    records = {p.stem: json.loads(p.read_text()) for p in (work / "results" / "records" / "seed1").glob("*.json")}
    assert sorted(records) == ["ce", "crt_el", "el_normal"]
    for row, rec in records.items():
        assert rec["loss"] == row and rec["checkpoint"] == "last" and rec["task"] == "longtail_fashion_mnist_smoke"
        assert rec["metrics"] == {"all": runs[row]["metrics"]["top1"], "many": runs[row]["metrics"]["many"],
                                  "medium": runs[row]["metrics"]["medium"], "few": runs[row]["metrics"]["few"]}
    summary = (work / "results" / "summary.md").read_text()
    assert "## longtail_fashion_mnist_smoke, checkpoint last" in summary and "| crt_el | 1 |" in summary
    # longtail.md: the paper's table in full (ten rows), measured where run, the paper's iNaturalist numbers beside
    md = (work / "results" / "longtail.md").read_text()
    assert md.startswith("# Imbalanced classification: Fashion-MNIST at ratio 100")
    assert "(smoke run: not a result)" in md.splitlines()[0]
    rows = [line for line in md.split("## Direction")[0].splitlines() if line.startswith("| `")]
    assert [r.split(" | ")[0] for r in rows] == [f"| `{r}`" for r in ("ce", "el_conservative", "el_normal",
                                                                       "el_aggressive", "crt", "crt_el", "drw",
                                                                       "drw_el", "focal", "halted_focal")]
    assert rows[1].endswith("| – | – | – | – | 65.3 | 74.3 | 66.6 | 61.2 |")
    assert f"| `ce` | CE | {records['ce']['metrics']['all']:.2f} |" in rows[0]
    assert "| + normal bonus vs CE |" in md and "many 1, medium 3, few 6" in md
    image = imread(work / "results" / "longtail.png")
    assert image.shape[0] > 400 and image.std() > 0.05
    assert "== train el_normal-seed1 (2/2): " in first.stderr and "== crt crt_el-seed1 (1/1): " in first.stderr


def test_second_run_skips_everything(smoke_run):
    work, _, second, first_s, second_s = smoke_run
    err = second.stderr
    assert "prepared already" in err
    for row in ("ce", "el_normal"):
        assert f"train {row}-seed1: finished" in err
    assert "crt crt_el-seed1: finished" in err and "results: up to date" in err
    assert "-m timm_el.train" not in err and "wrote" not in err
    assert second_s < first_s, (first_s, second_s)  # no training (its commands' python startups remain)
