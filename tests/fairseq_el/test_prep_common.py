"""fairseq_el.prep_common, the data preparation's shared steps, when things go wrong: a full disk while
sentencepiece trains or fairseq-preprocess binarizes (one line, nothing a rerun takes as finished: the truncated
``spm.model`` the probe found), line-break characters inside a sentence (source and target stay aligned in
``bin/``), and the binarized sentence counts checked against the text."""
import gzip
import json
import shutil
import subprocess
import sys

import pytest

from fairseq_el import prep_common as pc

from confined import run_confined
from helpers import ROOT, command_env, error_lines

#: what splitlines() takes for a line end, besides "\n"
BREAKS = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def _env(**extra):
    return command_env(threads=1, **extra)


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
