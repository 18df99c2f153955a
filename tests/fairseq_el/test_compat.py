"""fairseq_el.compat: what the plugin fixes in fairseq, on real checkpoints of tiny runs (CPU).

* a checkpoint whose unpickling would create a file is refused with one line by
  ``python -m fairseq_el.analyze``, ``evaluate``, ``average_checkpoints`` and stock
  ``fairseq-generate --user-dir fairseq_el``, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set; fairseq's
  loader is wrapped, and keeps working after timm took ``Namespace`` off torch's allow-list;
* ``checkpoint_last.pt`` is copied atomically (a full disk leaves the old file whole), and fairseq's resume
  from it, killed with SIGKILL, is measured against an uninterrupted run (the README's statement);
* fairseq's ``batch_by_size`` keeps every example.

The runs: a 200-pair IWSLT14 slice and a 1-layer, 32-dim Transformer.
"""
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from fairseq_el import compat

from confined import run_confined
from helpers import BIN, ROOT, TINY_TRANSFORMER, USER_DIR, command_env, error_lines, iwslt14_prep

TINY = ["--user-dir", USER_DIR, *TINY_TRANSFORMER, "--dropout", "0.3",
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
    "--max-tokens", "1000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5",
    "--max-epoch", "2", "--save-interval-updates", "4", "--log-format", "simple", "--log-interval", "100",
]


def _env(**extra):
    return command_env(threads=1, **extra)


@pytest.fixture(scope="module")
def sample(iwslt14_slice):
    """The binarized slice (text/, bin/) plus the prep.json the data preparation would write."""
    return iwslt14_slice(200, 20, 20, prep=iwslt14_prep(train=200, valid=20, test=20))


def _train(data_bin, save, kill_after=None):
    """Start fairseq-train on ``save``; with ``kill_after``, SIGKILL it (its whole process group) as soon as
    it logs having saved a checkpoint whose name ends so. Returns (process, thread, lines)."""
    proc = subprocess.Popen([str(BIN / "fairseq-train"), str(data_bin), *TINY, "--save-dir", str(save)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if kill_after and "Saved checkpoint" in line and f"/{kill_after} " in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.stdout.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return proc, thread, lines


def _finish(*started, timeout=600):
    logs = []
    for proc, thread, lines in started:
        thread.join(timeout)
        proc.wait(timeout)
        logs.append((proc.returncode, "".join(lines)))
    return logs


@pytest.fixture(scope="module")
def runs(sample, tmp_path_factory):
    """Three runs of the same 2-epoch training (10 updates an epoch, a checkpoint every 4 updates):
    ``whole`` uninterrupted; ``epoch`` killed once checkpoint1.pt (end of epoch 1) is saved, then started
    again; ``mid`` killed once checkpoint_1_4.pt (update 4, mid-epoch 1) is saved, then started again."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("whole", "epoch", "mid")}
    first = _finish(_train(sample / "bin", dirs["whole"]),
                    _train(sample / "bin", dirs["epoch"], "checkpoint1.pt"),
                    _train(sample / "bin", dirs["mid"], "checkpoint_1_4.pt"))
    assert first[0][0] == 0, first[0][1][-3000:]
    assert first[1][0] == first[2][0] == -signal.SIGKILL, [log[-2000:] for _, log in first[1:]]
    again = _finish(_train(sample / "bin", dirs["epoch"]), _train(sample / "bin", dirs["mid"]))
    for rc, log in again:
        assert rc == 0, log[-3000:]
    return dirs, {"epoch": again[0][1], "mid": again[1][1]}


class Hostile:
    """Unpickled without weights_only, it opens (creates) the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hostile(runs, tmp_path):
    """A real fairseq checkpoint with one hostile object in its extra_state, and the marker it would create."""
    dirs, _ = runs
    state = compat.read_checkpoint(dirs["whole"] / "checkpoint_last.pt")
    marker = tmp_path / "MARKER"
    state["extra_state"]["note"] = Hostile(marker)
    path = tmp_path / "checkpoint_evil.pt"
    torch.save(state, path)
    return path, marker


def test_the_hostile_checkpoint_runs_code_when_loaded_unsafely(hostile):
    """The probe is real: fairseq's own torch.load (no weights_only) under the override runs its code."""
    path, marker = hostile
    proc = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], map_location='cpu')",
                           str(path)], capture_output=True, text=True, env=_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()


def _hostile_commands(path, sample, tmp_path, good):
    return {
        "analyze": [sys.executable, "-m", "fairseq_el.analyze", str(sample / "bin"), "--path", str(path),
                    "--out", str(tmp_path / "report"), "--quiet"],
        "evaluate": [sys.executable, "-m", "fairseq_el.evaluate", "--data", str(sample), "--checkpoint", str(path),
                     "--loss", "el", "--seed", "1", "--output", str(tmp_path / "eval.json"), "--quiet",
                     "--", "--max-len-b", "5"],
        "average_checkpoints": [sys.executable, "-m", "fairseq_el.average_checkpoints", "--inputs", str(good),
                                str(path), "--output", str(tmp_path / "avg.pt"), "--quiet"],
        "fairseq-generate": [str(BIN / "fairseq-generate"), str(sample / "bin"), "--user-dir", USER_DIR,
                             "--path", str(path), "--cpu", "--beam", "2", "--max-len-b", "5"],
    }


@pytest.mark.parametrize("command", ["analyze", "evaluate", "average_checkpoints", "fairseq-generate"])
def test_hostile_checkpoint_is_refused_in_one_line(command, hostile, runs, sample, tmp_path):
    path, marker = hostile
    dirs, _ = runs
    cmd = _hostile_commands(path, sample, tmp_path, dirs["whole"] / "checkpoint1.pt")[command]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    assert not marker.exists(), f"{command} ran the checkpoint's code"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(path) in errors[0] and "refused" in errors[0] and "io.open" in errors[0], errors
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "avg.pt").exists()


def test_fairseqs_loader_is_wrapped(hostile, runs, tmp_path, monkeypatch):
    """What fairseq-train --restore-file, fairseq-generate and load_model_ensemble call reads safely first;
    a good checkpoint still loads."""
    from fairseq import checkpoint_utils

    import fairseq_el  # noqa: F401 -- registers the plugin, installs the fixes

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = hostile
    dirs, _ = runs
    load = checkpoint_utils.load_checkpoint_to_cpu
    assert getattr(load, "_el_reads_safely", False)
    compat.install()  # again: not wrapped twice
    assert checkpoint_utils.load_checkpoint_to_cpu is load
    with pytest.raises(compat.CheckpointRefused, match="refused, it holds objects that are not plain data"):
        load(str(path))
    assert not marker.exists()
    text = tmp_path / "checkpoint9.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(compat.CheckpointRefused, match=f"{text}: not a PyTorch checkpoint"):
        load(str(text))
    state = load(str(dirs["whole"] / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 20


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_resume_after_sigkill(runs):
    """checkpoint_last.pt restores model, optimizer, lr scheduler, update count and the data iterator's
    position; on the CPU a run resumed within epoch 1 ends bit-identical to the uninterrupted run. A run
    resumed in epoch 2 has the same update count but other weights: fairseq groups the sentences into batches
    once per process, seeded with the epoch the process starts in."""
    dirs, logs = runs
    whole = compat.read_checkpoint(dirs["whole"] / "checkpoint2.pt")
    assert "Loaded checkpoint" in logs["mid"] and "(epoch 1 @ 4 updates)" in logs["mid"], logs["mid"][-3000:]
    assert "(epoch 2 @ 10 updates)" in logs["epoch"], logs["epoch"][-3000:]
    mid = compat.read_checkpoint(dirs["mid"] / "checkpoint2.pt")
    assert _same(whole["model"], mid["model"])
    assert _same(whole["last_optimizer_state"], mid["last_optimizer_state"])
    assert whole["optimizer_history"][-1] == mid["optimizer_history"][-1]  # lr scheduler state, num_updates
    assert whole["extra_state"]["train_iterator"] == mid["extra_state"]["train_iterator"]
    assert whole["extra_state"]["val_loss"] == mid["extra_state"]["val_loss"]
    # nothing of epoch 1 is trained twice or skipped: the epoch-1 checkpoints of the three runs are the same
    for name in ("epoch", "mid"):
        one = compat.read_checkpoint(dirs[name] / "checkpoint1.pt")
        assert _same(compat.read_checkpoint(dirs["whole"] / "checkpoint1.pt")["model"], one["model"]), name
    epoch = compat.read_checkpoint(dirs["epoch"] / "checkpoint2.pt")
    assert epoch["optimizer_history"][-1]["num_updates"] == whole["optimizer_history"][-1]["num_updates"] == 20
    assert not _same(whole["model"], epoch["model"])  # README: not bit-identical when resumed in a later epoch
    # and the lr scheduler never sees the validation loss of the epoch that ended before the kill
    assert whole["optimizer_history"][-1]["lr_scheduler_state"]["best"] is not None
    assert epoch["optimizer_history"][-1]["lr_scheduler_state"]["best"] is None


def test_checkpoint_last_copy_is_atomic_on_a_full_disk(tmp_path):
    """fairseq makes checkpoint_last.pt with ``PathManager.copy``; stock, a full disk (or a kill) during
    that copy leaves a truncated file; with the plugin's wrapper the old file stays whole and no
    temporary file is left."""
    disk = tmp_path / "save"
    src = tmp_path / "checkpoint3.pt"
    src.write_bytes(os.urandom(96 * 1024))
    code = (
        "import sys, os\n"
        "from fairseq.file_io import PathManager\n"
        "src, disk, which = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "open(os.path.join(disk, 'checkpoint_last.pt'), 'wb').write(b'old' * 1000)\n"
        "if which == 'plugin':\n"
        "    from fairseq_el import compat\n"
        "    compat.install()\n"
        "try:\n"
        "    PathManager.copy(src, os.path.join(disk, 'checkpoint_last.pt'), overwrite=True)\n"
        "except OSError as e:\n"
        "    print('error', e.strerror)\n")
    stock = run_confined([sys.executable, "-c", code, src, disk, "stock"], full={disk: 64 * 1024}, env=_env())
    assert "error No space left on device" in stock.stdout, stock.stderr
    assert 0 < stock.leftovers[str(disk)]["checkpoint_last.pt"] < src.stat().st_size  # truncated: the problem
    plugin = run_confined([sys.executable, "-c", code, src, disk, "plugin"], full={disk: 64 * 1024}, env=_env())
    assert "error No space left on device" in plugin.stdout, plugin.stderr
    assert plugin.leftovers[str(disk)] == {"checkpoint_last.pt": 3000}  # the old file, whole; no temporary


def test_atomic_copy_copies_and_respects_overwrite(tmp_path):
    copy = compat.atomic_local_copy(lambda *a, **k: pytest.fail("local copies do not reach fairseq's copy"))
    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    assert copy(str(src), str(dst), overwrite=False) is False and dst.read_bytes() == b"old"
    assert copy(str(src), str(dst), overwrite=True) is True and dst.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    assert compat.atomic_local_copy(copy) is copy


def test_fairseq_loader_works_after_timm_removed_namespace_from_the_allow_list(tmp_path):
    """timm's checkpoint loaders wrap torch.load in ``safe_globals([argparse.Namespace])``, whose exit
    removes Namespace from torch's allow-list even though the plugin had allowed it: fairseq's own
    torch.load then refused every fairseq checkpoint in that process (found when the test suite ran
    a timm resume before a translation recipe). The plugin's loader allows its types again first."""
    import argparse

    import timm.models._helpers as timm_helpers
    from fairseq import checkpoint_utils

    compat.install()
    torch.save({"state_dict": {}, "args": argparse.Namespace(model="resnet18")}, tmp_path / "timm.pth.tar")
    timm_helpers._torch_load(str(tmp_path / "timm.pth.tar"), map_location="cpu", weights_only=True)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # what timm did
    torch.save({"args": argparse.Namespace(arch="transformer", task="translation"), "model": {},
                "optimizer_history": [{"criterion_name": "x", "optimizer_name": "adam",
                                       "lr_scheduler_state": {"best": 1.0}, "num_updates": 0}],
                "extra_state": {}}, tmp_path / "checkpoint_last.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))
    assert state["args"].arch == "transformer" or state["cfg"]["model"].arch == "transformer"
    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_batch_by_size_keeps_every_example():
    from fairseq.data import data_utils

    import fairseq_el  # noqa: F401  (installs the wrapper)
    from fairseq_el.compat import keep_every_example

    assert getattr(data_utils.batch_by_size, "_el_keeps_every_example", False)
    original = data_utils.batch_by_size.__wrapped__
    sizes = np.random.RandomState(0).randint(5, 40, size=100)
    indices = np.argsort(sizes, kind="mergesort").astype(np.int64)
    kwargs = dict(num_tokens_fn=lambda i: int(sizes[i]), max_tokens=300, required_batch_size_multiple=8)
    dropped = original(indices, **kwargs)
    kept = data_utils.batch_by_size(indices, **kwargs)
    n_dropped = sum(map(len, dropped))
    assert n_dropped < 100, "fairseq-fixed no longer drops the last batch: the fix may be removable"
    assert sorted(np.concatenate(kept).tolist()) == list(range(100))
    assert len(kept) == len(dropped) + 1
    assert [b.tolist() for b in kept[:-1]] == [b.tolist() for b in dropped]
    assert keep_every_example(data_utils.batch_by_size) is data_utils.batch_by_size  # idempotent
