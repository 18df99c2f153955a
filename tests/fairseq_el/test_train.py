"""``python -m fairseq_el.train``: the recipes' training step (issue 7).

Commands built from the paper's presets, flags replaced by extra ones, and a
real run with stock fairseq-train on an IWSLT14 slice that is killed mid-way,
resumes from its checkpoint, is skipped once finished and refuses to be
mixed with another configuration.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairseq_el import train as recipe

from helpers import error_lines

TINY = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--max-tokens", "1500", "--update-freq", "1", "--warmup-updates", "10", "--lr", "3e-3",
    "--num-workers", "0", "--log-interval", "5",
]


def test_merge_flags_replaces_by_name_and_keeps_values():
    base = ["--arch", "a", "--adam-betas", "(0.9, 0.98)", "--fp16", "--max-update", "100"]
    merged = recipe.merge_flags(base, ["--max-update=5", "--cpu", "--lr", "-1e-3"])
    assert merged == ["--arch", "a", "--adam-betas", "(0.9, 0.98)", "--fp16", "--max-update", "5", "--cpu",
                      "--lr", "-1e-3"]
    with pytest.raises(recipe.RunError, match="must start with a --flag, got 'oops'"):
        recipe.merge_flags(base, ["oops"])


@pytest.fixture
def fake_bin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "dict.de.txt").write_text("")
    return d


@pytest.mark.parametrize("preset", sorted(recipe.PRESETS))
def test_presets_are_the_papers_flags(preset, fake_bin, tmp_path):
    cmd = recipe.build_command(preset, fake_bin, tmp_path / "run", "el", 3, cuda=True)
    assert Path(cmd[0]).name == "fairseq-train" and cmd[1] == str(fake_bin)
    flags = dict(recipe._groups(cmd[2:]))
    assert flags["--criterion"] == ["encouraging_label_smoothed_cross_entropy"] and flags["--log-end"] == ["0.5"]
    assert flags["--seed"] == ["3"] and "--fp16" in flags and flags["--distributed-world-size"] == ["1"]
    assert flags["--label-smoothing"] == ["0.1"] and flags["--log-format"] == ["json"]
    expected = {
        "iwslt14_de_en": {"--lr": ["1e-3"], "--dropout": ["0.4"], "--max-update": ["20000"], "--update-freq": ["4"],
                          "--weight-decay": ["0.0001"], "--warmup-updates": ["4000"]},
        "iwslt17_fr_en": {"--lr": ["0.0005"], "--dropout": ["0.3"], "--max-update": ["100000"],
                          "--encoder-layers": ["2"], "--weight-decay": ["0.001"], "--share-all-embeddings": []},
        "multi30k_de_en": {"--lr": ["1e-3"], "--max-update": ["2400"], "--encoder-embed-dim": ["256"],
                           "--max-tokens": ["8192"], "--warmup-updates": ["500"]},
    }[preset]
    for flag, value in expected.items():
        assert flags[flag] == value, flag
    ce = dict(recipe._groups(recipe.build_command(preset, fake_bin, tmp_path / "run", "ce", 1, cuda=False)[2:]))
    assert ce["--criterion"] == ["label_smoothed_cross_entropy"] and "--log-end" not in ce
    assert "--cpu" in ce and "--fp16" not in ce


def test_several_gpus_and_machines(fake_bin, tmp_path):
    command = recipe.build_command("iwslt14_de_en", fake_bin, tmp_path, "el", 1, gpus=2, cuda=True)
    two = dict(recipe._groups(command[2:]))
    assert two["--distributed-world-size"] == ["2"] and two["--update-freq"] == ["2"]  # 4 x 4096 tokens kept
    cmd = recipe.build_command("iwslt14_de_en", fake_bin, tmp_path, "el", 1, gpus=4, nodes=2, node_rank=1,
                               master_addr="10.0.0.1", cuda=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    i = cmd.index("fairseq_cli.train")
    launcher = dict(recipe._groups(cmd[3:i - 1]))
    assert launcher["--nnodes"] == ["2"] and launcher["--nproc-per-node"] == ["4"]
    assert launcher["--node-rank"] == ["1"] and launcher["--master-addr"] == ["10.0.0.1"]
    flags = dict(recipe._groups(cmd[i + 2:]))
    assert flags["--distributed-world-size"] == ["8"] and flags["--update-freq"] == ["1"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fairseq_el.train", *map(str, args)], capture_output=True,
                          text=True, **kw)


def test_cli_errors_are_one_line(fake_bin, tmp_path):
    cases = [
        (["--preset", "iwslt14_de_en", "--data", tmp_path / "nope", "--save-dir", tmp_path / "r", "--loss", "el"],
         f"--data {tmp_path / 'nope'}: no such directory"),
        (["--preset", "iwslt14_de_en", "--data", tmp_path, "--save-dir", tmp_path / "r", "--loss", "el"],
         "neither a prepared directory"),
        (["--preset", "iwslt14_de_en", "--data", fake_bin, "--save-dir", tmp_path / "r", "--loss", "ce",
          "--log-end", "0.5"], "--log-end applies to --loss el, got --loss ce"),
        (["--preset", "iwslt14_de_en", "--data", fake_bin, "--save-dir", tmp_path / "r", "--loss", "el",
          "--log-end", "2"], "--log-end must be in (0, 1], got 2.0"),
        (["--preset", "wmt", "--data", fake_bin, "--save-dir", tmp_path / "r", "--loss", "el"],
         "argument --preset: invalid choice: 'wmt'"),
    ]
    for args, message in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert message in lines[-1] and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def sample_bin(iwslt14_slice):
    return iwslt14_slice(400, 40, 20) / "bin"


def test_killed_run_resumes_and_finished_run_is_skipped(sample_bin, tmp_path):
    run = tmp_path / "el-seed1"
    args = ["--preset", "iwslt14_de_en", "--data", sample_bin, "--save-dir", run, "--loss", "el", "--seed", "1",
            "--", *TINY, "--max-update", "0", "--max-epoch", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "fairseq_el.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoint2.pt").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and fairseq-train, mid-training
    proc.wait()
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "running"
    assert not (run / "checkpoint6.pt").exists()

    again = _cli(*args, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    log = (run / "train.log").read_text()
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch [1-3] @ [1-9]\d* updates\)", log), log[-3000:]
    assert (run / "checkpoint6.pt").exists() and (run / "checkpoint_best.pt").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    epochs = [json.loads(line.split("| valid | ", 1)[1])["epoch"] for line in log.splitlines() if "| valid | " in line]
    assert sorted(set(epochs)) == [1, 2, 3, 4, 5, 6]

    mtime = (run / "checkpoint_last.pt").stat().st_mtime
    skipped = _cli(*args, env=env, timeout=120)
    assert skipped.returncode == 0 and "skipping" in skipped.stderr
    assert (run / "checkpoint_last.pt").stat().st_mtime == mtime

    other = _cli(*[a if a != "3e-3" else "1e-3" for a in map(str, args)], env=env, timeout=120)
    assert other.returncode == 2
    assert "holds a run with other settings (--lr: 3e-3 before, 1e-3 now)" in other.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("text,needle", [
    ('{"args": ["a", "b"], "status": "runn', "not valid JSON"),
    ("[1, 2]", "holds a JSON array, expected an object"),
    ('{"args": 5, "status": "finished"}', "its 'args' is not a list of strings"),
])
def test_damaged_run_json_is_one_line(text, needle, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(text)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "dict.de.txt").write_text("")
    rc = recipe.main(["--preset", "iwslt14_de_en", "--data", str(fake_bin), "--save-dir", str(run),
                      "--loss", "el"])
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert f"run record {run / 'run.json'}: {needle}" in errors[0] and "--force" in errors[0], errors
    assert (run / "run.json").read_text() == text  # left as it was
    # --force starts a new, valid record (a command that does nothing stands in for fairseq-train)
    assert recipe.train(["/bin/true"], run, force=True, log=lambda m: None) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
