"""``python -m fairseq_el.prep_iwslt17`` on the shared IWSLT17 Fr-En test sets (CPU, small vocabulary).

The shared data has no training set: ``--raw`` trains on the IWSLT16
tst2010-2014 files, validates on ``valid`` and tests on ``test``. The archive
path runs on a small WIT3-style archive built here from the same raw text.
"""
import gzip
import json
import tarfile
import unicodedata
from xml.sax.saxutils import escape

import pytest

from fairseq_el import prep_iwslt17 as p17

TRAIN = "iwslt16.tst2010,iwslt16.tst2011,iwslt16.tst2012,iwslt16.tst2013,iwslt16.tst2014"


def read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def prep(argv, capsys=None):
    rc = p17.main([str(a) for a in argv])
    return rc, (capsys.readouterr().err if capsys else "")


def unspm(line):
    return line.replace(" ", "").replace("\u2581", " ").strip()


@pytest.fixture(scope="module")
def fren(shared_data):
    return shared_data / "iwslt17-fr-en"


@pytest.fixture(scope="module")
def raw_out(fren, tmp_path_factory):
    out = tmp_path_factory.mktemp("p17") / "raw"
    rc, _ = prep(["--raw", fren, "--train", TRAIN, "--valid", "valid", "--test", "test",
                  "--vocab-size", 1000, "--workers", 1, "--out", out])
    assert rc == 0
    return out


def test_raw_layout_and_prep_json(raw_out, fren):
    out = raw_out
    meta = json.loads((out / "prep.json").read_text())
    n_train = sum(len(read(fren / f"{n}.en.gz")) for n in TRAIN.split(","))
    assert {k: v for k, v in meta.items() if k not in ("args", "bpe_model")} == {
        "schema": "el-prep/1", "task": "iwslt17_fr_en", "src": "fr", "tgt": "en", "bpe": "sentencepiece",
        "remove_bpe": "sentencepiece", "moses_tokenized": False, "lowercase": False, "bin": "bin", "text": "text",
        "references": {"valid": "text/valid.ref.en", "test": "text/test.ref.en"},
        "counts": {"train": n_train, "valid": 887, "test": 1455}}
    assert meta["args"]["train"] == TRAIN.split(",") and meta["args"]["vocab_size"] == 1000
    assert meta["args"]["archive"] is None
    assert (out / meta["bpe_model"]).is_file()
    # references: the raw English test/valid text; the BPE'd text decodes back to it
    assert read(out / "text" / "test.ref.en") == read(fren / "test.en.gz")
    assert read(out / "text" / "valid.ref.en") == read(fren / "valid.en.gz")
    assert [unspm(x) for x in read(out / "text" / "test.en")] == read(fren / "test.en.gz")
    # sentencepiece's default normalization is NFKC (e.g. "km²" -> "km2")
    decoded = [unspm(x) for x in read(out / "text" / "train.fr")[:1664]]
    raw = [unicodedata.normalize("NFKC", x) for x in read(fren / "iwslt16.tst2010.fr.gz")]
    assert decoded == raw
    assert all("\u2581" in x for x in read(out / "text" / "test.fr")[:50])
    # one shared dictionary (--share-all-embeddings), binarized splits
    assert (out / "bin" / "dict.fr.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()
    for split in ("train", "valid", "test"):
        for lang in ("fr", "en"):
            assert (out / "bin" / f"{split}.fr-en.{lang}.bin").stat().st_size > 0


def test_raw_rerun_skips(raw_out, fren, capsys):
    rc, err = prep(["--raw", fren, "--train", TRAIN, "--valid", "valid", "--test", "test",
                    "--vocab-size", 1000, "--out", raw_out], capsys)
    assert rc == 0 and "skipping" in err
    rc, err = prep(["--raw", fren, "--train", TRAIN, "--valid", "valid", "--test", "tst2016",
                    "--vocab-size", 1000, "--out", raw_out], capsys)
    assert rc == 1 and "--test" in err and "--force" in err


def _xml(segs, lang, setid):
    tag = "srcset" if lang == "fr" else "refset"
    entities = {'"': "&quot;", "'": "&apos;"}
    body = "\n".join(f'<seg id="{i}">{escape(s, entities)}</seg>' for i, s in enumerate(segs, 1))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<{tag} setid="{setid}" srclang="french">\n'
            f'<doc docid="1" genre="lectures">\n<url>http://www.ted.com/talks/1</url>\n<talkid>1</talkid>\n'
            f"<title>A talk</title>\n{body}\n</doc>\n</{tag}>\n</mteval>\n")


def make_archive(fren, root, n_train=150, n_seg=25):
    """fr-en/{train.tags.fr-en.*, IWSLT17.TED.{dev2010,tst2011,tst2012}.fr-en.*.xml} from the shared text."""
    d = root / "fr-en"
    d.mkdir(parents=True)
    for lang in ("fr", "en"):
        train = read(fren / f"iwslt16.tst2010.{lang}.gz")[:n_train]
        head = ['<doc docid="1" genre="lectures">', "<url>http://www.ted.com/talks/1</url>",
                "<keywords>talks</keywords>", "<speaker>A Speaker</speaker>", "<talkid>1</talkid>",
                f"<title>{train[0]}</title>", f"<description>{train[1]}</description>",
                '<reviewer href="http://www.ted.com/x">R</reviewer>', '<translator href="http://x">T</translator>']
        lines = head + ["  " + x for x in train[2:]] + ["", "</doc>"]
        (d / f"train.tags.fr-en.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name, source in (("dev2010", "valid"), ("tst2011", "iwslt16.tst2011"), ("tst2012", "iwslt16.tst2012")):
            segs = read(fren / f"{source}.{lang}.gz")[:n_seg]
            (d / f"IWSLT17.TED.{name}.fr-en.{lang}.xml").write_text(_xml(segs, lang, name), encoding="utf-8")


def test_archive_end_to_end(fren, tmp_path, capsys):
    make_archive(fren, tmp_path / "src")
    tgz = tmp_path / "fr-en.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "fr-en", arcname="fr-en")
    out = tmp_path / "out"
    # the default test sets (tst2010-2015) are not all in this archive
    rc, err = prep(["--archive", tgz, "--out", out], capsys)
    assert rc == 1 and "lacks IWSLT17.TED.tst2010.fr-en.fr.xml" in err and not out.exists()
    rc, err = prep(["--archive", tgz, "--test-sets", "tst2012,tst2011", "--vocab-size", 250,
                    "--workers", 1, "--out", out], capsys)
    assert rc == 0, err
    for lang in ("fr", "en"):
        # tag lines dropped, title/description text kept, whitespace stripped, the empty line dropped
        assert read(out / "data" / f"train.{lang}") == read(fren / f"iwslt16.tst2010.{lang}.gz")[:150]
        assert read(out / "data" / f"valid.{lang}") == read(fren / f"valid.{lang}.gz")[:25]
        # test sets in the order given, XML entities unescaped
        assert read(out / "data" / f"test.{lang}") == (read(fren / f"iwslt16.tst2012.{lang}.gz")[:25]
                                                       + read(fren / f"iwslt16.tst2011.{lang}.gz")[:25])
    assert read(out / "text" / "test.ref.en") == read(out / "data" / "test.en")
    assert "&apos;" in (tmp_path / "src" / "fr-en" / "IWSLT17.TED.tst2012.fr-en.fr.xml").read_text()
    meta = json.loads((out / "prep.json").read_text())
    assert meta["counts"] == {"train": 150, "valid": 25, "test": 50}
    assert meta["args"]["test_sets"] == ["tst2012", "tst2011"] and meta["args"]["raw"] is None


def test_misaligned_and_missing_refused(fren, tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("valid", "test"):
        for lang in ("fr", "en"):
            (src / f"{name}.{lang}").write_text("".join(x + "\n" for x in read(fren / f"{name}.{lang}.gz")))
    lines = read(fren / "iwslt16.tst2011.en.gz")
    (src / "a.fr.gz").write_bytes((fren / "iwslt16.tst2011.fr.gz").read_bytes())
    with gzip.open(src / "a.en.gz", "wt", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in lines[:400] + lines[401:]))
    out = tmp_path / "out"
    rc, err = prep(["--raw", src, "--train", "a", "--out", out], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert f"{src / 'a.fr.gz'} has 818 lines but {src / 'a.en.gz'} has 817" in err
    rc, err = prep(["--raw", src, "--train", "a,b", "--out", out], capsys)
    assert rc == 1 and f"missing input file: {src / 'b.fr'}" in err
    assert not out.exists()


def test_vocab_size_errors(fren, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        p17.main(["--raw", str(fren), "--vocab-size", "-5", "--out", "o"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--vocab-size" in err and "'-5'" in err
    rc, err = prep(["--raw", fren, "--train", "iwslt16.tst2011", "--train-lines", 50, "--vocab-size", 100000,
                    "--workers", 1, "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "--vocab-size 100000 is too large" in err.splitlines()[-1]
