"""IWSLT17 French-English: cased raw text, joint sentencepiece BPE, shared dictionary.

No Moses tokenization and no lowercasing: a joint sentencepiece model
(``model_type=bpe``, 16,000 pieces by default) is trained on train fr+en and
applied to every split, then ``fairseq-preprocess --joined-dictionary`` (so
``--share-all-embeddings`` works). Decode with ``--remove-bpe sentencepiece``;
the references (``text/{valid,test}.ref.en``) are the raw English text.

The split (``--test-set``, recorded in ``prep.json`` as ``test_set`` and
``valid_set``):

- ``tst2017`` (the default): test = IWSLT17.TED.tst2017, the official IWSLT
  2017 test set (1,455 pairs; what ``sacrebleu -t iwslt17 -l fr-en`` scores),
  from the IWSLT17 evaluation archives (``--test-archives``: the French side
  is ``IWSLT17.TED.tst2017.fr-en.fr.xml`` of ``fr-en.tgz``, the English side
  ``IWSLT17.TED.tst2017.en-fr.en.xml`` of ``en-fr.tgz``, as sacrebleu takes
  them); valid = dev2010 and tst2010-tst2015 of the training archive,
  concatenated: the ``VALID_SETS`` of fairseq's IWSLT17 example
  (``examples/translation/prepare-iwslt17-multilingual.sh``, which has no test
  split of its own and scores tst2017 with ``sacrebleu --test-set iwslt17``;
  as shipped, that script writes each set over the previous one, so its valid
  file ends up holding tst2015 alone: we take the list it names);
- ``tst2010-2015``: this project's earlier split: test = tst2010-tst2015 of
  the training archive concatenated, valid = dev2010. Neither fairseq's
  convention nor an official test set.

Inputs, one of:

- ``--archive``: the WIT3 training archive ``fr-en.tgz`` (URL, tarball or
  directory). train = ``train.tags.fr-en.*`` without its tag lines (``<url>``,
  ``<talkid>``, ``<keywords>``, ``<speaker>``, ``<reviewer>``, ``<translator>``,
  ``<doc>``; ``<title>``/``<description>`` tags removed, text kept, as fairseq's
  ``prepare-iwslt17-multilingual.sh``); valid/test = the ``<seg>`` texts
  (entities unescaped, whitespace collapsed) of the XML sets above.
  ``--valid-sets`` replaces the valid sets.
- ``--raw DIR``: line-aligned raw text ``DIR/NAME.{fr,en}[.gz]``; ``--train``,
  ``--valid``, ``--test`` name the files of each split (comma-separated,
  concatenated); ``prep.json`` then records the file names. E.g. with
  ``shared/data/iwslt17-fr-en`` (test sets only; ``test`` is tst2017)::

    python -m fairseq_el.prep_iwslt17 --raw ../shared/data/iwslt17-fr-en \\
        --train iwslt16.tst2010,iwslt16.tst2011,iwslt16.tst2012,iwslt16.tst2013,iwslt16.tst2014 \\
        --valid valid --test test --vocab-size 1000 --out data/iwslt17-small
"""
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import prep_common as pc

WIT3 = "https://raw.githubusercontent.com/hlt-mt/WIT3/master/archive"
DEFAULT_URL = f"{WIT3}/2017-01-trnted/texts/fr/en/fr-en.tgz"
#: the IWSLT17 evaluation archives holding tst2017: French source (fr-en), English side (en-fr); sacrebleu's
TEST_URLS = (f"{WIT3}/2017-01-ted-test/texts/fr/en/fr-en.tgz", f"{WIT3}/2017-01-ted-test/texts/en/fr/en-fr.tgz")
SRC, TGT = "fr", "en"
TASK = pc.Task("iwslt17_fr_en", SRC, TGT, "sentencepiece", moses_tokenized=False, lowercase=False)
TRAIN_DROP = ("<url>", "<talkid>", "<keywords>", "<speaker>", "<reviewer", "<translator", "<doc", "</doc>")
TRAIN_STRIP = ("<title>", "</title>", "<description>", "</description>")
_TST2010_2015 = ["tst2010", "tst2011", "tst2012", "tst2013", "tst2014", "tst2015"]
#: --test-set NAME -> the XML sets of valid and test (those of test are in the evaluation archives for tst2017)
SPLITS = {
    "tst2017": {"valid": ["dev2010", *_TST2010_2015], "test": ["tst2017"]},
    "tst2010-2015": {"valid": ["dev2010"], "test": _TST2010_2015},
}
DEFAULT_TEST_SET = "tst2017"
OFFICIAL = "tst2017"
#: ``--smoke``: the data of a CPU smoke run (``python -m fairseq_el.train --smoke``): a small vocabulary (the
#: smoke model's), the first 4,000 training pairs (about 150 updates an epoch of the smoke's 1,024-token
#: batches; the shared test sets as --raw text have more), shorter valid and test sets (explicit flags win)
SMOKE = ("--vocab-size", "2000", "--train-lines", "4000", "--valid-lines", "500", "--test-lines", "500")


def xml_name(setname: str, lang: str, pair: str = "fr-en") -> str:
    return f"IWSLT17.TED.{setname}.{pair}.{lang}.xml"


def set_label(names: Sequence[str]) -> str:
    """How prep.json and the messages name XML sets: ``IWSLT17.TED.tst2017``,
    ``IWSLT17.TED.dev2010+tst2010+...`` for a concatenation."""
    return "IWSLT17.TED." + "+".join(names)


def _doc_ids(lines: Sequence[str]) -> List[str]:
    return re.findall(r'<doc\s[^>]*docid="([^"]*)"', "\n".join(lines))


def _segments(name_a: str, lines_a: Sequence[str], name_b: str, lines_b: Sequence[str]):
    """The raw (fr, en) texts of two line-aligned XML files, checked to have the same number of ``<seg>``
    elements and the same document ids in the same order."""
    segs_a, segs_b = pc.xml_segments(lines_a), pc.xml_segments(lines_b)
    pc.check_same_length(name_a, segs_a, name_b, segs_b, "<seg> elements")
    docs_a, docs_b = _doc_ids(lines_a), _doc_ids(lines_b)
    if docs_a != docs_b:
        i = next((i for i, (a, b) in enumerate(zip(docs_a, docs_b)) if a != b), min(len(docs_a), len(docs_b)))
        at_a = docs_a[i] if i < len(docs_a) else "none"
        at_b = docs_b[i] if i < len(docs_b) else "none"
        raise pc.PrepError(f"{name_a} and {name_b} are not the same talks: document {i + 1} is docid {at_a} in "
                           f"the first, {at_b} in the second")
    return [pc.unescape_segment(x) for x in segs_a], [pc.unescape_segment(x) for x in segs_b]


def load_archive(path: Path, valid_sets: List[str], test_sets: List[str]):
    """Read and check the training archive: the (fr, en) texts of train, valid and (unless
    ``test_sets`` is empty) test (see the module doc)."""
    train_names = [f"train.tags.fr-en.{lang}" for lang in (SRC, TGT)]
    sets = {"valid": valid_sets, "test": test_sets}
    xml = [xml_name(s, lang) for names in sets.values() for s in names for lang in (SRC, TGT)]
    files = pc.Archive(path).read(train_names + xml)
    a, b = train_names
    pc.check_same_length(f"{path}:{a}", files[a], f"{path}:{b}", files[b])
    train = tuple(pc.train_tags_lines(files[n], TRAIN_DROP, TRAIN_STRIP) for n in train_names)
    pc.check_same_length(f"{path}:{a}", train[0], f"{path}:{b}", train[1], "lines after removing tag lines")
    texts = {"train": train}
    for split, names in sets.items():
        if not names:
            continue
        src, tgt = [], []
        for name in names:
            a, b = xml_name(name, SRC), xml_name(name, TGT)
            fr, en = _segments(f"{path}:{a}", files[a], f"{path}:{b}", files[b])
            src += fr
            tgt += en
        texts[split] = (src, tgt)
    return texts


def load_test_archives(source: Path, reference: Path, setname: str = OFFICIAL):
    """The (fr, en) texts of an IWSLT17 evaluation set: ``IWSLT17.TED.SET.fr-en.fr.xml`` from ``source``
    (``fr-en.tgz``) and ``IWSLT17.TED.SET.en-fr.en.xml`` from ``reference`` (``en-fr.tgz``); either
    may be a tarball or a directory, and both the same directory."""
    a, b = xml_name(setname, SRC, "fr-en"), xml_name(setname, TGT, "en-fr")
    lines_a = pc.Archive(source).read([a])[a]
    lines_b = pc.Archive(reference).read([b])[b]
    return _segments(f"{source}:{a}", lines_a, f"{reference}:{b}", lines_b)


def build_parser() -> pc.Parser:
    parser = pc.Parser(prog="python -m fairseq_el.prep_iwslt17",
                       description="IWSLT17 French-English: cased raw text, joint sentencepiece BPE, "
                       "fairseq-preprocess --joined-dictionary; decode with --remove-bpe sentencepiece. "
                       "Test set: the official IWSLT17 tst2017 by default (--test-set). "
                       "Output: OUT/{data,bpe,text,bin}, OUT/prep.json.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", default=DEFAULT_URL,
                        help="the IWSLT17 fr-en training archive: a URL (downloaded into OUT/orig), "
                             "a local tarball or an extracted directory")
    source.add_argument("--raw", type=Path, metavar="DIR",
                        help="use line-aligned raw text files DIR/NAME.{fr,en}[.gz] instead "
                             "(see --train/--valid/--test)")
    parser.add_argument("--test-set", choices=sorted(SPLITS), default=None,
                        help="archive: the split. tst2017 (default): test = IWSLT17.TED.tst2017, the official "
                             "IWSLT17 test set (1,455 pairs, what sacrebleu -t iwslt17 scores; from "
                             "--test-archives), valid = dev2010 + tst2010-2015 (fairseq's IWSLT17 example). "
                             "tst2010-2015: test = tst2010 ... tst2015 concatenated, valid = dev2010 (this "
                             "project's earlier default; not an official test set)")
    parser.add_argument("--test-archives", nargs=2, default=None, metavar=("FR_EN", "EN_FR"),
                        help="--test-set tst2017: the IWSLT17 evaluation archives, URLs (downloaded into "
                             "OUT/orig/2017-01-ted-test), tarballs or directories: the one holding "
                             "IWSLT17.TED.tst2017.fr-en.fr.xml (French source) and the one holding "
                             "IWSLT17.TED.tst2017.en-fr.en.xml (English side), the same directory twice if "
                             f"it holds both [{' '.join(TEST_URLS)}]")
    parser.add_argument("--valid-sets", type=pc.name_list, default=None, metavar="SETS",
                        help="archive: XML sets (IWSLT17.TED.SET.fr-en.*.xml of the training archive) forming "
                             "valid, concatenated in this order, instead of those of --test-set")
    pc.split_names_args(parser, {"train": "train", "valid": "valid", "test": "test"})
    parser.add_argument("--vocab-size", type=pc.positive_int, default=16000, metavar="N",
                        help="joint sentencepiece BPE vocabulary size")
    pc.add_common_args(parser)
    pc.add_smoke_arg(parser, SMOKE)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = pc.parse_args(parser, argv, SMOKE)
    if args.raw is not None:
        for flag in ("test_set", "test_archives", "valid_sets"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                parser.error(f"{name} picks the archive's XML sets; with --raw {args.raw}, --valid and --test "
                             f"name the files of each split")
    else:
        args.test_set = args.test_set or DEFAULT_TEST_SET
        if args.test_archives is not None and args.test_set != OFFICIAL:
            parser.error(f"--test-archives goes with --test-set {OFFICIAL} (the evaluation archives hold it), "
                         f"not with --test-set {args.test_set}")
        test = SPLITS[args.test_set]["test"]
        clash = [s for s in (args.valid_sets or []) if s in test]
        if clash:
            parser.error(f"--valid-sets {','.join(args.valid_sets)}: {clash[0]} is also in the test set "
                         f"(--test-set {args.test_set})")
    return pc.run_main(parser.prog, lambda: _run(args))


def split_labels(args) -> Dict[str, str]:
    """prep.json's ``test_set`` and ``valid_set``: the XML sets (archive) or the raw files (--raw)."""
    if args.raw is not None:
        return {f"{split}_set": "raw text " + ",".join(getattr(args, split)) for split in ("test", "valid")}
    return {"test_set": set_label(SPLITS[args.test_set]["test"]), "valid_set": set_label(args.valid_sets)}


def _run(args) -> int:
    # keep the flags of the unused input mode out of the record (and of the rerun comparison)
    if args.raw is not None:
        args.archive = args.valid_sets = args.test_set = args.test_archives = None
    else:
        args.train = args.valid = args.test = None
        if not pc.is_url(args.archive):
            args.archive = Path(args.archive)
        args.valid_sets = args.valid_sets or SPLITS[args.test_set]["valid"]
        if args.test_set == OFFICIAL:
            args.test_archives = [a if pc.is_url(a) else Path(a) for a in (args.test_archives or TEST_URLS)]
    prep = pc.Prep(args)
    if prep.check():
        return pc.already_done(prep)
    limits = {s: getattr(args, f"{s}_lines") for s in pc.SPLITS}
    build = None
    if prep.will_build("data"):
        if args.raw is not None:
            files = pc.raw_inputs(args.raw, {s: getattr(args, s) for s in pc.SPLITS}, SRC, TGT, limits)
            build = lambda tmp: pc.build_raw_data(tmp, TASK, pc.read_raw_splits(files), limits)  # noqa: E731
        else:
            official = args.test_set == OFFICIAL
            if official:  # the small evaluation archives first: a wrong path fails before the large download
                tests = [pc.download(a, prep.path("orig", "2017-01-ted-test")) if pc.is_url(a) else a
                         for a in args.test_archives]
                test_texts = load_test_archives(*tests)
            source = pc.download(args.archive, prep.path("orig")) if pc.is_url(args.archive) else args.archive
            texts = load_archive(source, args.valid_sets, [] if official else SPLITS[args.test_set]["test"])
            if official:
                texts["test"] = test_texts
            pc.check_limits(limits, {split: len(texts[split][0]) for split in ("valid", "test")})
            build = lambda tmp: pc.build_raw_data(tmp, TASK, texts, limits)  # noqa: E731
    prep.begin()
    prep.stage("data", build)  # build is None only when data/ is finished: then it is skipped
    pc.log(f"test set: {split_labels(args)['test_set']}")
    return pc.finish(prep, TASK, args, vocab_size=args.vocab_size, extra=split_labels(args))


if __name__ == "__main__":
    sys.exit(main())
