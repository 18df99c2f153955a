"""IWSLT14 German-English as fairseq's ``examples/translation/prepare-iwslt14.sh``, in Python.

From the original WIT3 archive (``de-en.tgz``):

1. ``train.tags.de-en.{de,en}``: lines holding ``<url>``, ``<talkid>`` or
   ``<keywords>`` are dropped, the ``<title>``/``<description>`` tags removed;
   Moses tokenization (sacremoses, per language, default escaping, no
   aggressive dash splitting); cleaning as ``clean-corpus-n.perl -ratio 1.5 ... 1 175``;
   lowercasing. valid = every 23rd cleaned pair, train = the rest.
2. test = IWSLT14.TED.dev2010, IWSLT14.TEDX.dev2012, IWSLT14.TED.tst2010,
   tst2011, tst2012 in that order: the ``<seg>`` texts (entities left escaped, as
   the script does), ``’`` replaced by ``'``, tokenized and lowercased.
3. joint BPE, 10,000 merges (subword-nmt) learned on train de+en, applied to all;
   ``fairseq-preprocess --joined-dictionary``.

The references for sacreBLEU are the raw cased texts: the unescaped ``<seg>``
text for test, the untokenized training line for valid. With ``--tokenized DIR``
(text already tokenized and lowercased, e.g. ``shared/data/iwslt14-de-en``)
steps 1-2 are skipped and there are no references.

    python -m fairseq_el.prep_iwslt14 --out data/iwslt14
    python -m fairseq_el.prep_iwslt14 --tokenized ../shared/data/iwslt14-de-en \\
        --bpe-codes ../shared/data/iwslt14-de-en/code.gz --out data/iwslt14-sample
"""
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import prep_common as pc

DEFAULT_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
SRC, TGT = "de", "en"
TASK = pc.Task("iwslt14_de_en", SRC, TGT, "subword_nmt", moses_tokenized=True, lowercase=True)
#: ``--smoke``: the data of a CPU smoke run (``python -m fairseq_el.train --smoke``): fewer BPE merges (the
#: smoke model's vocabulary), the first 4,000 training pairs (about 150 updates an epoch of the smoke's
#: 1,024-token batches; the shared 4,600-pair sample has enough), shorter valid and test sets (explicit
#: flags win)
SMOKE = ("--bpe-merges", "2000", "--train-lines", "4000", "--valid-lines", "500", "--test-lines", "500")
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")
TRAIN_STRIP = ("<title>", "</title>", "<description>", "</description>")
CLEAN_RATIO, CLEAN_MIN, CLEAN_MAX = 1.5, 1, 175
VALID_EVERY = 23

# ---------------------------------------------------------------------------
# tokenization


def _moses_class():
    from sacremoses import MosesTokenizer

    class PerlMosesTokenizer(MosesTokenizer):
        """sacremoses with tokenizer.perl's rule that a final ``word.`` is always split.

        tokenizer.perl (the mosesdecoder that fairseq's script clones) splits the
        period off the last word of a line whatever the word ("u.s.a." -> "u.s.a .");
        sacremoses (0.2.0) keeps it attached there, which changed 31 of the 13,500
        test lines. The other non-breaking prefix rules are sacremoses' own.
        """

        def handles_nonbreaking_prefixes(self, text):
            tokens = text.split()
            last = len(tokens) - 1
            for i, token in enumerate(tokens):
                match = re.search(r"^(\S+)\.$", token)
                if not match:
                    continue
                prefix = match.group(1)
                if i < last:
                    following = tokens[i + 1]
                    if (("." in prefix and self.isanyalpha(prefix))
                            or (prefix in self.NONBREAKING_PREFIXES and prefix not in self.NUMERIC_ONLY_PREFIXES)
                            or self.islower(following[0])):
                        continue
                    if prefix in self.NUMERIC_ONLY_PREFIXES and re.search(r"^[0-9]+", following):
                        continue
                tokens[i] = prefix + " ."
            return " ".join(tokens)

    return PerlMosesTokenizer


def line_tokenizer(lang: str, xml: bool = False):
    """A line function: ``tokenizer.perl -l LANG`` (default escaping, no -a) then ``lowercase.perl``;
    with ``xml`` first ``’`` -> ``'`` as the script does for the XML test sets."""
    tok = _moses_class()(lang=lang)

    def tokenize(line: str) -> str:
        if xml:
            line = line.replace("\u2019", "'")
        return tok.tokenize(line, aggressive_dash_splits=False, return_str=True, escape=True).lower()

    return tokenize


def tokenize_lines(lines: List[str], lang: str, xml: bool = False, workers: int = 1) -> List[str]:
    """Moses-tokenize and lowercase lines as prepare-iwslt14.sh (``xml=True``: also ``’`` -> ``'``,
    as for the ``<seg>`` texts of the test sets)."""
    return pc.parallel_map(line_tokenizer, (lang, xml), lines, workers, f"tokenize {lang}")


def clean_pairs(src: List[str], tgt: List[str], ratio: float = CLEAN_RATIO, low: int = CLEAN_MIN,
                high: int = CLEAN_MAX, max_word_length: int = 1000) -> List[int]:
    """Indices of the pairs that ``clean-corpus-n.perl -ratio RATIO corpus src tgt out LOW HIGH`` keeps.

    Both sides are whitespace-normalized and must hold LOW..HIGH space-separated
    tokens, neither count may exceed RATIO times the other, and no token may be
    longer than ``max_word_length`` characters. (Tokenized text holds no ``|``.)
    """
    keep = []
    for i, (a, b) in enumerate(zip(src, tgt)):
        a, b = " ".join(a.split()), " ".join(b.split())
        if not a or not b:
            continue
        na, nb = len(a.split(" ")), len(b.split(" "))
        if not (low <= na <= high and low <= nb <= high):
            continue
        if na / nb > ratio or nb / na > ratio:
            continue
        if max(map(len, a.split(" "))) > max_word_length or max(map(len, b.split(" "))) > max_word_length:
            continue
        keep.append(i)
    return keep


# ---------------------------------------------------------------------------
# inputs


def _train_names() -> List[str]:
    return [f"train.tags.de-en.{lang}" for lang in (SRC, TGT)]


def _xml_names() -> List[str]:
    return [f"{name}.de-en.{lang}.xml" for name in TEST_SETS for lang in (SRC, TGT)]


def load_archive(path: Path) -> Dict[str, List[str]]:
    """Read and check the archive's train.tags and XML files: the sides of each must align."""
    files = pc.Archive(path).read(_train_names() + _xml_names())
    de, en = _train_names()
    pc.check_same_length(f"{path}:{de}", files[de], f"{path}:{en}", files[en])
    tags = {n: pc.train_tags_lines(files[n], TRAIN_DROP, TRAIN_STRIP) for n in (de, en)}
    pc.check_same_length(f"{path}:{de}", tags[de], f"{path}:{en}", tags[en], "lines after removing tag lines")
    files.update(tags)
    for name in TEST_SETS:
        a, b = (f"{name}.de-en.{lang}.xml" for lang in (SRC, TGT))
        files[a], files[b] = pc.xml_segments(files[a]), pc.xml_segments(files[b])
        pc.check_same_length(f"{path}:{a}", files[a], f"{path}:{b}", files[b], "<seg> elements")
    return files


def build_from_archive(tmp: Path, files: Dict[str, List[str]], limits: Dict[str, int], workers: int) -> None:
    """data/ from the archive's texts (see the module docstring)."""
    de_name, en_name = _train_names()
    raw_de, raw_en = files[de_name], files[en_name]
    tok_de = tokenize_lines(raw_de, SRC, workers=workers)
    tok_en = tokenize_lines(raw_en, TGT, workers=workers)
    keep = clean_pairs(tok_de, tok_en)
    pc.log(f"clean-corpus (ratio {CLEAN_RATIO}, {CLEAN_MIN}-{CLEAN_MAX} tokens): "
           f"kept {len(keep):,} of {len(raw_de):,} pairs")
    pairs = [(tok_de[i], tok_en[i], " ".join(raw_en[i].split())) for i in keep]
    valid = [p for n, p in enumerate(pairs, 1) if n % VALID_EVERY == 0]
    train = [p for n, p in enumerate(pairs, 1) if n % VALID_EVERY != 0]
    test_de, test_en, test_ref = [], [], []
    for name in TEST_SETS:
        segs_de, segs_en = files[f"{name}.de-en.{SRC}.xml"], files[f"{name}.de-en.{TGT}.xml"]
        test_de += tokenize_lines(segs_de, SRC, xml=True, workers=workers)
        test_en += tokenize_lines(segs_en, TGT, xml=True, workers=workers)
        test_ref += [pc.unescape_segment(s) for s in segs_en]
        pc.log(f"test: {name} {len(segs_de):,} segments")
    splits, refs = {}, {}
    for split, (a, b, r) in (("train", zip(*train) if train else ([], [], [])),
                             ("valid", zip(*valid) if valid else ([], [], [])),
                             ("test", (test_de, test_en, test_ref))):
        a, b, r = pc.slice_split(split, list(a), list(b), limits[split], list(r))
        splits[split] = (a, b)
        if split != "train":
            refs[split] = r
    pc.write_data(tmp, TASK, splits, refs)


def tokenized_inputs(directory: Path, names: Dict[str, str],
                     limits: Dict[str, int]) -> Dict[str, Tuple[Path, Path]]:
    """The (de, en) files of each split in DIR (``NAME.LANG`` or ``.gz``), checked to align and
    to hold the --SPLIT-lines asked for. The train name ``train`` falls back to ``train-sample``
    (the shared data's layout)."""
    if not directory.is_dir():
        raise pc.PrepError(f"missing input directory: {directory}")
    files = {}
    for split, stem in names.items():
        try:
            files[split] = (pc.find_text(directory, stem, SRC), pc.find_text(directory, stem, TGT))
        except pc.PrepError:
            if split != "train" or stem != "train":
                raise
            files[split] = (pc.find_text(directory, "train-sample", SRC), pc.find_text(directory, "train-sample", TGT))
    counts = pc.check_aligned(list(files.values()))
    pc.check_limits(limits, {split: counts[a] for split, (a, _) in files.items()})
    return files


def build_from_tokenized(tmp: Path, files: Dict[str, Tuple[Path, Path]], limits: Dict[str, int]) -> None:
    """data/ from tokenized, lowercased text: the first N pairs of each split, unchanged."""
    splits = {}
    for split, (a, b) in files.items():
        n = limits[split]
        pc.log(f"{split}: reading {a} and {b}")
        src, tgt = pc.read_lines(a, n), pc.read_lines(b, n)
        splits[split] = pc.slice_split(split, src, tgt, n)
    pc.write_data(tmp, TASK, splits, {})


# ---------------------------------------------------------------------------
# command line


def build_parser() -> pc.Parser:
    parser = pc.Parser(prog="python -m fairseq_el.prep_iwslt14",
                       description="IWSLT14 German-English as fairseq's examples/translation/prepare-iwslt14.sh "
                       "(Moses tokenization, lowercasing, cleaning, every 23rd pair to valid, 5-set test, "
                       "joint subword-nmt BPE), then fairseq-preprocess --joined-dictionary. "
                       "Output: OUT/{data,bpe,text,bin}, OUT/prep.json.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", default=DEFAULT_URL,
                        help="the IWSLT14 de-en.tgz: a URL (downloaded into OUT/orig), a local tarball "
                             "or an extracted directory")
    source.add_argument("--tokenized", type=Path, metavar="DIR",
                        help="use already tokenized, lowercased text instead: DIR/{train,valid,test}.{de,en}[.gz] "
                             "(train may be named train-sample)")
    parser.add_argument("--bpe-codes", type=Path, metavar="FILE",
                        help="apply these subword-nmt codes (plain or .gz) instead of learning new ones")
    parser.add_argument("--bpe-merges", type=pc.positive_int, default=10000, metavar="N",
                        help="number of joint BPE merges to learn (ignored with --bpe-codes)")
    pc.add_common_args(parser)
    pc.add_smoke_arg(parser, SMOKE)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = pc.parse_args(parser, argv, SMOKE)
    return pc.run_main(parser.prog, lambda: _run(args))


def _run(args) -> int:
    if args.tokenized is not None:
        args.archive = None
    elif not pc.is_url(args.archive):
        args.archive = Path(args.archive)
    if args.bpe_codes is not None:
        args.bpe_merges = None  # not used: keep it out of the comparison of reruns
    prep = pc.Prep(args)
    if prep.check():
        return pc.already_done(prep)
    limits = {s: getattr(args, f"{s}_lines") for s in pc.SPLITS}
    if args.bpe_codes is not None:
        pc.check_codes(args.bpe_codes)
    build = None
    if prep.will_build("data"):
        if args.tokenized is not None:
            names = {"train": "train", "valid": "valid", "test": "test"}
            files = tokenized_inputs(args.tokenized, names, limits)
            build = lambda tmp: build_from_tokenized(tmp, files, limits)  # noqa: E731
        else:
            source = pc.download(args.archive, prep.path("orig")) if pc.is_url(args.archive) else args.archive
            texts = load_archive(source)
            n_test = sum(len(texts[f"{name}.de-en.{SRC}.xml"]) for name in TEST_SETS)
            pc.check_limits({"test": limits["test"]}, {"test": n_test})
            build = lambda tmp: build_from_archive(tmp, texts, limits, args.workers)  # noqa: E731
    prep.begin()
    prep.stage("data", build)  # build is None only when data/ is finished: then it is skipped
    return pc.finish(prep, TASK, args, merges=args.bpe_merges or 0, codes=args.bpe_codes)


if __name__ == "__main__":
    sys.exit(main())
