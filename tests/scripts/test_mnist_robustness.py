"""scripts/mnist_robustness.sh (issue 19, point 3): the MNIST robustness recipe end to end on a slice, and its
option errors.

The smoke run (1 epoch of TorchAttacks' CNN, the preset's smoke flags) on the first 300 training and 50 test images
of ../shared/data's MNIST, columns clean and fgsm (FGSM adversarial training), CE and EL, seed 1; the attacks on 12
test images, APGD-DLR on 4 (a smoke run leaves AutoAttack out: SMOKE_SKIPS). Checked: every run (the fgsm column's
with --adv-train fgsm), one el-analyze report per column with every attack of the column, the el-result records
(tasks ..._smoke, an acc@<eps> per eps of the paper's grids), el-results' summary beside the paper's numbers,
robustness.md with the rows of Table 7 and the other attacks and the sample counts, PNGs that decode; a second run
skips every stage without training or attacking anything. A stage that is killed says which, and that running the
command again resumes. Every bad option is one line, exit status 2, and creates nothing.
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
pytest.importorskip("torchattacks")

SCRIPT = ROOT / "scripts" / "mnist_robustness.sh"
SLICE = ["--smoke", "--columns", "clean,fgsm", "--train-limit", "300", "--test-limit", "50", "--max-samples", "12",
         "--aa-max-samples", "4", "--device", "cpu", "--", "-j", "0"]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def script(*args, check=True, timeout=600, **extra):
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env(**extra),
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("args, message", [
    (["--columns", "clean,pgd_linf"], "--columns: unknown column 'pgd_linf' (clean, fgsm, pgd, pgd_l2)"),
    (["--columns", "fgsm,fgsm"], "--columns: 'fgsm' given twice"),
    (["--seeds", "1,two"], "--seeds: 'two' is not a non-negative integer"),
    (["--losses", "ce,focal"], "--losses: unknown loss 'focal' (ce, el)"),
    (["--stages", "train,plot"], "--stages: unknown stage 'plot' (prepare, train, attack, results)"),
    (["--log-end", "high"], "--log-end: 'high' is not a number"),
    (["--losses", "ce", "--log-end", "0.5"], "--log-end applies to the el runs, but --losses is 'ce'"),
    (["--max-samples", "0"], "--max-samples: '0' is not an integer >= 1"),
    (["--aa-max-samples", "many"], "--aa-max-samples: 'many' is not an integer >= 1"),
    (["--train-limit", "-5"], "--train-limit: '-5' is not an integer >= 1"),
    (["--data", "/no/such/folder"], "--data: directory not found: '/no/such/folder'"),
    (["--seeds"], "--seeds needs a value"),
    (["--epochs", "3"], "unknown option --epochs (see --help)"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    work = tmp_path / "work"
    proc = script("--work", work, *args, check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mnist_robustness.sh: error: {message}"]
    assert not work.exists()


def test_help_names_the_defaults_and_costs():
    proc = script("--help", timeout=60)
    text = proc.stdout
    for needle in ("--columns LIST      comma-separated: clean, fgsm, pgd, pgd_l2 [clean,fgsm,pgd,pgd_l2]",
                   "--seeds LIST        [1,2,3; 1 with --smoke]", "--aa-max-samples N", "[1000;",
                   "--work DIR          [runs/mnist_robustness;", "Costs", "about a second per still robust image",
                   "--smoke   leaves AutoAttack out",
                   "-- --adv-train <column>", "robustness.md", "Table 7"):
        assert needle in text, needle


def test_a_killed_stage_says_which_and_that_rerunning_resumes(tmp_path):
    # a "python" that is killed at once: the train stage's process dies of SIGKILL
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nkill -KILL $$\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    proc = script("--work", work, "--stages", "train", "--columns", "pgd", check=False, timeout=60, PYTHON=str(fake))
    assert proc.returncode == 137
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mnist_robustness.sh: error: stage train ({work}/<column>/runs) failed with exit status "
                           "137: killed by signal 9 (SIGKILL); running the same command again skips the finished "
                           "runs and resumes an interrupted one from its last.pth.tar: bash ")
    assert line.endswith("--work " + str(work) + " --stages train --columns pgd"), line


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("robustness") / "work"
    start = time.monotonic()
    first = script("--work", work, "--data", shared_data, *SLICE)
    first_s = time.monotonic() - start
    start = time.monotonic()
    second = script("--work", work, "--data", shared_data, *SLICE)
    return work, first, second, first_s, time.monotonic() - start


def test_smoke_run_end_to_end(smoke_run):
    import yaml
    from matplotlib.image import imread

    work, first, _, _, _ = smoke_run
    # training: both columns, both losses; the fgsm column adversarially
    for column in ("clean", "fgsm"):
        for loss in ("ce", "el"):
            run = work / column / "runs" / f"{loss}-seed1"
            assert (run / "last.pth.tar").is_file() and (run / "eval" / "last.json").is_file(), column
            cfg = yaml.safe_load((run / "args.yaml").read_text())
            assert cfg["model"] == "mnist_ta_cnn" and cfg["epochs"] == 1 and cfg["opt"] == "adam"
            assert cfg.get("adv_train") == (None if column == "clean" else "fgsm"), cfg.get("adv_train")
    # attacks: one report per column and seed, CE and EL side by side, every attack of the column
    for column, attacks in (("clean", {"fgsm", "pgd", "pgd_l2", "apgd_dlr", "apgd_dlr_l2"}),
                            ("fgsm", {"fgsm", "apgd_dlr"})):
        report = json.loads((work / column / "attacks" / "seed1" / "report.json").read_text())
        assert list(report["models"]) == ["CE", "EL"]
        for model in report["models"].values():
            assert set(model["attacks"]) == attacks
            for name, entry in model["attacks"].items():
                assert len(entry["eps"]) == len(entry["accuracy"]) == 7
                assert entry["samples"] == (4 if name.startswith(("apgd", "autoattack")) else 12), (name, entry)
                assert all(0 <= a <= 100 for a in entry["accuracy"])
    # records: one per run and attack
    records = [json.loads(p.read_text()) for p in sorted((work / "results" / "records").rglob("*.json"))]
    assert len(records) == 2 * (5 + 2)
    assert {r["task"] for r in records} == {"mnist_robustness_clean_smoke", "mnist_robustness_fgsm_smoke"}
    auto = next(r for r in records if r["checkpoint"] == "apgd_dlr_l2" and r["loss"] == "el")
    assert list(auto["metrics"]) == ["acc@0", "acc@0.3", "acc@1", "acc@3", "acc@10", "acc@30", "acc@100",
                                     "zero_grad_fraction"]
    assert auto["info"]["samples"] == 4 and auto["info"]["subset"] is True and auto["run"] == "el-seed1"
    # el-results beside the paper's numbers
    summary = (work / "results" / "summary.md").read_text()
    assert "## mnist_robustness_clean_smoke, checkpoint autoattack" not in summary  # no AutoAttack in smoke
    section = summary.split("## mnist_robustness_fgsm_smoke, checkpoint fgsm\n")[1].split("## ")[0]
    assert "| el (published) |  | 97.21 +- - | 95.81 +- - |" in section
    # robustness.md: Table 7 with a row per eps and the sample counts; Table 11 (AutoAttack) is left out
    md = (work / "results" / "robustness.md").read_text()
    assert md.startswith("# MNIST adversarial robustness (smoke run: not a result)")
    assert "## Table 11" not in md
    other = md.split("## clean training: the other attacks (no published numbers)\n")[1].split("## ")[0]
    rows = [line for line in other.splitlines() if line.startswith("| ") and "eps |" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 0 (none)", "| 0.05", "| 0.1", "| 0.15", "| 0.2", "| 0.25",
                                                 "| 0.3"]
    assert "APGD-DLR, APGD-DLR-L2: 4 test images (a fixed seeded subset)" in other
    t7 = md.split("## Table 7: ")[1].split("## ")[0]
    assert "| Linf eps | FGSM CE | FGSM EL | paper CE | paper EL |" in t7 and "| 0.3 |" in t7
    assert "FGSM: 12 test images" in t7
    assert "## Gradient masking indicator" in md and "| fgsm |" in md
    for column in ("clean", "fgsm"):
        image = imread(work / "results" / f"robustness_{column}.png")
        assert image.shape[0] > 300 and image.std() > 0.05
    assert "== results -> " in first.stderr


def test_second_run_skips_everything(smoke_run):
    work, first, second, first_s, second_s = smoke_run
    err = second.stderr
    assert "prepared already" in err
    for column in ("clean", "fgsm"):
        for loss in ("ce", "el"):
            assert f"train {column} {loss}-seed1: finished" in err
        assert f"attack {column} seed 1: done" in err
    assert "results: up to date" in err
    assert "-m timm_el.train" not in err and "timm_el.analyze" not in err and "wrote" not in err
    assert second_s < first_s / 2, (first_s, second_s)
