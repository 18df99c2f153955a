"""Reliability of the fairseq plugin (issue 16): hostile and damaged inputs, full disks, line ends,
and what fairseq's own resume restores.

* a checkpoint whose unpickling would create a file is refused with one line by
  ``python -m fairseq_el.analyze``, ``evaluate``, ``average_checkpoints`` and stock
  ``fairseq-generate --user-dir fairseq_el``, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set;
* ``average_checkpoints`` names the bad input and what is wrong with it;
* damaged ``prep.json`` / ``run.json`` are one line naming the file;
* the data preparation on a full disk stops with one line and leaves nothing a rerun takes as
  finished (the truncated ``spm.model`` the probe found);
* line-break characters inside a sentence keep source and target aligned in ``bin/``;
* fairseq's resume from ``checkpoint_last.pt``, killed with SIGKILL, measured against an
  uninterrupted run (the README's statement).

Everything runs on the CPU on a 200-pair IWSLT14 slice and a 1-layer, 32-dim Transformer.
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from confined import run_confined
from fairseq_el import average_checkpoints as avg
from fairseq_el import compat
from fairseq_el import evaluate as ev
from fairseq_el import prep_common as pc
from fairseq_el import train as recipe

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_el")
BIN = Path(sys.executable).parent
PREP = {"schema": "el-prep/1", "task": "iwslt14_de_en", "src": "de", "tgt": "en", "bpe": "subword_nmt",
        "remove_bpe": "subword_nmt", "moses_tokenized": True, "lowercase": True, "bin": "bin", "text": "text",
        "references": {}, "counts": {"train": 200, "valid": 20, "test": 20}, "args": {}}
TINY = [
    "--user-dir", USER_DIR, "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0.3",
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
    "--max-tokens", "1000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5",
    "--max-epoch", "2", "--save-interval-updates", "4", "--log-format", "simple", "--log-interval", "100",
]
#: what splitlines() takes for a line end, besides "\n"
BREAKS = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def _env(**extra):
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


# ---------------------------------------------------------------------------
# fixtures: a binarized slice, and three tiny runs (uninterrupted, killed after epoch 1, killed mid-epoch 1)


@pytest.fixture(scope="module")
def sample(shared_data, tmp_path_factory):
    """make_iwslt14_sample's output (text/, bin/) plus the prep.json the data preparation would write."""
    out = tmp_path_factory.mktemp("rel") / "prep"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_iwslt14_sample.py"),
                    "--data", shared_data / "iwslt14-de-en", "--out", out,
                    "--train", "200", "--valid", "20", "--test", "20"],
                   check=True, capture_output=True, env=_env())
    (out / "prep.json").write_text(json.dumps(PREP))
    return out


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


# ---------------------------------------------------------------------------
# 2. hostile checkpoints


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
    import fairseq_el  # noqa: F401 -- registers the plugin, installs the fixes
    from fairseq import checkpoint_utils

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


# ---------------------------------------------------------------------------
# 5a. average_checkpoints names the bad input


def _average(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        avg.main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, error_lines(err)


def test_average_checkpoints_names_the_bad_input(runs, tmp_path, capsys):
    dirs, _ = runs
    good = dirs["whole"] / "checkpoint1.pt"
    text = tmp_path / "checkpoint5.pt"
    text.write_text("epoch 5\nloss 3.2\n")
    truncated = tmp_path / "checkpoint6.pt"
    data = (dirs["whole"] / "checkpoint2.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    no_model = tmp_path / "checkpoint7.pt"
    torch.save({"cfg": {}, "extra_state": {}}, no_model)
    not_tensors = tmp_path / "checkpoint8.pt"
    torch.save({"model": {"encoder.version": "2"}}, not_tensors)
    state = compat.read_checkpoint(dirs["whole"] / "checkpoint2.pt")
    key = "encoder.layers.0.fc1.weight"
    state["model"][key] = torch.zeros(65, 32)
    other_shape = tmp_path / "checkpoint9.pt"
    torch.save(state, other_shape)
    out = tmp_path / "avg.pt"
    cases = [
        (tmp_path / "checkpoint4.pt", "checkpoint4.pt: no such file"),
        (text, f"checkpoint 2 {text}: not a PyTorch checkpoint file"),
        (truncated, f"checkpoint 2 {truncated}: not a readable PyTorch checkpoint (a damaged or truncated file"),
        (no_model, f"({no_model}) holds no 'model' state dict"),
        (not_tensors, f"({not_tensors}): its 'model' holds str under 'encoder.version', not a tensor"),
        (other_shape, f"'{key}' is (65, 32) in checkpoint 2 ({other_shape}), (64, 32) in checkpoint 1"),
    ]
    for bad, needle in cases:
        code, errors = _average(capsys, "--inputs", good, bad, "--output", out)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (bad, errors)
        assert "pop from empty list" not in errors[0] and "miniz" not in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avg.pt")]


# ---------------------------------------------------------------------------
# 4. damaged prep.json / run.json are one line


BAD_JSON = {
    "array": ("[]", "prep.json holds a JSON array, expected an object"),
    "truncated": ('{"schema": "el-prep/1", "src": "de', "prep.json is not valid JSON"),
    "number": ("5", "prep.json holds a JSON number, expected an object"),
    "bin": (json.dumps(dict(PREP, bin=5)), "prep.json bin is 5, expected the name of a folder"),
}


def _prep_copy(sample, tmp_path, text):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(sample / "bin", data / "bin")
    (data / "prep.json").write_text(text)
    return data


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_damaged_prep_json_is_one_line(case, sample, tmp_path, capsys):
    from fairseq_el import analyze

    text, needle = BAD_JSON[case]
    data = _prep_copy(sample, tmp_path, text)
    ckpt = tmp_path / "checkpoint_last.pt"  # prep.json is read first: any file will do
    ckpt.write_bytes(b"")
    expect = f"--data {data}: {needle}"
    # evaluate
    with pytest.raises(SystemExit) as exc:
        ev.main(["--data", str(data), "--checkpoint", str(ckpt), "--output", str(tmp_path / "e.json")])
    errors = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(errors) == 1 and expect in errors[0], errors
    # the recipes' training runner
    rc = recipe.main(["--preset", "iwslt14_de_en", "--data", str(data), "--save-dir", str(tmp_path / "run"),
                      "--loss", "el", "--dry-run"])
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and expect in errors[0], errors
    # analyze (DATA is positional: the flag is DATA)
    with pytest.raises(SystemExit) as exc:
        analyze.main([str(data), "--path", str(ckpt), "--names", "m", "--out", str(tmp_path / "report"), "--quiet"])
    errors = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(errors) == 1 and f"DATA {data}: {needle}" in errors[0], errors
    assert not (tmp_path / "run").exists() and not (tmp_path / "report").exists()


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


# ---------------------------------------------------------------------------
# 4. the data preparation on a full disk


def _m30k_args(shared_data, out):
    return ["--raw", str(shared_data / "multi30k-de-en"), "--train-lines", "300", "--valid-lines", "30",
            "--test-lines", "30", "--vocab-size", "300", "--workers", "1", "--out", str(out)]


def _prep_on_small_disk(shared_data, tmp_path, size):
    """prep_multi30k with OUT on a tmpfs of ``size`` bytes; OUT's files are copied to ``saved`` before the
    tmpfs goes. Returns (process, saved)."""
    out, saved = tmp_path / "out", tmp_path / "out.saved"
    saved.mkdir()
    cmd = ["bash", "-c", '"$2" -m fairseq_el.prep_multi30k "${@:3}"; rc=$?; cp -a "$1"/. "$1.saved"/; exit $rc',
           "prep", str(out), sys.executable, *_m30k_args(shared_data, out)]
    proc = run_confined(cmd, full={out: size}, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), timeout=600)
    return proc, saved


def _check_full_disk_failure(proc, saved, stage):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("python -m fairseq_el.prep_multi30k: error: cannot write "), errors
    assert errors[0].endswith(": No space left on device") or "No space left on device (fairseq-preprocess" in errors[0]
    assert f"/{stage}.partial" in errors[0], errors
    assert not (saved / "prep.json").exists()
    # nothing outside a .partial stage but finished stages and the argument record; no temporary files
    top = sorted(p.name for p in saved.iterdir())
    assert all(n in (".prep-args.json", "data", "bpe", "text", "bin") or n.endswith(".partial") for n in top), top
    assert not [p for p in saved.rglob("*") if p.name.endswith(".tmp")]
    json.loads((saved / ".prep-args.json").read_text())


def _check_data(saved, shared_data):
    for split, stem, n in (("train", "train", 300), ("valid", "valid", 30), ("test", "test2016", 30)):
        for lang in ("de", "en"):
            with gzip.open(shared_data / "multi30k-de-en" / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as f:
                want = [pc.normalize_raw(next(f).rstrip("\n")) for _ in range(n)]
            assert pc.read_lines(saved / "data" / f"{split}.{lang}") == want


def test_full_disk_while_training_sentencepiece(shared_data, tmp_path):
    """The probe's case: data/ fits, the 240 kB spm.model does not. Before, sentencepiece wrote a truncated
    model without an error and bpe/ was marked finished; a rerun then used it."""
    proc, saved = _prep_on_small_disk(shared_data, tmp_path, 160 * 1024)
    _check_full_disk_failure(proc, saved, "bpe")
    assert not (saved / "bpe").exists() and not list((saved / "bpe.partial").iterdir())
    _check_data(saved, shared_data)
    # with room again, the same command continues: data/ is kept, the rest is built, the model is whole
    out = tmp_path / "again"
    shutil.copytree(saved, out, symlinks=True)
    rerun = subprocess.run([sys.executable, "-m", "fairseq_el.prep_multi30k", *_m30k_args(shared_data, out)],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "data/: finished before, skipping" in rerun.stderr and "bpe/: building" in rerun.stderr
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(out / "bpe" / "spm.model")).get_piece_size() == 300
    assert len(pc.read_lines(out / "bpe" / "spm.vocab")) == 300
    assert json.loads((out / "prep.json").read_text())["counts"] == {"train": 300, "valid": 30, "test": 30}


def test_full_disk_while_binarizing(shared_data, tmp_path):
    """fairseq-preprocess fails on the full disk: its traceback is kept back, one line is printed."""
    proc, saved = _prep_on_small_disk(shared_data, tmp_path, 440 * 1024)
    _check_full_disk_failure(proc, saved, "bin")
    assert not (saved / "bin").exists()
    _check_data(saved, shared_data)
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(saved / "bpe" / "spm.model")).get_piece_size() == 300
    for split, n in (("train", 300), ("valid", 30), ("test", 30)):
        for lang in ("de", "en"):
            assert pc.count_lines(saved / "text" / f"{split}.{lang}") == n


# ---------------------------------------------------------------------------
# 3a. line-break characters inside a sentence


def test_line_break_characters_keep_the_corpus_aligned(shared_data, tmp_path, capsys):
    """A sentence holding \\r (fairseq-preprocess splits lines there) or another splitlines() line end: the
    character becomes a space on both sides, and bin/ holds as many sentences per language as prep.json
    says. Before, the source side of bin/ had one sentence more per \\r."""
    from fairseq_el import prep_iwslt14 as p14

    src = shared_data / "iwslt14-de-en"
    tok = tmp_path / "tok"
    tok.mkdir()
    marked = {}
    for split, stem, n in (("train", "train-sample", 60), ("valid", "valid", 10), ("test", "test", 10)):
        for lang in ("de", "en"):
            with gzip.open(src / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f).rstrip("\n") for _ in range(n)]
            for i, char in enumerate(BREAKS):
                if lang == "de" or i % 2:  # every character on the source side, some on the target side
                    words = lines[i].split(" ")
                    words.insert(len(words) // 2, char)
                    lines[i] = " ".join(words)
                    marked[(split, lang, i)] = lines[i]
            (tok / f"{split}.{lang}").write_text("".join(x + "\n" for x in lines), encoding="utf-8", newline="\n")
    out = tmp_path / "out"
    rc = p14.main(["--tokenized", str(tok), "--bpe-merges", "50", "--workers", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "each became a space" in err
    meta = json.loads((out / "prep.json").read_text())
    assert meta["counts"] == {"train": 60, "valid": 10, "test": 10}
    for split, n in meta["counts"].items():
        for lang in ("de", "en"):
            assert pc.binarized_count(out / "bin" / f"{split}.de-en.{lang}") == n, (split, lang)
            lines = pc.read_lines(out / "data" / f"{split}.{lang}")
            assert len(lines) == n and not any(c in line for line in lines for c in BREAKS)
    for (split, lang, i), line in marked.items():
        assert pc.read_lines(out / "data" / f"{split}.{lang}")[i] == pc.clean_line_breaks(line)
    assert pc.normalize_raw(" a\u2028b\x85c\r ") == "a b c"


def test_binarized_counts_are_checked(shared_data, tmp_path):
    """The check after fairseq-preprocess: a text file whose line count is not what bin/ holds is one line."""
    tok = tmp_path / "text"
    tok.mkdir()
    src = shared_data / "iwslt14-de-en"
    for split, stem in (("train", "train-sample"), ("valid", "valid"), ("test", "test")):
        for lang in ("de", "en"):
            with gzip.open(src / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f).rstrip("\n") for _ in range(5)]
            if (split, lang) == ("test", "de"):
                lines[2] = lines[2].replace(" ", " \r ", 1)  # written as is: fairseq sees 6 lines
            (tok / f"{split}.{lang}").write_text("".join(x + "\n" for x in lines), encoding="utf-8", newline="\n")
    dest = tmp_path / "bin"
    from fairseq_el import prep_iwslt14 as p14

    with pytest.raises(pc.PrepError) as exc:
        pc.binarize(tok, dest, p14.TASK, 1)
    message = str(exc.value)
    assert "\n" not in message
    assert f"wrote 6 test sentences to {dest / 'test.de-en.de'}.bin but {tok / 'test.de'} has 5 lines" in message
    assert pc.binarized_count(dest / "test.de-en.en") == 5  # the other side is right


# ---------------------------------------------------------------------------
# 6. what fairseq's resume restores (the README's statement)


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
