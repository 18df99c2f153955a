"""``python -m fairseq_el.prep_iwslt17`` on the shared IWSLT17 Fr-En test sets (CPU, small vocabulary).

The shared data has no training set: ``--raw`` trains on the IWSLT16
tst2010-2014 files, validates on ``valid`` and tests on ``test``. The archive
path runs on a small WIT3-style training archive built here from the same raw
text, and on evaluation archives (``fr-en.tgz``, ``en-fr.tgz``) holding the
shared tst2017 (``test.{fr,en}.gz``) as IWSLT17 XML.
"""
import gzip
import json
import tarfile
import unicodedata
from xml.sax.saxutils import escape

import pytest

from fairseq_el import prep_common as pc
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
    assert {k: v for k, v in meta.items() if k not in ("args", "bpe_model", "smoke")} == {
        "schema": "el-prep/1", "task": "iwslt17_fr_en", "src": "fr", "tgt": "en", "bpe": "sentencepiece",
        "remove_bpe": "sentencepiece", "moses_tokenized": False, "lowercase": False, "bin": "bin", "text": "text",
        "references": {"valid": "text/valid.ref.en", "test": "text/test.ref.en"},
        "counts": {"train": n_train, "valid": 887, "test": 1455},
        "test_set": "raw text test", "valid_set": "raw text valid"}
    assert not meta.get("smoke")
    assert meta["args"]["train"] == TRAIN.split(",") and meta["args"]["vocab_size"] == 1000
    assert meta["args"]["archive"] is None and meta["args"]["test_set"] is None
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


def _xml(segs, lang, setid, talk=100, first_doc=1):
    """WIT3 XML of ``segs``: a ``<doc>`` (talk) every ``talk`` segments, docids from ``first_doc``."""
    tag = "srcset" if lang in ("fr", "src") else "refset"
    entities = {'"': "&quot;", "'": "&apos;"}
    docs = []
    for d, start in enumerate(range(0, len(segs), talk)):
        body = "\n".join(f'<seg id="{i}">{escape(x, entities)}</seg>'
                         for i, x in enumerate(segs[start:start + talk], 1))
        docs.append(f'<doc docid="{first_doc + d}" genre="lectures">\n<url>http://www.ted.com/talks/{d}</url>\n'
                    f"<talkid>{first_doc + d}</talkid>\n<title>A talk</title>\n{body}\n</doc>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<{tag} setid="{setid}" srclang="french">\n'
            + "\n".join(docs) + f"\n</{tag}>\n</mteval>\n")


#: the training archive's XML sets here: (IWSLT17 name, shared file stem it is made from)
ARCHIVE_SETS = (("dev2010", "valid"), ("tst2010", "iwslt16.tst2010"), ("tst2011", "iwslt16.tst2011"),
                ("tst2012", "iwslt16.tst2012"), ("tst2013", "iwslt16.tst2013"), ("tst2014", "iwslt16.tst2014"),
                ("tst2015", "tst2016"))  # no tst2015 in the shared data: tst2016's text stands in for it


def make_archive(fren, root, n_train=150, n_seg=25):
    """fr-en/{train.tags.fr-en.*, IWSLT17.TED.{dev2010,tst2010..tst2015}.fr-en.*.xml} from the shared text
    (the first ``n_seg`` segments of each set)."""
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
        for name, source in ARCHIVE_SETS:
            segs = read(fren / f"{source}.{lang}.gz")[:n_seg]
            (d / f"IWSLT17.TED.{name}.fr-en.{lang}.xml").write_text(_xml(segs, lang, name, talk=10),
                                                                    encoding="utf-8")


def _tgz(directory, tgz):
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return tgz


def make_test_archives(fren, root, en_lines=None):
    """The IWSLT17 evaluation archives as WIT3 ships them: fr-en.tgz holds the French side of tst2017
    (and tst2016), en-fr.tgz the English side (the source of the en-fr direction), made from the shared
    tst2017 (``test.{fr,en}.gz``) and tst2016; returns (fr-en.tgz, en-fr.tgz)."""
    out = []
    for pair, lang in (("fr-en", "fr"), ("en-fr", "en")):
        d = root / pair
        d.mkdir(parents=True)
        for year, stem in (("2016", "tst2016"), ("2017", "test")):
            segs = read(fren / f"{stem}.{lang}.gz")
            if en_lines is not None and lang == "en" and year == "2017":
                segs = en_lines(segs)
            (d / f"IWSLT17.TED.tst{year}.{pair}.{lang}.xml").write_text(
                _xml(segs, "src", f"IWSLT17.TED.tst{year}"), encoding="utf-8")
        out.append(_tgz(d, root / f"{pair}.tgz"))
    return tuple(out)


@pytest.fixture(scope="module")
def archives(fren, tmp_path_factory):
    """(training archive, fr-en evaluation archive, en-fr evaluation archive), all tarballs."""
    root = tmp_path_factory.mktemp("archives")
    make_archive(fren, root / "train")
    return (_tgz(root / "train" / "fr-en", root / "fr-en.tgz"), *make_test_archives(fren, root / "test"))


@pytest.fixture(scope="module")
def default_out(archives, tmp_path_factory):
    train, fr_en, en_fr = archives
    out = tmp_path_factory.mktemp("p17") / "default"
    rc, _ = prep(["--archive", train, "--test-archives", fr_en, en_fr, "--vocab-size", 250, "--workers", 1,
                  "--out", out])
    assert rc == 0
    return out


def test_the_default_test_set_is_the_official_tst2017(default_out, archives, fren):
    """No --test-set: test = IWSLT17.TED.tst2017 (the 1,455 pairs sacrebleu -t iwslt17 -l fr-en scores,
    here the shared test.{fr,en}.gz), tokenised and BPE'd as the module does; valid = dev2010 + tst2010-2015."""
    out = default_out
    meta = json.loads((out / "prep.json").read_text())
    assert meta["test_set"] == "IWSLT17.TED.tst2017"
    assert meta["valid_set"] == "IWSLT17.TED.dev2010+tst2010+tst2011+tst2012+tst2013+tst2014+tst2015"
    assert meta["counts"] == {"train": 150, "valid": 7 * 25, "test": 1455}
    assert meta["args"]["test_set"] == "tst2017"
    assert meta["args"]["test_archives"] == [str(a.resolve()) for a in archives[1:]]
    shared = {lang: read(fren / f"test.{lang}.gz") for lang in ("fr", "en")}
    assert len(shared["fr"]) == len(shared["en"]) == 1455
    for lang in ("fr", "en"):
        # raw text: XML entities unescaped, exactly the shared files
        assert read(out / "data" / f"test.{lang}") == shared[lang]
        # BPE'd with the run's own sentencepiece model, as the module applies it
        assert read(out / "text" / f"test.{lang}") == pc.encode_sentencepiece(out / "bpe" / "spm.model",
                                                                              shared[lang], 1)
        assert pc.binarized_count(out / "bin" / f"test.fr-en.{lang}") == 1455
    assert read(out / "text" / "test.ref.en") == shared["en"]
    valid = [x for _, stem in ARCHIVE_SETS for x in read(fren / f"{stem}.en.gz")[:25]]
    assert read(out / "data" / "valid.en") == valid
    # train: tag lines dropped, title/description text kept, whitespace stripped, the empty line dropped
    for lang in ("fr", "en"):
        assert read(out / "data" / f"train.{lang}") == read(fren / f"iwslt16.tst2010.{lang}.gz")[:150]


def test_test_set_tst2010_2015_gives_the_earlier_split(default_out, archives, fren, tmp_path, capsys):
    train, fr_en, en_fr = archives
    # a finished preparation is not silently turned into another split
    with pytest.raises(SystemExit) as exc:
        prep(["--archive", train, "--test-archives", fr_en, en_fr, "--test-set", "tst2010-2015",
              "--vocab-size", 250, "--out", default_out])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--test-archives goes with --test-set tst2017" in err
    rc, err = prep(["--archive", train, "--test-set", "tst2010-2015", "--vocab-size", 250, "--out", default_out],
                   capsys)
    assert rc == 1 and err.count("\n") == 1 and "--force" in err and "other arguments" in err
    out = tmp_path / "old"
    # the evaluation archives are neither needed nor fetched (the default URLs would fail here, offline)
    rc, err = prep(["--archive", train, "--test-set", "tst2010-2015", "--vocab-size", 250, "--workers", 1,
                    "--out", out], capsys)
    assert rc == 0, err
    meta = json.loads((out / "prep.json").read_text())
    assert meta["test_set"] == "IWSLT17.TED.tst2010+tst2011+tst2012+tst2013+tst2014+tst2015"
    assert meta["valid_set"] == "IWSLT17.TED.dev2010"
    assert meta["counts"] == {"train": 150, "valid": 25, "test": 6 * 25}
    assert meta["args"]["test_archives"] is None and meta["args"]["valid_sets"] == ["dev2010"]
    assert not (out / "orig").exists()
    for lang in ("fr", "en"):
        assert read(out / "data" / f"valid.{lang}") == read(fren / f"valid.{lang}.gz")[:25]
        # test sets in order, XML entities unescaped
        assert read(out / "data" / f"test.{lang}") == [x for _, stem in ARCHIVE_SETS[1:]
                                                       for x in read(fren / f"{stem}.{lang}.gz")[:25]]
    assert read(out / "text" / "test.ref.en") == read(out / "data" / "test.en")
    assert "&apos;" in (archives[0].parent / "train" / "fr-en" / "IWSLT17.TED.tst2012.fr-en.fr.xml").read_text()
    # --valid-sets replaces the split's valid sets
    rc, err = prep(["--archive", train, "--test-archives", fr_en, en_fr, "--valid-sets", "tst2015,dev2010",
                    "--vocab-size", 250, "--workers", 1, "--out", tmp_path / "valid"], capsys)
    assert rc == 0, err
    meta = json.loads((tmp_path / "valid" / "prep.json").read_text())
    assert meta["valid_set"] == "IWSLT17.TED.tst2015+dev2010" and meta["counts"]["valid"] == 50
    assert meta["test_set"] == "IWSLT17.TED.tst2017" and meta["counts"]["test"] == 1455


def test_smoke_preparation(archives, tmp_path, capsys):
    """--smoke: SMOKE's flags first (explicit flags win), the default test set cut to 500 pairs, the task
    named iwslt17_fr_en_smoke."""
    train, fr_en, en_fr = archives
    rc, err = prep(["--smoke", "--archive", train, "--test-archives", fr_en, en_fr, "--train-lines", 100,
                    "--valid-lines", 0, "--vocab-size", 250, "--workers", 1, "--out", tmp_path / "smoke"], capsys)
    assert rc == 0, err
    meta = json.loads((tmp_path / "smoke" / "prep.json").read_text())
    assert meta["task"] == "iwslt17_fr_en_smoke" and meta["smoke"] is True
    assert meta["test_set"] == "IWSLT17.TED.tst2017"
    assert meta["counts"] == {"train": 100, "valid": 7 * 25, "test": 500}


def test_test_set_errors_are_one_line(archives, fren, tmp_path, capsys):
    train, fr_en, en_fr = archives
    out = tmp_path / "out"
    usage = [
        (["--archive", train, "--test-set", "tst2016"], ["--test-set", "'tst2016'", "tst2017", "tst2010-2015"]),
        (["--archive", train, "--test-set", ""], ["--test-set", "''"]),
        (["--raw", fren, "--test-set", "tst2017"], ["--test-set", "with --raw"]),
        (["--raw", fren, "--test-archives", fr_en, en_fr], ["--test-archives", "with --raw"]),
        (["--archive", train, "--test-archives", fr_en], ["--test-archives", "expected 2 arguments"]),
        (["--archive", train, "--test-set", "tst2010-2015", "--valid-sets", "dev2010,tst2013"],
         ["--valid-sets dev2010,tst2013: tst2013 is also in the test set (--test-set tst2010-2015)"]),
    ]
    for args, needles in usage:
        with pytest.raises(SystemExit) as exc:
            p17.main([str(a) for a in args] + ["--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert all(n in err for n in needles), (args, err)
    # inputs: each refused in one line before anything is written
    misaligned = make_test_archives(fren, tmp_path / "misaligned", en_lines=lambda lines: lines[:-1])
    make_test_archives(fren, tmp_path / "talks")  # then one talk's docid changed on the English side
    fr_xml = "IWSLT17.TED.tst2017.fr-en.fr.xml"
    text = (tmp_path / "talks" / "en-fr" / "IWSLT17.TED.tst2017.en-fr.en.xml").read_text()
    (tmp_path / "talks" / "en-fr" / "IWSLT17.TED.tst2017.en-fr.en.xml").write_text(
        text.replace('<doc docid="3"', '<doc docid="33"'))
    cases = [
        ([tmp_path / "absent.tgz", en_fr], f"missing input: {tmp_path / 'absent.tgz'}"),
        ([fr_en, fr_en], f"{fr_en} lacks IWSLT17.TED.tst2017.en-fr.en.xml"),
        ([en_fr, en_fr], f"{en_fr} lacks {fr_xml}"),
        (misaligned, "has 1455 <seg> elements but"),
        ([fr_en, tmp_path / "talks" / "en-fr"], "are not the same talks: document 3 is docid 3 in the first, "
                                                "33 in the second"),
    ]
    for test_archives, needle in cases:
        rc, err = prep(["--archive", train, "--test-archives", *test_archives, "--out", out], capsys)
        assert rc == 1 and err.count("\n") == 1 and needle in err, (test_archives, err)
    assert not out.exists()


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
