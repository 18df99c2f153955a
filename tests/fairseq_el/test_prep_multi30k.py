"""``python -m fairseq_el.prep_multi30k`` on the shared Multi30k De-En data (CPU, a train slice)."""
import gzip
import json

import pytest

from fairseq_el import prep_common as pc
from fairseq_el import prep_multi30k as pm


def read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def prep(argv, capsys=None):
    rc = pm.main([str(a) for a in argv])
    return rc, (capsys.readouterr().err if capsys else "")


def unspm(line):
    return line.replace(" ", "").replace("\u2581", " ").strip()


@pytest.fixture(scope="module")
def m30k(shared_data):
    return shared_data / "multi30k-de-en"


def test_shared_dir_slice(m30k, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--raw", m30k, "--train-lines", 3000, "--vocab-size", 1000, "--workers", 1, "--out", out]
    rc, err = prep(argv, capsys)
    assert rc == 0, err
    meta = json.loads((out / "prep.json").read_text())
    assert {k: v for k, v in meta.items() if k not in ("args", "bpe_model")} == {
        "schema": "el-prep/1", "task": "multi30k_de_en", "src": "de", "tgt": "en", "bpe": "sentencepiece",
        "remove_bpe": "sentencepiece", "moses_tokenized": False, "lowercase": False, "bin": "bin", "text": "text",
        "references": {"valid": "text/valid.ref.en", "test": "text/test.ref.en"},
        "counts": {"train": 3000, "valid": 1014, "test": 1000}, "smoke": False}
    assert meta["args"]["test"] == ["test2016"] and meta["args"]["url"] is None
    assert read(out / "text" / "test.ref.en") == [x.strip() for x in read(m30k / "test2016.en.gz")]
    assert read(out / "text" / "valid.ref.en") == [x.strip() for x in read(m30k / "valid.en.gz")]
    assert read(out / "data" / "train.de") == [x.strip() for x in read(m30k / "train.de.gz")[:3000]]
    assert [unspm(x) for x in read(out / "text" / "test.en")] == read(out / "text" / "test.ref.en")
    assert (out / "bin" / "dict.de.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()
    assert (out / "bin" / "test.de-en.de.bin").stat().st_size > 0
    # fairseq-preprocess's own output goes to bin/preprocess.out, not to the console
    assert "Dictionary:" not in err and "fairseq_cli.preprocess" not in err
    assert "[de] Dictionary:" in (out / "bin" / "preprocess.out").read_text()
    assert "bin/: done" in err
    rc, err = prep(argv, capsys)
    assert rc == 0 and "skipping" in err


def test_tab_line_is_one_line(m30k):
    lines = pc.read_lines(m30k / "train.de.gz")
    assert len(lines) == 29000 == pc.count_lines(m30k / "train.de.gz")
    tab = [x for x in lines if "\t" in x]
    assert len(tab) == 1 and "\t" in pc.normalize_raw(tab[0])
    assert pc.normalize_raw(" a b \r") == "a b"


def test_download(m30k, tmp_path, capsys):
    """Without --raw the official files are fetched from --url (here a file:// mirror) into OUT/orig."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for ours, theirs, n in (("train", "train", 400), ("valid", "val", 40), ("test2016", "test_2016_flickr", 30)):
        for lang in ("de", "en"):
            with gzip.open(mirror / f"{theirs}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in read(m30k / f"{ours}.{lang}.gz")[:n]))
    out = tmp_path / "out"
    rc, err = prep(["--url", mirror.as_uri(), "--vocab-size", 300, "--workers", 1, "--out", out], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (out / "orig").glob("*.gz")) == sorted(p.name for p in mirror.iterdir())
    assert read(out / "text" / "test.ref.en") == [x.strip() for x in read(m30k / "test2016.en.gz")[:30]]
    assert json.loads((out / "prep.json").read_text())["counts"] == {"train": 400, "valid": 40, "test": 30}
    # a run killed while binarizing resumes there: finished stages are kept, the download reused
    text_mtimes = {p: p.stat().st_mtime_ns for p in (out / "text").iterdir()}
    (out / "bin").rename(out / "bin.partial")
    (out / "prep.json").unlink()
    rc, err = prep(["--url", mirror.as_uri(), "--vocab-size", 300, "--workers", 1, "--out", out], capsys)
    assert rc == 0, err
    assert "data/: finished before, skipping" in err and "text/: finished before, skipping" in err
    assert "bin/: building" in err and "downloading" not in err
    assert {p: p.stat().st_mtime_ns for p in (out / "text").iterdir()} == text_mtimes
    assert (out / "prep.json").is_file() and not (out / "bin.partial").exists()
    # a missing remote file is one line naming the URL
    rc, err = prep(["--url", mirror.as_uri(), "--test", "test2017", "--out", tmp_path / "out2"], capsys)
    assert rc == 1 and "prep_multi30k: error: download of" in err.strip().splitlines()[-1]
    assert "test2017.de.gz" in err


def test_misaligned_missing_and_bad_flags(m30k, tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("train", "test2016"):
        for lang in ("de", "en"):
            (src / f"{name}.{lang}.gz").write_bytes((m30k / f"{name}.{lang}.gz").read_bytes())
    (src / "valid.de.gz").write_bytes((m30k / "valid.de.gz").read_bytes())
    (src / "valid.en").write_text("".join(x + "\n" for x in read(m30k / "valid.en.gz")[1:]), encoding="utf-8")
    out = tmp_path / "out"
    rc, err = prep(["--raw", src, "--out", out], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert f"{src / 'valid.de.gz'} has 1014 lines but {src / 'valid.en'} has 1013" in err
    (src / "valid.en").unlink()
    rc, err = prep(["--raw", src, "--out", out], capsys)
    assert rc == 1 and f"missing input file: {src / 'valid.en'}" in err
    assert not out.exists()
    for flag, value in (("--vocab-size", "-5"), ("--valid", "a,,b"), ("--train-lines", "-1")):
        with pytest.raises(SystemExit) as exc:
            pm.main(["--raw", str(src), "--out", str(out), flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and flag in err and repr(value) in err
