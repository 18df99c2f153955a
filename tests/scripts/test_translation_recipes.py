"""The translation recipes end to end (issue 7): the shell scripts, every stage.

Real data from ../shared/data on CPU with a tiny Transformer: IWSLT14 De-En
(1,200 pairs of the train sample, slices of valid/test, two losses x two seeds),
IWSLT17 Fr-En (sentencepiece path, two of the training talks' files) and
Multi30k De-En (two losses, one seed each). Checked: binarized data, checkpoints and logs per run, the averaged
checkpoint is the mean of its inputs and decodes, both BLEU figures, the
results table (both losses, mean +- std) and its PNGs, and that a second run
of the recipe skips every finished stage.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_TRANSFORMER, descendant, iwslt14_prep

TINY = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--max-tokens", "4000", "--update-freq", "1", "--warmup-updates", "20", "--lr", "5e-3",
    "--num-workers", "0", "--log-interval", "10", "--max-update", "0", "--max-epoch", "3",
]
# decoding an untrained model: keep hypotheses short
EVAL = "--batch-size 64 -- --max-len-b 30"


def recipe(script, work, *args, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), "--work", str(work), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def load(path):
    from fairseq_el import compat

    return compat.read_checkpoint(path)  # weights_only=True with fairseq's checkpoint types allowed


def check_results(work, task, losses, seeds, tag):
    records = sorted((work / "runs").glob(f"*/eval/{tag}.json"))
    assert len(records) == len(losses) * len(seeds)
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["schema"] == "el-result/1" and rec["task"] == task and rec["checkpoint"] == tag
        assert rec["loss"] in losses and rec["seed"] in seeds
        bleu, sacre = rec["metrics"]["bleu"], rec["metrics"]["sacrebleu"]
        assert isinstance(bleu, float) and isinstance(sacre, float) and 0.0 <= bleu <= 100 and 0.0 <= sacre <= 100
        assert rec["info"]["sacrebleu_signature"].startswith("nrefs:1|")
        assert (path.parent / rec["curve"]).resolve() == (path.parent.parent / "curve.csv").resolve()
    summary = (work / "results" / "summary.md").read_text()
    assert f"## {task}, checkpoint {tag}" in summary
    for loss in losses:
        n = len(seeds)
        row = next(line for line in summary.splitlines() if line.startswith(f"| {loss} | {n} |"))
        assert ("+-" in row) if n > 1 else True
    assert "| EL - CE |" in summary
    import matplotlib.image as mpimg

    pngs = sorted((work / "results").glob("*.png"))
    names = {p.name for p in pngs}
    assert f"{task}__{tag}__bleu.png" in names and f"{task}__curve__valid_nll_loss.png" in names, names
    for png in pngs:
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def check_average(run, last):
    avg = load(run / f"avg_last{last}.pt")
    epochs = sorted(int(p.stem[len("checkpoint"):]) for p in run.glob("checkpoint[0-9]*.pt"))[-last:]
    inputs = [load(run / f"checkpoint{e}.pt")["model"] for e in epochs]
    assert avg["model"].keys() == inputs[0].keys()
    for key, value in avg["model"].items():
        mean = sum(m[key].double() for m in inputs) / len(inputs)
        torch.testing.assert_close(value.double(), mean.to(value.dtype).double(), msg=key)
    assert not avg.get("last_optimizer_state")


@pytest.fixture(scope="module")
def iwslt14(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("iwslt14")
    # 1,200 pairs: 17 updates an epoch at --max-tokens 4000 (the console test wants update 10 in epoch 1)
    prep = (f"--tokenized {shared_data / 'iwslt14-de-en'} --bpe-merges 1000 --train-lines 1200 --valid-lines 100 "
            "--test-lines 60")
    args = ["--losses", "ce el", "--seeds", "1 2", "--avg-last", "2", "--prep-args", prep, "--eval-args", EVAL,
            "--", *TINY]
    first = recipe("iwslt14_de_en.sh", work, *args)
    return work, args, first


def test_iwslt14_recipe_end_to_end(iwslt14):
    work, _, _ = iwslt14
    meta = json.loads((work / "prep" / "prep.json").read_text())
    assert meta["counts"] == {"train": 1200, "valid": 100, "test": 60} and meta["bpe"] == "subword_nmt"
    prep_bin = work / "prep" / "bin"
    assert (prep_bin / "train.de-en.de.bin").is_file() and (prep_bin / "dict.en.txt").is_file()
    for loss in ("ce", "el"):
        for seed in (1, 2):
            run = work / "runs" / f"{loss}-seed{seed}"
            assert json.loads((run / "run.json").read_text())["status"] == "finished"
            assert (run / "checkpoint_best.pt").is_file() and (run / "checkpoint3.pt").is_file()
            log = (run / "train.log").read_text()
            criterion = "encouraging_label_smoothed_cross_entropy" if loss == "el" else "'label_smoothed_cross_entropy'"
            assert criterion in log
            curve = (run / "curve.csv").read_text().splitlines()
            assert curve[0].startswith("epoch") and "valid_nll_loss" in curve[0] and len(curve) == 4
            check_average(run, 2)
            hyp = json.loads((run / "eval" / "avg_last2.json").read_text())["info"]["n_sentences"]
            assert hyp == 60
    check_results(work, "iwslt14_de_en", ("ce", "el"), (1, 2), "avg_last2")
    check_results(work, "iwslt14_de_en", ("ce", "el"), (1, 2), "best")


def test_iwslt14_recipe_console_is_concise(iwslt14):
    """The console: each stage's outcome and the runner's progress lines; fairseq-train's output only in
    train.log (issue 18)."""
    work, _, first = iwslt14
    err = first.stderr
    for loss in ("ce", "el"):
        for seed in (1, 2):
            run = work / "runs" / f"{loss}-seed{seed}"
            assert f"[train] {run}: finished (" in err
            assert re.search(rf"^\[train\] {loss}-seed{seed}: update 10/\d+ \(\d+%\), epoch 1, loss ", err, re.M)
            assert f"[train] {loss}-seed{seed}: epoch 3 @ " in err and "saved checkpoint3.pt" in err
            log = (run / "train.log").read_text()
            assert "| train_inner |" in log and "TransformerModel(" in log
    assert "| train_inner |" not in err and "TransformerModel(" not in err and "| fairseq_cli.train |" not in err
    assert "FutureWarning" not in err
    out = first.stdout + err  # the averaging and evaluation print their outcome on stdout
    assert out.count("averaged 2 checkpoints") == 4
    assert len(re.findall(r"^(?:ce|el)-seed[12] (?:best|avg_last2) on .*: BLEU \d", out, re.M)) == 8  # 4 runs x 2


def test_killed_training_step_names_the_stage_and_the_same_command_resumes(iwslt14_slice, tmp_path):
    """fairseq-train killed with SIGKILL inside the recipe: the recipe stops with status 137 and a last line
    naming the stage (train, loss, seed, run directory), the signal and the command that resumes; that
    command, run again, resumes from checkpoint_last.pt and finishes (issue 18)."""
    work = tmp_path / "work"
    # the slice tests/fairseq_el/test_train.py trains on (built once per session), with the prep.json of a prep
    shutil.copytree(iwslt14_slice(400, 40, 20), work / "prep")
    (work / "prep" / "prep.json").write_text(json.dumps(iwslt14_prep(train=400, valid=40, test=20)))
    run = work / "runs" / "el-seed1"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "scripts" / "iwslt14_de_en.sh"), "--work", str(work), "--stages", "train",
           "--losses", "el", "--seeds", "1", "--", *TINY_TRANSFORMER, "--max-tokens", "1500", "--update-freq", "1",
           "--warmup-updates", "10", "--lr", "3e-3", "--num-workers", "0", "--log-interval", "5",
           "--max-update", "0", "--max-epoch", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        child = descendant(proc.pid, "fairseq-train", deadline)
        while not (run / "checkpoint1.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint1.pt"
            time.sleep(0.2)
        os.kill(child, signal.SIGKILL)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 137, err[-3000:]
    lines = err.strip().splitlines()
    assert "fairseq-train was killed by signal 9 (SIGKILL)" in lines[-2]
    head = (f"iwslt14_de_en.sh: error: stage train (loss el, seed 1, run {run}) failed with exit status 137: "
            f"killed by signal 9 (SIGKILL); running the same command again resumes this run from "
            f"{run / 'checkpoint_last.pt'} and skips finished work: ")
    assert lines[-1].startswith(head), lines[-1]
    again = shlex.split(lines[-1][len(head):])
    assert again == cmd
    assert re.search(r"^\[train\] el-seed1: update 5/\d+ ", err, re.M) and "| INFO |" not in err

    proc = subprocess.run(again, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = re.search(r"^\[train\] el-seed1: loaded checkpoint_last\.pt \(epoch \d @ (\d+) updates\)$", proc.stderr,
                       re.M)
    assert loaded and int(loaded[1]) > 0, proc.stderr[-3000:]  # at least checkpoint1.pt's updates
    assert (run / "checkpoint3.pt").is_file() and json.loads((run / "run.json").read_text())["status"] == "finished"


def test_a_failing_stage_is_named(tmp_path):
    """Any stage: a failure stops the recipe with its status and a line naming it (here the averaging of a run
    that has no checkpoints)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "iwslt14_de_en.sh"), "--work", str(tmp_path),
                           "--stages", "average", "--losses", "ce", "--seeds", "3", "--avg-last", "2"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "error:" in lines[-2], proc.stderr
    assert lines[-1].startswith(f"iwslt14_de_en.sh: error: stage average (loss ce, seed 3, run "
                                f"{tmp_path / 'runs' / 'ce-seed3'}) failed with exit status 2; once the cause above "
                                "is fixed, running the same command again redoes this stage"), lines[-1]


def test_iwslt14_recipe_rerun_skips_finished_stages(iwslt14):
    work, args, _ = iwslt14
    run = work / "runs" / "el-seed1"
    stamps = {p: p.stat().st_mtime
              for p in (run / "checkpoint_last.pt", run / "avg_last2.pt", run / "eval" / "best.json")}
    again = recipe("iwslt14_de_en.sh", work, *args)
    assert "skipping" in again.stderr
    assert again.stderr.count("finished on") == 4  # every training run
    assert {p: p.stat().st_mtime for p in stamps} == stamps


def test_iwslt17_fr_en_sentencepiece_recipe(shared_data, tmp_path):
    d = shared_data / "iwslt17-fr-en"
    train = "iwslt16.tst2011,iwslt16.tst2013"  # two of the five talks' files (818 + 1,026 pairs)
    prep = f"--raw {d} --train {train} --valid valid --test test --vocab-size 1000 --valid-lines 150 --test-lines 50"
    recipe("iwslt17_fr_en.sh", tmp_path, "--losses", "ce,el", "--seeds", "1", "--avg-last", "2",
           "--prep-args", prep, "--eval-args", EVAL, "--", *TINY)
    meta = json.loads((tmp_path / "prep" / "prep.json").read_text())
    assert meta["bpe"] == "sentencepiece" and meta["remove_bpe"] == "sentencepiece" and not meta["lowercase"]
    prep_bin = tmp_path / "prep" / "bin"
    assert (prep_bin / "dict.fr.txt").read_text() == (prep_bin / "dict.en.txt").read_text()
    check_average(tmp_path / "runs" / "el-seed1", 2)
    check_results(tmp_path, "iwslt17_fr_en", ("ce", "el"), (1,), "avg_last2")
    hyps = (tmp_path / "runs" / "el-seed1" / "eval").glob("*")
    assert any("▁" not in p.read_text(errors="ignore") for p in hyps if p.suffix != ".json")


def test_multi30k_recipe(shared_data, tmp_path):
    prep = (f"--raw {shared_data / 'multi30k-de-en'} --train-lines 1000 --valid-lines 150 --test-lines 50 "
            "--vocab-size 1000")
    recipe("multi30k_de_en.sh", tmp_path, "--seeds", "1", "--prep-args", prep, "--eval-args", EVAL, "--", *TINY)
    check_results(tmp_path, "multi30k_de_en", ("ce", "el"), (1,), "last")
    assert not list((tmp_path / "runs" / "el-seed1").glob("avg_last*.pt"))


def test_recipe_refuses_bad_options(tmp_path):
    for args, message in [
        (["--stages", "prep,tune"], "--stages: unknown stage 'tune'"),
        (["--losses", "focal"], "--losses: unknown loss 'focal'"),
        (["--seeds", "1 x"], "--seeds: 'x' is not a non-negative integer"),
        (["--losses", "ce", "--log-end", "0.5"], "--log-end applies to the el runs"),
        (["--bogus"], "unknown option --bogus"),
    ]:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "iwslt14_de_en.sh"), "--work", str(tmp_path), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, task, seeds", [("multi30k_de_en.sh", "multi30k_de_en", "1 2 3"),
                                                 ("iwslt14_de_en.sh", "iwslt14_de_en", "1 2 3 4 5"),
                                                 ("iwslt17_fr_en.sh", "iwslt17_fr_en", None)])
def test_smoke_defaults(tmp_path, script, task, seeds):
    """--smoke: its own work directory, one seed, at most 2 checkpoints averaged; documented in --help."""
    env = dict(os.environ, PYTHON=sys.executable)

    def run(*args):
        return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=tmp_path, capture_output=True,
                              text=True, env=env)

    proc = run("--smoke", "--stages", "average")
    assert f"== {task} (smoke run: not a result): work directory runs/{task}-smoke," in proc.stderr, proc.stderr
    assert "seeds 1\n" in proc.stderr
    avg = "average the last 2 epoch checkpoints" if task != "multi30k_de_en" else None
    assert (avg in proc.stderr) if avg else ("average" not in proc.stderr.split("\n", 1)[1])
    assert not (tmp_path / "runs" / task).exists()
    if seeds:  # explicit options win
        again = run("--smoke", "--stages", "results", "--seeds", seeds, "--work", "w")
        assert f"work directory w, stages  results , losses ce el, seeds {seeds}\n" in again.stderr, again.stderr
    usage = run("--help").stdout
    assert "--smoke" in usage and f"{task}_smoke" in usage
    assert f"[runs/{task}; runs/{task}-smoke with --smoke]" in usage


def test_multi30k_smoke_pipeline_is_marked_smoke(shared_data, tmp_path):
    """--smoke end to end on a slice (the full smoke, about 5 CPU-minutes and BLEU well above 0, is measured by
    hand): the smoke data, model and generation cap are used, and the data, records and table say smoke; a
    real run on the smoke work directory is refused."""
    prep = f"--raw {shared_data / 'multi30k-de-en'} --train-lines 400 --valid-lines 50 --test-lines 30"
    proc = recipe("multi30k_de_en.sh", tmp_path, "--smoke", "--prep-args", prep, "--eval-args", "--batch-size 64")
    assert "(smoke run: not a result)" in proc.stderr
    meta = json.loads((tmp_path / "prep" / "prep.json").read_text())
    assert meta["task"] == "multi30k_de_en_smoke" and meta["smoke"] is True
    assert meta["counts"] == {"train": 400, "valid": 50, "test": 30} and meta["args"]["vocab_size"] == 2000
    for loss in ("ce", "el"):
        run = tmp_path / "runs" / f"{loss}-seed1"
        args = json.loads((run / "run.json").read_text())["args"]
        flags = dict(zip(args, args[1:]))
        assert flags["--encoder-embed-dim"] == "128" and flags["--warmup-updates"] == "100"
        assert flags["--max-tokens"] == "1024" and flags["--max-epoch"] == "2"
        rec = json.loads((run / "eval" / "last.json").read_text())
        assert rec["task"] == "multi30k_de_en_smoke" and rec["info"]["n_sentences"] == 30
        assert "--max-len-a 1.2 --max-len-b 10" in " ".join(map(str, rec["info"]["generate_cmd"]))
    assert not (tmp_path / "runs" / "ce-seed2").exists()
    check_results(tmp_path, "multi30k_de_en_smoke", ("ce", "el"), (1,), "last")
    assert "## multi30k_de_en, " not in (tmp_path / "results" / "summary.md").read_text()
    # the smoke's directory cannot be continued as a real run
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    real = subprocess.run(["bash", str(ROOT / "scripts" / "multi30k_de_en.sh"), "--work", str(tmp_path),
                           "--stages", "train", "--losses", "ce", "--seeds", "2"], capture_output=True, text=True,
                          env=env)
    assert real.returncode != 0 and "was prepared with --smoke; so train with --smoke too" in real.stderr
    assert not (tmp_path / "runs" / "ce-seed2").exists()
