"""python -m pyg_el.train on the small TU dataset conftest.py writes: the per-run seeded splits, early stopping
that keeps the best-valid model, EL at bonus_rho 0 training as cross-entropy, resuming a killed run, growing
--runs, refusing changed settings, the records el-results reads, and one-line errors for bad flags.

Every run is tiny (16 channels, batches of 16 graphs of 60, patience 3) and trained once per module."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch_geometric")

import torch  # noqa: E402

from encouraging_loss.tools.results.records import collect  # noqa: E402
from encouraging_loss.tools.results.tables import summarize  # noqa: E402
from pyg_el.data import load_tu, split_indices  # noqa: E402
from pyg_el.models import SAGPoolNet  # noqa: E402

from helpers import command_env  # noqa: E402

PROG = "python -m pyg_el.train"
PATIENCE, MAX_EPOCHS, SEED = 3, 15, 5
#: 60 graphs -> 48 / 6 / 6; lr 0.03: both runs of seed 5 stop on patience (run 0 at epoch 8, run 1 at 7)
TINY = ["--dataset", "TOY", "--no-download", "--hidden", "16", "--batch-size", "16", "--lr", "0.03",
        "--patience", str(PATIENCE), "--max-epochs", str(MAX_EPOCHS), "--threads", "1", "--seed", str(SEED)]
CURVE_VALUES = ("epoch", "train_loss", "valid_loss", "valid_acc", "bonus_rho")  # all but the seconds


def curve(run_dir: Path) -> list:
    with open(run_dir / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def one_error_line(status, stderr, *words):
    """The command failed with exit status 2 and one line ``python -m pyg_el.train: error: ...`` holding
    ``words``; returns the line."""
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def toy(shared_root):
    return load_tu("TOY", shared_root, download=False)


@pytest.fixture(scope="module")
def ce_out(train_main, shared_root, tmp_path_factory):
    """Two CE runs of TINY trained by two commands: ``--runs 1``, then ``--runs 2`` (only run 1 trains):
    ``(out, stdout of the first, stdout of the second)``."""
    out = tmp_path_factory.mktemp("ce") / "TOY-ce"
    first = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "1")
    assert first[0] == 0, first[2]
    second = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "2")
    assert second[0] == 0, second[2]
    return out, first[1], second[1]


@pytest.fixture(scope="module")
def pair(train_main, shared_root, tmp_path_factory):
    """CE and EL with --bonus-rho 0, two runs each, every node kept by the pooling (--pooling-ratio 1): a dict
    loss -> out folder."""
    outs = {}
    for loss, extra in (("ce", []), ("el", ["--bonus-rho", "0"])):
        outs[loss] = tmp_path_factory.mktemp("pair") / f"TOY-{loss}"
        status, _, err = train_main(*TINY, "--root", shared_root, "--out", outs[loss], "--runs", "2",
                                    "--pooling-ratio", "1", "--loss", "ce" if loss == "ce" else "encouraging",
                                    *extra)
        assert status == 0, err
    return outs


# ----------------------------------------------------------------------------- runs, splits, records


def test_progress_lines_and_outputs(ce_out):
    out, first, _ = ce_out
    assert "TOY: 60 graphs, 3 node features, 2 classes; split 48/6/6; 0 of 1 runs done" in first
    assert "run 0 epoch 1: train loss " in first and "epochs of patience left" in first
    assert "TOY ce: test acc " in first.splitlines()[-1]
    assert (out / "valid_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "run0").iterdir()) == ["best.pt", "curve.csv", "result.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["dataset"], settings["lr"], settings["seed"], settings["patience"]) == ("TOY", 0.03, SEED, 3)
    assert settings["loss"] == "ce" and settings["log_end"] is None  # EL flags unset with CE


def test_run_r_uses_seed_plus_r_and_its_own_split(ce_out, toy):
    out = ce_out[0]
    recs = [record(out / f"run{r}") for r in range(2)]
    for r, rec in enumerate(recs):
        assert rec["schema"] == "el-result/1" and (rec["task"], rec["loss"]) == ("TOY", "ce")
        assert rec["seed"] == SEED + r and rec["run"] == f"{out.name}/run{r}"
        assert rec["checkpoint"] == "best_valid" and rec["curve"] == "curve.csv"
        assert rec["info"]["graphs"] == {"train": 48, "valid": 6, "test": 6}
        assert set(rec["metrics"]) == {"test_acc", "valid_acc", "best_epoch", "epochs"}
    # the best model of run r scores its recorded valid numbers on the split of seed + r, not of another seed
    for r, rec in enumerate(recs):
        model = _best_model(out / f"run{r}", toy)
        acc, loss = _scores(model, toy, split_indices(len(toy), SEED + r)[1])
        assert acc == rec["metrics"]["valid_acc"]
        assert loss == pytest.approx(rec["info"]["valid_loss"], rel=1e-5, abs=1e-7)
        other = _scores(model, toy, split_indices(len(toy), SEED + 1 - r)[1])[1]
        assert other != pytest.approx(loss, rel=1e-3)
    assert curve(out / "run0")[0]["train_loss"] != curve(out / "run1")[0]["train_loss"]  # other init and order


def _best_model(run_dir: Path, toy) -> SAGPoolNet:
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, ratio=0.5, dropout=0.5)
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True))
    return model.eval()


def _scores(model, toy, index):
    """(accuracy %, mean cross-entropy) of ``model`` on the graphs ``index`` of ``toy``, in one batch."""
    from torch_geometric.loader import DataLoader

    batch = next(iter(DataLoader(toy[index], batch_size=len(index))))
    with torch.no_grad():
        logits = model(batch)
    acc = 100.0 * int((logits.argmax(dim=1) == batch.y).sum()) / len(index)
    return acc, torch.nn.functional.cross_entropy(logits, batch.y).item()


# ----------------------------------------------------------------------------- early stopping


def _chosen_epoch(rows) -> int:
    """The epoch the command must keep: highest valid accuracy, ties to the lower valid loss (``_better``)."""
    best = None
    for row in rows:
        key = (float(row["valid_acc"]), -float(row["valid_loss"]))
        if best is None or key > best[0]:
            best = (key, int(row["epoch"]))
    return best[1]


def test_early_stopping_keeps_the_best_valid_model(ce_out, toy):
    out = ce_out[0]
    stopped_early = 0
    for r in range(2):
        rows, rec = curve(out / f"run{r}"), record(out / f"run{r}")
        best, epochs = rec["metrics"]["best_epoch"], rec["metrics"]["epochs"]
        assert [int(row["epoch"]) for row in rows] == list(range(1, epochs + 1))
        assert best == _chosen_epoch(rows)
        assert epochs == min(best + PATIENCE, MAX_EPOCHS)  # stops exactly --patience epochs after the best
        stopped_early += epochs < MAX_EPOCHS
        row = rows[best - 1]
        assert float(row["valid_acc"]) == pytest.approx(rec["metrics"]["valid_acc"], abs=1e-4)
        # best.pt is the model of the best epoch: its valid loss is that epoch's, not the last epoch's
        model = _best_model(out / f"run{r}", toy)
        _, valid, test = split_indices(len(toy), SEED + r)
        acc, loss = _scores(model, toy, valid)
        assert abs(loss - float(row["valid_loss"])) < 2e-6
        assert abs(float(rows[-1]["valid_loss"]) - float(row["valid_loss"])) > 1e-4
        assert _scores(model, toy, test)[0] == rec["metrics"]["test_acc"]
    assert stopped_early == 2  # the patience rule was what ended both runs


def test_max_epochs_ends_a_run(train_main, shared_root, tmp_path):
    out = tmp_path / "short"
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "1", "--max-epochs", "2",
                                "--log-every", "5")
    assert status == 0, err
    rows, rec = curve(out / "run0"), record(out / "run0")
    assert len(rows) == 2 and rec["metrics"]["epochs"] == 2 and rec["metrics"]["best_epoch"] == _chosen_epoch(rows)


# ----------------------------------------------------------------------------- EL at bonus_rho 0


def test_el_with_bonus_rho_0_trains_as_cross_entropy(pair):
    """Not bit for bit: the core's fused loss rounds log-softmax and its gradient in its own order (the
    gradients differ from F.cross_entropy's in the last bit), and SAGPool's top-k node choice turns such a
    difference into a different kept node some epochs later (with this recipe at the default ratio 0.5: a
    train loss 0.036 apart at epoch 6 of run 0). With every node kept (--pooling-ratio 1) the two runs of 7 and 8 epochs
    agree within 1e-6 (the last printed digit; 1e-5 allowed for other CPUs' rounding, a wiring difference
    such as another batch order shows as 1e-2) and in every accuracy and choice."""
    for r in range(2):
        ce, el = curve(pair["ce"] / f"run{r}"), curve(pair["el"] / f"run{r}")
        assert len(ce) == len(el) > PATIENCE
        for a, b in zip(ce, el):
            assert (a["epoch"], a["valid_acc"], a["bonus_rho"]) == (b["epoch"], b["valid_acc"], b["bonus_rho"])
            assert float(b["bonus_rho"]) == 0.0
            for key in ("train_loss", "valid_loss"):
                assert abs(float(a[key]) - float(b[key])) <= 1e-5, (r, a["epoch"], key, a[key], b[key])
        rec_ce, rec_el = record(pair["ce"] / f"run{r}"), record(pair["el"] / f"run{r}")
        assert rec_ce["metrics"] == rec_el["metrics"]  # test_acc, valid_acc, best_epoch, epochs
        assert (rec_ce["loss"], rec_el["loss"]) == ("ce", "el")
        assert rec_el["info"]["el"]["bonus_rho"] == 0.0 and rec_el["info"]["el"]["log_end"] == 0.75


def test_el_with_a_bonus_trains_otherwise(train_main, shared_root, pair, tmp_path):
    out = tmp_path / "el1"
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "1", "--pooling-ratio", "1",
                                "--loss", "encouraging", "--max-epochs", "2")
    assert status == 0, err
    rows, ce = curve(out / "run0"), curve(pair["ce"] / "run0")
    assert float(rows[0]["bonus_rho"]) == 1.0
    # EL = CE + log(1 - p) <= CE: the same first epoch's batches give a lower loss
    assert float(rows[0]["train_loss"]) < float(ce[0]["train_loss"]) - 0.1


def test_el_results_reads_the_records(pair):
    records = collect([pair["ce"], pair["el"]])
    assert len(records) == 4 and {(r.task, r.checkpoint) for r in records} == {("TOY", "best_valid")}
    (group,) = summarize(records)
    assert [(s.loss, s.n, s.seeds) for s in group.losses] == [("ce", 2, (SEED, SEED + 1)), ("el", 2, (SEED, SEED + 1))]
    assert group.difference["test_acc"] == 0.0 and group.difference["best_epoch"] == 0.0
    assert all(r.curve is not None and r.curve.is_file() for r in records)


# ----------------------------------------------------------------------------- rerunning a command


def test_more_runs_train_only_the_new_ones(ce_out):
    out, first, second = ce_out
    assert "0 of 1 runs done" in first and "run 1 epoch" not in first
    assert "1 of 2 runs done" in second
    assert "run 0 epoch" not in second and "run 0: resuming" not in second and "run 1 epoch 1:" in second
    assert "over 2 runs" in second.splitlines()[-1]


def test_a_finished_command_rerun_trains_nothing(train_main, ce_out, shared_root):
    out = ce_out[0]
    before = {p: p.stat().st_mtime_ns for p in out.glob("run*/*")}
    status, stdout, err = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "2")
    assert status == 0, err
    assert "epoch" not in stdout and "over 2 runs" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("run*/*")} == before


@pytest.mark.parametrize("flag,value,saved", [("--lr", "0.05", "0.03"), ("--seed", "6", "5"),
                                              ("--pooling", "global", "'hierarchical'"),
                                              ("--loss", "encouraging", "'ce'")])
def test_a_changed_setting_is_refused(train_main, ce_out, shared_root, flag, value, saved):
    out = ce_out[0]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    args = [a for a in TINY]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    status, stdout, err = train_main(*args, "--root", shared_root, "--out", out, "--runs", "3")
    line = one_error_line(status, err, f"--out {out}", f"{flag} {saved}", f"this command has {flag}")
    assert "another --out" in line and stdout == ""
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files  # nothing trained or written


def test_a_changed_el_flag_is_refused(train_main, pair, shared_root):
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", pair["el"], "--runs", "2", "--pooling-ratio",
                                "1", "--loss", "encouraging", "--bonus-rho", "0.5")
    one_error_line(status, err, "--bonus-rho 0.0", "this command has --bonus-rho 0.5")


def test_a_killed_run_resumes_to_the_uninterrupted_result(train_main, ce_out, shared_root, tmp_path):
    """Kill the command (SIGKILL) after epoch 3 of run 0 and run it again: the unfinished run resumes from
    its last.pt and ends exactly as the runs trained without interruption (ce_out)."""
    out = tmp_path / "TOY-ce"
    cmd = [sys.executable, "-m", PROG.split()[-1], *TINY, "--root", str(shared_root), "--out", str(out), "--runs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=command_env(threads=1, checkout_on_path=True), cwd=tmp_path)
    watchdog = threading.Timer(180, proc.kill)  # a hung command fails the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("run 0 epoch 3:"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert lines and lines[-1].startswith("run 0 epoch 3:"), "".join(lines)[-3000:]
    unfinished = [r for r in range(2) if (out / f"run{r}" / "last.pt").exists()]
    assert len(unfinished) == 1, "the kill should have found a run under way"
    r = unfinished[0]
    assert not (out / f"run{r}" / "result.json").exists()
    status, stdout, err = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "2")
    assert status == 0, err
    assert f"run {r}: resuming after epoch " in stdout
    assert int(stdout.split(f"run {r}: resuming after epoch ")[1].split()[0]) >= (3 if r == 0 else 1)
    reference = ce_out[0]
    for run in range(2):
        mine, ref = out / f"run{run}", reference / f"run{run}"
        assert [[row[k] for k in CURVE_VALUES] for row in curve(mine)] == \
               [[row[k] for k in CURVE_VALUES] for row in curve(ref)]
        a, b = record(mine), record(ref)
        assert a["metrics"] == b["metrics"] and a["seed"] == b["seed"]
        for key in ("test_loss", "valid_loss", "graphs", "settings", "el"):
            assert a["info"][key] == b["info"][key], key
        best_a = torch.load(mine / "best.pt", weights_only=True)
        best_b = torch.load(ref / "best.pt", weights_only=True)
        assert all(torch.equal(best_a[k], best_b[k]) for k in best_b)
        assert not (mine / "last.pt").exists()


def test_a_damaged_checkpoint_is_a_one_line_error(train_main, ce_out, shared_root, tmp_path):
    import shutil

    out = Path(shutil.copytree(ce_out[0], tmp_path / "TOY-ce"))
    (out / "run2").mkdir()
    (out / "run2" / "last.pt").write_bytes(b"not a checkpoint")
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", out, "--runs", "3")
    one_error_line(status, err, "last.pt", f"delete {out / 'run2'}")


# ----------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("argv,words", [
    (["--pooling-ratio", "0"], ["--pooling-ratio must be in (0, 1], got 0.0"]),
    (["--pooling-ratio", "1.5"], ["--pooling-ratio", "1.5"]),
    (["--dropout", "1"], ["--dropout must be in [0, 1), got 1.0"]),
    (["--weight-decay", "-1"], ["--weight-decay", "-1.0"]),
    (["--smoothing", "1"], ["--smoothing", "1.0"]),
    (["--loss", "encouraging", "--log-end", "2"], ["--log-end must be in (0, 1], got 2.0"]),
    (["--loss", "encouraging", "--bonus-rho", "-1"], ["--bonus-rho", "-1.0"]),
    (["--log-end", "0.5"], ["--log-end applies to the Encouraging Loss only, not --loss ce"]),
    (["--loss", "ce", "--bonus-rho", "0"], ["--bonus-rho applies to the Encouraging Loss only, not --loss ce"]),
    (["--runs", "0"], ["argument --runs", "'0'"]),
    (["--patience", "0"], ["argument --patience", "'0'"]),
    (["--lr", "nan"], ["argument --lr", "'nan'"]),
    (["--seed", "-1"], ["argument --seed", "'-1'"]),
    (["--pooling", "max"], ["argument --pooling", "'max'"]),
    (["--stop-on", "f1"], ["argument --stop-on", "'f1'"]),
    (["--loss", "focal"], ["argument --loss", "'focal'"]),
])
def test_a_bad_flag_is_one_line_and_writes_nothing(train_main, tmp_path, argv, words):
    out = tmp_path / "out"
    status, stdout, err = train_main("--root", tmp_path / "root", "--out", out, *argv)
    one_error_line(status, err, *words)
    assert stdout == "" and not out.exists() and not (tmp_path / "root").exists()


def test_an_out_folder_of_something_else_is_refused(train_main, shared_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", out)
    one_error_line(status, err, f"--out {out}", "no settings.json")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    status, _, err = train_main(*TINY, "--root", shared_root, "--out", tmp_path / "file")
    one_error_line(status, err, f"--out {tmp_path / 'file'}", "not a folder")


def test_a_missing_dataset_without_download_names_root_and_leaves_out_unmade(train_main, tmp_path, shared_root):
    out = tmp_path / "out"
    status, _, err = train_main(*TINY, "--root", tmp_path / "nothing", "--out", out)
    one_error_line(status, err, f"--root {tmp_path / 'nothing'}", "no TOY there", "downloading is off")
    assert not out.exists()  # a corrected command may use the same --out
    status, _, err = train_main(*[a if a != "TOY" else "TOY2" for a in TINY], "--root", shared_root, "--out", out)
    one_error_line(status, err, "no TOY2 there")
    assert not out.exists()


def test_the_command_itself_exits_2_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", PROG.split()[-1], "--pooling-ratio", "0", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=command_env(threads=1, checkout_on_path=True),
                          cwd=tmp_path, timeout=120)
    one_error_line(proc.returncode, proc.stderr, "--pooling-ratio must be in (0, 1], got 0.0")
    assert proc.stdout == ""


def test_help_shows_the_defaults(train_main):
    status, stdout, _ = train_main("--help")
    text = " ".join(stdout.split())
    assert status == 0
    for shown in ("--patience PATIENCE", "(default: 50)", "(default: 0.0005)", "(default: 128)",
                  "(default: hierarchical)", "--log-end LE", "(default: 0.75)", "(default: 777)"):
        assert shown in text, shown
