"""``python -m fairseq_el.train``: the recipes' training step (issues 7 and 18).

Commands built from the paper's presets (log interval, mid-epoch saves), flags
replaced by extra ones, and real runs with stock fairseq-train on an IWSLT14
slice: one whose fairseq-train is killed mid-way (the runner's progress lines,
its failure line, the full output in train.log), resumes from its checkpoint,
averages the same epoch checkpoints despite the mid-epoch saves, is skipped
once finished and refuses to be mixed with another configuration; one with
--verbose; one that fails on a bad flag.
"""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq_el import train as recipe
from fairseq_el.average_checkpoints import find_checkpoints

from helpers import descendant, error_lines

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


@pytest.mark.parametrize("preset", sorted(recipe.PRESETS))
def test_log_interval_and_mid_epoch_saves_per_preset(preset, fake_bin, tmp_path):
    def flags(**kw):
        return dict(recipe._groups(recipe.build_command(preset, fake_bin, tmp_path / "run", "el", 1, **kw)[2:]))

    gpu, cpu = flags(cuda=True), flags(cuda=False)
    # a progress line per --log-interval updates: the GPU's 100, fewer on the CPU (about a line a minute)
    assert gpu["--log-interval"] == ["100"]
    assert cpu["--log-interval"] == [str({"iwslt14_de_en": 1, "iwslt17_fr_en": 2, "multi30k_de_en": 2}[preset])]
    saves = {"iwslt14_de_en": "200", "iwslt17_fr_en": "1000", "multi30k_de_en": None}[preset]
    for got in (gpu, cpu):
        if saves is None:  # Multi30k: epochs of about 70 updates, seconds on a GPU
            assert "--save-interval-updates" not in got and "--keep-interval-updates" not in got
        else:
            assert got["--save-interval-updates"] == [saves] and got["--keep-interval-updates"] == ["2"]
        # the epoch checkpoints that averaging takes stay as they were
        assert got.get("--keep-last-epochs") == (["10"] if preset != "multi30k_de_en" else None)
        assert ("--no-epoch-checkpoints" in got) == (preset == "multi30k_de_en")
    smoke = flags(cuda=False, smoke=True)
    assert smoke["--log-interval"] == ["25"] and "--save-interval-updates" not in smoke
    mine = flags(cuda=True, extra=["--save-interval-updates", "0", "--log-interval", "7"])
    assert mine["--save-interval-updates"] == ["0"] and mine["--log-interval"] == ["7"]


def test_logging_and_saving_flags_do_not_make_another_run(tmp_path):
    """A run started with another --log-interval or mid-epoch saving (an older version of the runner, a
    flag after --) is the same run: skipped when finished, resumed otherwise; other flags are refused."""
    run = tmp_path / "run"
    base = ["/bin/true", "data", "--lr", "1e-3", "--log-interval", "100"]
    lines = []
    assert recipe.train(base, run, log=lines.append) == 0
    assert recipe.train(base[:-1] + ["1", "--save-interval-updates", "200", "--keep-interval-updates", "2"], run,
                        log=lines.append) == 0
    assert "skipping" in lines[-1]
    with pytest.raises(recipe.RunError, match=r"other settings \(--lr: 1e-3 before, 5e-4 now\)"):
        recipe.train(["/bin/true", "data", "--lr", "5e-4", "--log-interval", "1"], run, log=lines.append)


def test_fairseq_train_warnings_that_are_noise_are_ignored_others_kept():
    env = recipe._child_env({"PATH": os.environ.get("PATH", ""), "PYTHONWARNINGS": "error"})
    assert env["PYTHONWARNINGS"].startswith("error,") and env["PYTHONUNBUFFERED"] == "1"
    code = ("import warnings; warnings.warn('`torch.jit.script` is deprecated. Please switch', FutureWarning); "
            "warnings.warn('`torch.cuda.amp.autocast(args...)` is deprecated. Please use', FutureWarning); "
            "print('quiet'); warnings.warn('something else is deprecated', FutureWarning)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "quiet" in proc.stdout and proc.returncode == 1  # the caller's "error" still holds for the others
    assert "FutureWarning: something else is deprecated" in proc.stderr and "torch" not in proc.stderr


def test_progress_lines_from_simple_format_and_eta_against_either_limit():
    """A fairseq train_inner line in --log-format simple (``epoch 002:      5 / 19 loss=...``, what a user's
    ``-- --log-format simple`` gives): the ETA counts to --max-update, or to --max-epoch x the updates per
    epoch (here 24 updates at 1 + 5/19 epochs), whichever comes first."""
    line = ("2026-12-06 21:02:08 | INFO | train_inner | epoch 002:      5 / 19 loss=9.2, nll_loss=8.9, ppl=478.1, "
            "wps=7603, ups=2.5, wpb=955, bsz=48, num_updates=24, lr=0.0005, gnorm=0.656, train_wall=5, wall=7\n")
    for flags, total, eta in ((["--max-update", "100"], 100, "30s"), (["--max-epoch", "3"], 57, "13s"),
                              (["--max-update", "40", "--max-epoch=3"], 40, "6s")):
        out = []
        recipe.Console("r", flags, out.append).feed(line)
        assert out == [f"[train] r: update 24/{total} ({round(2400 / total)}%), epoch 2, loss 9.200 (nll 8.900), "
                       f"2.50 updates/s, ETA {eta}"], flags
    out = []
    recipe.Console("r", [], out.append).feed(line)  # no limit: no ETA
    assert out == ["[train] r: update 24, epoch 2, loss 9.200 (nll 8.900), 2.50 updates/s"]
    stream = io.StringIO()
    recipe.Console("r", [], out.append, verbose=True, stream=stream).feed(line)  # --verbose: the line as it is
    assert stream.getvalue() == line and len(out) == 1


def test_duration():
    assert [recipe._duration(s) for s in (0.4, 59, 61, 3599, 3600, 8220, 49 * 3600 + 60)] == \
        ["0s", "59s", "1m", "59m", "1h00m", "2h17m", "2d01h"]


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


PROGRESS = re.compile(r"^\[train\] el-seed1: update (?P<done>\d+)/(?P<total>\d+) \(\d+%\), epoch (?P<epoch>\d+), "
                      r"loss \d+\.\d{3} \(nll \d+\.\d{3}\), \d+\.\d\d updates/s, ETA \d+(?:s|m|h\d\dm)$")


def test_killed_run_resumes_and_finished_run_is_skipped(sample_bin, tmp_path):
    """fairseq-train killed with SIGKILL under the runner: the runner's console shows progress lines and a
    failure line (status 137, where to resume), train.log the whole output; the same command resumes; the
    mid-epoch saves (every 3 updates, 2 kept) leave the epoch checkpoints that averaging takes unchanged."""
    run = tmp_path / "el-seed1"
    args = ["--preset", "iwslt14_de_en", "--data", sample_bin, "--save-dir", run, "--loss", "el", "--seed", "1",
            "--", *TINY, "--max-update", "0", "--max-epoch", "6", "--save-interval-updates", "3",
            "--keep-interval-updates", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "fairseq_el.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        child = descendant(proc.pid, "fairseq-train", deadline)
        while not (run / "checkpoint2.pt").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        os.kill(child, signal.SIGKILL)  # fairseq-train only, mid-training: the runner reports it
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 137, out[-3000:]  # 128 + SIGKILL, as a shell reports a killed command
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "running"
    assert not (run / "checkpoint6.pt").exists()
    lines = out.splitlines()
    # the console: the runner's own lines only; fairseq's whole output is in train.log
    assert all(line.startswith("[train] ") for line in lines), out[-3000:]
    log = (run / "train.log").read_text()
    for text in ("| INFO | fairseq_cli.train |", "TransformerModel(", "| train_inner | {", "| valid | {"):
        assert text in log and text not in out, text
    per_epoch = int(re.search(r"^\[train\] el-seed1: training: [\d,]+ parameters, (\d+) updates per epoch, "
                              r"a progress line every 5 updates$", out, re.M).group(1))
    progress = [m for m in map(PROGRESS.match, lines) if m]
    assert progress and int(progress[0]["done"]) == 5, out  # at the first --log-interval
    assert all(int(m["total"]) == 6 * per_epoch for m in progress)  # the ETA counts to --max-epoch 6
    assert [int(m["done"]) for m in progress] == list(range(5, 5 * len(progress) + 1, 5))
    saves = [line for line in lines if re.match(r"^\[train\] el-seed1: epoch \d @ \d+ updates: valid loss [\d.]+, "
                                                 r"nll_loss [\d.]+, ppl [\d.]+; saved checkpoint\S*\.pt$", line)]
    assert any("saved checkpoint1.pt" in line for line in saves) and any("saved checkpoint_1_3.pt" in line
                                                                           for line in saves), out
    last_save = re.search(r"epoch (\d) @ (\d+) updates: .*saved (\S+)$", saves[-1])
    assert re.fullmatch(
        rf"\[train\] {re.escape(str(run))}: fairseq-train was killed by signal 9 \(SIGKILL\) at update \d+, "
        rf"after \d+s; its output: {re.escape(str(run / 'train.log'))}; run the same command again to resume from "
        rf"{re.escape(str(run / 'checkpoint_last.pt'))} \(the last save seen: {re.escape(last_save[3])} "
        rf"\(epoch {last_save[1]} @ {last_save[2]} updates\)\)", lines[-1]), lines[-1]

    again = _cli(*args, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    # fairseq names the epoch it goes on with: the next one after an end-of-epoch checkpoint
    assert re.search(rf"^\[train\] el-seed1: loaded checkpoint_last\.pt \(epoch \d @ {last_save[2]} updates\)$",
                     again.stderr, re.M), again.stderr
    assert re.search(rf"^\[train\] {re.escape(str(run))}: finished \(\d+[smh]\S*, {6 * per_epoch} updates\)$",
                     again.stderr, re.M), again.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch [1-3] @ [1-9]\d* updates\)", log), log[-3000:]
    assert (run / "checkpoint6.pt").exists() and (run / "checkpoint_best.pt").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    epochs = [json.loads(line.split("| valid | ", 1)[1])["epoch"] for line in log.splitlines() if "| valid | " in line]
    assert sorted(set(epochs)) == [1, 2, 3, 4, 5, 6]

    # mid-epoch saves: the last 2 kept, beside every epoch checkpoint; averaging takes the same epochs as without
    interval = sorted(p.name for p in run.glob("checkpoint_*_*.pt"))
    assert len(interval) == 2 and all(re.fullmatch(r"checkpoint_[56]_\d+\.pt", n) for n in interval), interval
    assert {p.name for p in run.glob("checkpoint[0-9]*.pt")} == {f"checkpoint{e}.pt" for e in range(1, 7)}
    assert find_checkpoints(run, 2) == [str(run / "checkpoint5.pt"), str(run / "checkpoint6.pt")]
    avg = subprocess.run([sys.executable, "-m", "fairseq_el.average_checkpoints", "--run-dir", str(run), "--last",
                          "2", "--epochs", "--output", str(tmp_path / "avg.pt")], capture_output=True, text=True,
                         env=env, timeout=300)  # the recipe's call
    assert avg.returncode == 0, avg.stderr
    from fairseq_el.compat import read_checkpoint

    averaged = read_checkpoint(tmp_path / "avg.pt")["model"]
    inputs = [read_checkpoint(run / f"checkpoint{e}.pt")["model"] for e in (5, 6)]
    for key, value in averaged.items():
        mean = (inputs[0][key].double() + inputs[1][key].double()) / 2
        torch.testing.assert_close(value.double(), mean.to(value.dtype).double(), msg=key)

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


@pytest.mark.parametrize("preset", sorted(recipe.PRESETS))
def test_smoke_flags_replace_the_presets_and_extra_flags_win(preset, fake_bin, tmp_path):
    assert set(recipe.SMOKE) == set(recipe.PRESETS)
    real = recipe.build_command(preset, fake_bin, tmp_path / "run", "el", 1, cuda=False)
    smoke = recipe.build_command(preset, fake_bin, tmp_path / "run", "el", 1, cuda=False, smoke=True)
    groups = recipe._groups(smoke[2:])
    flags = dict(groups)
    assert len(flags) == len(groups)  # every flag once
    # the small model, a short warmup and an epoch budget on the smoke data
    for flag, value in {"--encoder-layers": ["2"], "--decoder-embed-dim": ["128"], "--warmup-updates": ["100"],
                        "--max-update": ["0"], "--max-tokens": ["1024"], "--update-freq": ["1"]}.items():
        assert flags[flag] == value, flag
    assert int(flags["--max-epoch"][0]) >= 2  # the averaging stage needs 2 epoch checkpoints
    assert flags["--warmup-updates"] != dict(recipe._groups(real[2:]))["--warmup-updates"]
    # the rest is the preset's: architecture, criterion, loss, optimizer
    assert flags["--arch"] == dict(recipe._groups(real[2:]))["--arch"] and flags["--optimizer"] == ["adam"]
    assert flags["--criterion"] == ["encouraging_label_smoothed_cross_entropy"] and "--cpu" in flags
    assert ("--share-all-embeddings" in flags) == ("--share-all-embeddings" in real)
    # flags after -- still win over the smoke ones
    extra = recipe.build_command(preset, fake_bin, tmp_path / "run", "el", 1, cuda=False, smoke=True,
                                 extra=["--max-epoch", "1", "--lr", "1e-4"])
    got = dict(recipe._groups(extra[2:]))
    assert got["--max-epoch"] == ["1"] and got["--lr"] == ["1e-4"] and got["--warmup-updates"] == ["100"]
    # several GPUs: the smoke keeps its own --update-freq 1
    gpus = dict(recipe._groups(recipe.build_command(preset, fake_bin, tmp_path, "el", 1, gpus=2, cuda=True,
                                                    smoke=True)[2:]))
    assert gpus["--update-freq"] == ["1"] and gpus["--distributed-world-size"] == ["2"] and "--fp16" in gpus


def _prepared(tmp_path, smoke):
    data = tmp_path / ("smoke" if smoke else "real")
    (data / "bin").mkdir(parents=True)
    (data / "bin" / "dict.de.txt").write_text("")
    task = "multi30k_de_en" + ("_smoke" if smoke else "")
    (data / "prep.json").write_text(json.dumps({"task": task, "bin": "bin", "smoke": smoke}))
    return data


def test_smoke_runs_train_on_smoke_data_only(tmp_path):
    real, smoke = _prepared(tmp_path, False), _prepared(tmp_path, True)
    base = ["--preset", "multi30k_de_en", "--save-dir", tmp_path / "r", "--loss", "el", "--dry-run"]
    for data, flag, message in [
        (real, ["--smoke"], f"--data {real} was prepared without --smoke; --smoke needs data prepared with --smoke"),
        (smoke, [], f"--data {smoke} was prepared with --smoke; so train with --smoke too"),
    ]:
        proc = _cli(*base, "--data", data, *flag)
        errors = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
    ok = _cli(*base, "--data", smoke, "--smoke")
    assert ok.returncode == 0, ok.stderr
    assert "--warmup-updates 100" in ok.stdout and f"{smoke / 'bin'} " in ok.stdout
    assert _cli(*base, "--data", real).returncode == 0


def test_verbose_shows_fairseq_train_output(sample_bin, tmp_path):
    """--verbose: fairseq-train's output on the console as before (and in train.log), without the torch
    FutureWarnings that fairseq's own code triggers (the caller's warning settings otherwise kept)."""
    run = tmp_path / "ce-seed1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    proc = _cli("--preset", "iwslt14_de_en", "--data", sample_bin, "--save-dir", run, "--loss", "ce", "--verbose",
                "--", *TINY, "--max-update", "6", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    for text in ("| INFO | fairseq_cli.train |", "TransformerModel(", '| train_inner | {"epoch": 1'):
        assert text in proc.stderr and text in log, text
    assert "[train] ce-seed1: update" not in proc.stderr  # no progress lines of the runner's own
    assert "fairseq-train" in proc.stderr.splitlines()[0]  # the command, as before
    assert "UserWarning" in log  # other warnings are kept
    assert "FutureWarning" not in log and "FutureWarning" not in proc.stderr


def test_failing_fairseq_train_shows_why(sample_bin, tmp_path):
    """A fairseq-train that stops with an error: the end of its output on the console, then the failure line."""
    run = tmp_path / "el-seed1"
    proc = _cli("--preset", "iwslt14_de_en", "--data", sample_bin, "--save-dir", run, "--loss", "el", "--",
                *TINY, "--arch", "no_such_arch", env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith("  | ") and "no_such_arch" in line for line in lines), proc.stderr
    assert re.fullmatch(rf"\[train\] {re.escape(str(run))}: fairseq-train exited with status 2, after \d+s; its "
                        rf"output: {re.escape(str(run / 'train.log'))}; no checkpoint was saved yet, so the same "
                        "command again starts this run over", lines[-1]), lines[-1]
    assert json.loads((run / "run.json").read_text())["status"] == "running"
