"""``python -m fairseq_el.prep_iwslt14`` on the shared IWSLT14 data (CPU, small slices).

- the tokenization reproduces fairseq's tokenized test set from the raw test text;
- ``--tokenized`` on the 4,600-pair train sample: layout, prep.json, rerun skip,
  refusal of other arguments, ``--force`` with the shared BPE codes;
- the archive path end to end on a small archive built here from the shared
  raw test text (tag lines, cleaning, every-23rd valid, test set order);
- misaligned and missing inputs and bad flags are refused with one line.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from xml.sax.saxutils import escape

import pytest

from fairseq_el import prep_iwslt14 as p14

from helpers import ROOT

TEST_SETS = [("IWSLT14.TED.dev2010", 887), ("IWSLT14.TEDX.dev2012", 1165), ("IWSLT14.TED.tst2010", 1565),
             ("IWSLT14.TED.tst2011", 1433), ("IWSLT14.TED.tst2012", 1700)]


def read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def prep(argv, capsys=None):
    """Run the command in-process; returns (exit status, stderr when capsys is given)."""
    rc = p14.main([str(a) for a in argv])
    return rc, (capsys.readouterr().err if capsys else "")


def unbpe(line):
    return (line + " ").replace("@@ ", "").rstrip()


@pytest.fixture(scope="module")
def iwslt(shared_data):
    return shared_data / "iwslt14-de-en"


def test_tokenize_lines_reproduces_fairseq_test(iwslt):
    for lang in ("de", "en"):
        raw, ref = read(iwslt / f"test.raw.{lang}.gz"), read(iwslt / f"test.{lang}.gz")
        out = p14.tokenize_lines(raw, lang, xml=True)
        assert len(out) == len(ref) == 6750
        same = sum(a == b for a, b in zip(out, ref))
        # the few misses are segments with &amp;/&gt;, which fairseq tokenized escaped (see MANIFEST)
        assert same >= 6745, (lang, same)


def test_clean_pairs_follows_clean_corpus_n():
    src = ["a b c", "", "a " * 176, "a b c d", "x", "a b"]
    tgt = ["a b", "a", "a " * 176, "a b", "y", "a " + "w" * 1001]
    assert p14.clean_pairs(src, tgt) == [0, 4]  # 3/2 = 1.5 is not above the ratio


# ---------------------------------------------------------------------------
# --tokenized


@pytest.fixture(scope="module")
def tokenized_out(iwslt, tmp_path_factory):
    out = tmp_path_factory.mktemp("p14") / "tok"
    rc, _ = prep(["--tokenized", iwslt, "--valid-lines", 300, "--test-lines", 100,
                  "--bpe-merges", 300, "--workers", 1, "--out", out])
    assert rc == 0
    return out


def test_tokenized_layout_and_prep_json(tokenized_out, iwslt):
    out = tokenized_out
    meta = json.loads((out / "prep.json").read_text())
    assert {k: meta[k] for k in ("schema", "task", "src", "tgt", "bpe", "remove_bpe", "moses_tokenized",
                                 "lowercase", "bin", "text", "references", "counts")} == {
        "schema": "el-prep/1", "task": "iwslt14_de_en", "src": "de", "tgt": "en", "bpe": "subword_nmt",
        "remove_bpe": "subword_nmt", "moses_tokenized": True, "lowercase": True, "bin": "bin", "text": "text",
        "references": {}, "counts": {"train": 4600, "valid": 300, "test": 100}}
    assert meta["args"]["bpe_merges"] == 300 and meta["args"]["tokenized"] == str(iwslt.resolve())
    assert len(read(out / "bpe" / "code")) == 301  # "#version" line + 300 merges
    stems = {"train": "train-sample", "valid": "valid", "test": "test"}
    for split, n in meta["counts"].items():
        for lang in ("de", "en"):
            text = read(out / "text" / f"{split}.{lang}")
            assert [unbpe(x) for x in text] == read(iwslt / f"{stems[split]}.{lang}.gz")[:n]
            for ext in ("bin", "idx"):
                assert (out / "bin" / f"{split}.de-en.{lang}.{ext}").stat().st_size > 0
    assert not list((out / "text").glob("*.ref.*"))
    assert any("@@" in x for x in read(out / "text" / "train.de"))
    assert (out / "bin" / "dict.de.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()


def test_rerun_skips_and_other_args_refused(tokenized_out, iwslt, capsys):
    out = tokenized_out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc, err = prep(["--tokenized", iwslt, "--valid-lines", 300, "--test-lines", 100,
                    "--bpe-merges", 300, "--workers", 2, "--out", out], capsys)
    assert rc == 0 and "skipping" in err
    rc, err = prep(["--tokenized", iwslt, "--valid-lines", 300, "--test-lines", 100,
                    "--bpe-merges", 200, "--out", out], capsys)
    assert rc == 1 and "--bpe-merges" in err and "--force" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_force_with_shared_bpe_codes(iwslt, tmp_path, capsys):
    out = tmp_path / "out"
    small = ["--tokenized", iwslt, "--train-lines", 200, "--valid-lines", 20, "--test-lines", 20,
             "--workers", 1, "--out", out]
    assert prep(small + ["--bpe-merges", 50])[0] == 0
    rc, err = prep(small + ["--bpe-codes", iwslt / "code.gz"], capsys)
    assert rc == 1 and "--bpe-codes" in err
    rc, err = prep(small + ["--bpe-codes", iwslt / "code.gz", "--force"], capsys)
    assert rc == 0, err
    assert read(out / "bpe" / "code") == read(iwslt / "code.gz")
    from subword_nmt.apply_bpe import BPE

    with gzip.open(iwslt / "code.gz", "rt", encoding="utf-8") as f:
        bpe = BPE(f)
    assert read(out / "text" / "test.en") == [bpe.process_line(x) for x in read(iwslt / "test.en.gz")[:20]]
    meta = json.loads((out / "prep.json").read_text())
    assert meta["counts"] == {"train": 200, "valid": 20, "test": 20}
    assert meta["args"]["bpe_codes"] == str((iwslt / "code.gz").resolve())


# ---------------------------------------------------------------------------
# the archive path, on an archive made from the shared raw test text


def _xml(segs, lang, setid):
    """A WIT3 XML test file: documents of up to 100 segments, text XML-escaped."""
    tag = "srcset" if lang == "de" else "refset"
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>",
             f'<{tag} setid="{setid}" srclang="german" trglang="english">']
    for doc, start in enumerate(range(0, len(segs), 100), 1):
        parts += [f'<doc docid="{doc}" genre="lectures">', f"<url>http://www.ted.com/talks/{doc}.html</url>",
                  "<description>TED Talk Subtitles and Transcript: a talk</description>",
                  "<keywords>talks, science</keywords>", f"<talkid>{doc}</talkid>", "<title>A talk</title>"]
        parts += [f'<seg id="{i}"> {escape(s)} </seg>' for i, s in enumerate(segs[start:start + 100], 1)]
        parts.append("</doc>")
    return "\n".join(parts + [f"</{tag}>", "</mteval>", ""])


def make_archive(iwslt, root, test_segments=None, drop_en_line=None):
    """de-en/{train.tags.de-en.*, IWSLT14.*.xml} from the raw test text; returns the expected
    training content as indices into the test files (None = a pair that cleaning drops)."""
    raw = {lang: read(iwslt / f"test.raw.{lang}.gz") for lang in ("de", "en")}
    usable = [i for i in range(5050, 6750)
              if not any(c in raw[lang][i] for lang in ("de", "en") for c in "’&<>")]
    lines = {"de": [], "en": []}
    expected = []

    def add(de, en, index):
        lines["de"].append(de)
        lines["en"].append(en)
        expected.append(index)

    it = iter(usable)
    for talk in range(3):
        for tag in ("url", "keywords", "talkid"):
            for lang in ("de", "en"):
                lines[lang].append(f"<{tag}>{talk} {tag} {lang}</{tag}>")
        for tag in ("title", "description"):
            i = next(it)
            add(f"<{tag}>{raw['de'][i]}</{tag}>", f"<{tag}>{raw['en'][i]}</{tag}>", i)
        for _ in range(40):
            i = next(it)
            add(raw["de"][i], raw["en"][i], i)
        add("", "Hello.", None)                                       # an empty side
        add(" ".join(["Wort"] * 180) + ".", " ".join(["word"] * 180) + ".", None)  # too long
        add("Ja, ja, ja, ja, ja.", "Yes.", None)                      # ratio above 1.5
    if drop_en_line is not None:
        del lines["en"][drop_en_line]
    d = root / "de-en"
    d.mkdir(parents=True)
    for lang in ("de", "en"):
        (d / f"train.tags.de-en.{lang}").write_text("\n".join(lines[lang]) + "\n", encoding="utf-8")
        start = 0
        for name, n in TEST_SETS:
            segs = raw[lang][start:start + n][:test_segments]
            (d / f"{name}.de-en.{lang}.xml").write_text(_xml(segs, lang, name), encoding="utf-8")
            start += n
    return expected


def test_archive_end_to_end(iwslt, tmp_path):
    expected = make_archive(iwslt, tmp_path / "src")
    tgz = tmp_path / "de-en.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "de-en", arcname="de-en")
    out = tmp_path / "out"
    rc, _ = prep(["--archive", tgz.as_uri(), "--bpe-merges", 200, "--workers", 2, "--out", out])
    assert rc == 0
    assert (out / "orig" / "de-en.tgz").read_bytes() == tgz.read_bytes()  # downloaded (file:// URL)

    tok = {lang: read(iwslt / f"test.{lang}.gz") for lang in ("de", "en")}
    raw_en = read(iwslt / "test.raw.en.gz")
    # test: the five sets in fairseq's order, byte-identical to fairseq's tokenized test set
    for lang in ("de", "en"):
        assert read(out / "data" / f"test.{lang}") == tok[lang]
    assert read(out / "text" / "test.ref.en") == raw_en

    # train/valid: tag lines dropped, title/description kept, clean-corpus, every 23rd pair to valid
    def keep(i):
        if i is None:
            return False
        n, m = len(tok["de"][i].split()), len(tok["en"][i].split())
        return 1 <= n <= 175 and 1 <= m <= 175 and n / m <= 1.5 and m / n <= 1.5

    kept = [i for i in expected if keep(i)]
    valid, train = kept[22::23], [i for k, i in enumerate(kept, 1) if k % 23]
    assert len(valid) >= 4
    for lang in ("de", "en"):
        assert read(out / "data" / f"train.{lang}") == [tok[lang][i] for i in train]
        assert read(out / "data" / f"valid.{lang}") == [tok[lang][i] for i in valid]
    assert read(out / "text" / "valid.ref.en") == [raw_en[i] for i in valid]

    meta = json.loads((out / "prep.json").read_text())
    assert meta["references"] == {"valid": "text/valid.ref.en", "test": "text/test.ref.en"}
    assert meta["counts"] == {"train": len(train), "valid": len(valid), "test": 6750}
    assert meta["args"]["archive"] == tgz.as_uri()
    for split in ("train", "valid", "test"):
        assert (out / "bin" / f"{split}.de-en.en.bin").is_file()


def test_archive_misaligned_refused(iwslt, tmp_path, capsys):
    make_archive(iwslt, tmp_path / "src", test_segments=5, drop_en_line=20)
    out = tmp_path / "out"
    rc, err = prep(["--archive", tmp_path / "src", "--out", out], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "misaligned" in err and "train.tags.de-en.de has 144 lines" in err and "train.tags.de-en.en has 143" in err
    assert not out.exists()


# ---------------------------------------------------------------------------
# refusals


def test_misaligned_tokenized_refused_before_any_output(iwslt, tmp_path, capsys):
    src = tmp_path / "tok"
    src.mkdir()
    for name in ("train-sample.de.gz", "train-sample.en.gz", "valid.de.gz", "test.de.gz", "test.en.gz"):
        shutil.copy(iwslt / name, src / name)
    (src / "valid.en").write_text("".join(x + "\n" for x in read(iwslt / "valid.en.gz")[:-1]), encoding="utf-8")
    out = tmp_path / "out"
    rc, err = prep(["--tokenized", src, "--out", out], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert f"{src / 'valid.de.gz'} has 7283 lines but {src / 'valid.en'} has 7282" in err
    assert not out.exists()


def test_missing_inputs_refused(iwslt, tmp_path, capsys):
    src = tmp_path / "tok"
    src.mkdir()
    shutil.copy(iwslt / "valid.de.gz", src / "valid.de.gz")
    rc, err = prep(["--tokenized", src, "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "missing input file" in err and "train" in err and err.count("\n") == 1
    rc, err = prep(["--tokenized", iwslt, "--bpe-codes", tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert rc == 1 and f"missing input file: {tmp_path / 'nope'}" in err
    (tmp_path / "codes").write_text("#version: 0.2\na b\nnot a merge\n")
    rc, err = prep(["--tokenized", iwslt, "--bpe-codes", tmp_path / "codes", "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "line 3 is not a merge" in err and err.count("\n") == 1
    rc, err = prep(["--archive", tmp_path / "nope.tgz", "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "nope.tgz" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--bpe-merges", "0"), ("--workers", "-1"), ("--test-lines", "x")])
def test_bad_flags_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        p14.main(["--tokenized", "d", "--out", "o", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and flag in err and repr(value) in err


def test_slice_beyond_split_refused(iwslt, tmp_path, capsys):
    rc, err = prep(["--tokenized", iwslt, "--test-lines", 7000, "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "--test-lines 7000" in err and "6750" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_help_and_light_imports():
    """--help shows the defaults; the prep modules import neither torch nor fairseq."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fairseq_el.prep_iwslt14", "--help"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "default: 10000" in proc.stdout and "de-en.tgz" in proc.stdout
    code = (
        "import sys, types; pkg = types.ModuleType('fairseq_el'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['fairseq_el'] = pkg;"
        "import fairseq_el.prep_iwslt14, fairseq_el.prep_iwslt17, fairseq_el.prep_multi30k;"
        "bad = [m for m in ('torch', 'fairseq', 'sacremoses', 'subword_nmt') if m in sys.modules];"
        "sys.exit(str(bad) if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "fairseq_el")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
