"""IWSLT17 French-English: cased raw text, joint sentencepiece BPE, shared dictionary.

No Moses tokenization and no lowercasing: a joint sentencepiece model
(``model_type=bpe``, 16,000 pieces by default) is trained on train fr+en and
applied to every split, then ``fairseq-preprocess --joined-dictionary`` (so
``--share-all-embeddings`` works). Decode with ``--remove-bpe sentencepiece``;
the references (``text/{valid,test}.ref.en``) are the raw English text.

Inputs, one of:

- ``--archive``: the WIT3 training archive ``fr-en.tgz`` (URL, tarball or
  directory). train = ``train.tags.fr-en.*`` without its tag lines (``<url>``,
  ``<talkid>``, ``<keywords>``, ``<speaker>``, ``<reviewer>``, ``<translator>``,
  ``<doc>``; ``<title>``/``<description>`` tags removed, text kept, as fairseq's
  ``prepare-iwslt17-multilingual.sh``); valid/test = the ``<seg>`` texts
  (entities unescaped) of ``IWSLT17.TED.{SET}.fr-en.*.xml`` for ``--valid-sets``
  and ``--test-sets``, concatenated in the order given.
- ``--raw DIR``: line-aligned raw text ``DIR/NAME.{fr,en}[.gz]``; ``--train``,
  ``--valid``, ``--test`` name the files of each split (comma-separated,
  concatenated). E.g. with ``shared/data/iwslt17-fr-en`` (test sets only)::

    python -m fairseq_el.prep_iwslt17 --raw ../shared/data/iwslt17-fr-en \\
        --train iwslt16.tst2010,iwslt16.tst2011,iwslt16.tst2012,iwslt16.tst2013,iwslt16.tst2014 \\
        --valid valid --test test --vocab-size 1000 --out data/iwslt17-small
"""
import sys
from pathlib import Path
from typing import List, Optional

from . import prep_common as pc

DEFAULT_URL = "https://raw.githubusercontent.com/hlt-mt/WIT3/master/archive/2017-01-trnted/texts/fr/en/fr-en.tgz"
SRC, TGT = "fr", "en"
TASK = pc.Task("iwslt17_fr_en", SRC, TGT, "sentencepiece", moses_tokenized=False, lowercase=False)
TRAIN_DROP = ("<url>", "<talkid>", "<keywords>", "<speaker>", "<reviewer", "<translator", "<doc", "</doc>")
TRAIN_STRIP = ("<title>", "</title>", "<description>", "</description>")


def xml_name(setname: str, lang: str) -> str:
    return f"IWSLT17.TED.{setname}.fr-en.{lang}.xml"


def load_archive(path: Path, valid_sets: List[str], test_sets: List[str]):
    """Read and check the archive: the (fr, en) texts of train, valid and test (see the module doc)."""
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
        src, tgt = [], []
        for name in names:
            a, b = xml_name(name, SRC), xml_name(name, TGT)
            segs_a, segs_b = pc.xml_segments(files[a]), pc.xml_segments(files[b])
            pc.check_same_length(f"{path}:{a}", segs_a, f"{path}:{b}", segs_b, "<seg> elements")
            src += [pc.unescape_segment(x) for x in segs_a]
            tgt += [pc.unescape_segment(x) for x in segs_b]
        texts[split] = (src, tgt)
    return texts


def build_parser() -> pc.Parser:
    parser = pc.Parser(prog="python -m fairseq_el.prep_iwslt17",
                       description="IWSLT17 French-English: cased raw text, joint sentencepiece BPE, "
                       "fairseq-preprocess --joined-dictionary; decode with --remove-bpe sentencepiece. "
                       "Output: OUT/{data,bpe,text,bin}, OUT/prep.json.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", default=DEFAULT_URL,
                        help="the IWSLT17 fr-en training archive: a URL (downloaded into OUT/orig), "
                             "a local tarball or an extracted directory")
    source.add_argument("--raw", type=Path, metavar="DIR",
                        help="use line-aligned raw text files DIR/NAME.{fr,en}[.gz] instead "
                             "(see --train/--valid/--test)")
    parser.add_argument("--valid-sets", type=pc.name_list, default="dev2010", metavar="SETS",
                        help="archive: XML sets (IWSLT17.TED.SET.fr-en.*.xml) forming valid")
    parser.add_argument("--test-sets", type=pc.name_list, default="tst2010,tst2011,tst2012,tst2013,tst2014,tst2015",
                        metavar="SETS", help="archive: XML sets forming test, concatenated in this order")
    pc.split_names_args(parser, {"train": "train", "valid": "valid", "test": "test"})
    parser.add_argument("--vocab-size", type=pc.positive_int, default=16000, metavar="N",
                        help="joint sentencepiece BPE vocabulary size")
    pc.add_common_args(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return pc.run_main(parser.prog, lambda: _run(args))


def _run(args) -> int:
    # keep the flags of the unused input mode out of the record (and of the rerun comparison)
    if args.raw is not None:
        args.archive = args.valid_sets = args.test_sets = None
    else:
        args.train = args.valid = args.test = None
        if not pc.is_url(args.archive):
            args.archive = Path(args.archive)
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
            source = pc.download(args.archive, prep.path("orig")) if pc.is_url(args.archive) else args.archive
            texts = load_archive(source, args.valid_sets, args.test_sets)
            pc.check_limits(limits, {split: len(texts[split][0]) for split in ("valid", "test")})
            build = lambda tmp: pc.build_raw_data(tmp, TASK, texts, limits)  # noqa: E731
    prep.begin()
    prep.stage("data", build)  # build is None only when data/ is finished: then it is skipped
    return pc.finish(prep, TASK, args, vocab_size=args.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
