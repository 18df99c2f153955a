"""Multi30k German-English (WMT16 multimodal task 1): raw text, joint sentencepiece BPE, shared dictionary.

Raw cased text (lines stripped of surrounding whitespace; never split on TAB),
a joint sentencepiece model (``model_type=bpe``, 8,000 pieces by default)
trained on train de+en and applied to every split, then ``fairseq-preprocess
--joined-dictionary``. Decode with ``--remove-bpe sentencepiece``; the
references (``text/{valid,test}.ref.en``) are the raw English text.

Inputs: ``--raw DIR`` with ``NAME.{de,en}[.gz]`` (the shared layout:
train, valid, test2016), or, without ``--raw``, the official files downloaded
from the multi30k/dataset repository (``--url``; ``valid`` is fetched as
``val``, ``test2016`` as ``test_2016_flickr``, other names as they are)::

    python -m fairseq_el.prep_multi30k --raw ../shared/data/multi30k-de-en --out data/multi30k
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import prep_common as pc

DEFAULT_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
UPSTREAM = {"valid": "val", "test2016": "test_2016_flickr"}
SRC, TGT = "de", "en"
TASK = pc.Task("multi30k_de_en", SRC, TGT, "sentencepiece", moses_tokenized=False, lowercase=False)
#: ``--smoke``: the data of a CPU smoke run (``python -m fairseq_el.train --smoke``): a small vocabulary
#: (the smoke model's output layer), the first 6,500 training pairs (about 150 updates an epoch of the
#: smoke's 1,024-token batches) and a shorter test set to decode (explicit flags win)
SMOKE = ("--vocab-size", "2000", "--train-lines", "6500", "--test-lines", "500")


def fetch(base: str, names: Dict[str, List[str]], dest: Path) -> Dict[str, List[str]]:
    """Download ``BASE/UPSTREAM_NAME.LANG.gz`` for every named file; returns the stems to read from ``dest``."""
    stems = {split: [UPSTREAM.get(n, n) for n in ns] for split, ns in names.items()}
    for ns in stems.values():
        for stem in ns:
            for lang in (SRC, TGT):
                pc.download(f"{base.rstrip('/')}/{stem}.{lang}.gz", dest)
    return stems


def build_parser() -> pc.Parser:
    parser = pc.Parser(prog="python -m fairseq_el.prep_multi30k",
                       description="Multi30k German-English (WMT16 task 1): raw text, joint sentencepiece BPE, "
                       "fairseq-preprocess --joined-dictionary; decode with --remove-bpe sentencepiece. "
                       "Output: OUT/{data,bpe,text,bin}, OUT/prep.json.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--raw", type=Path, metavar="DIR", help="directory with NAME.{de,en}[.gz]")
    source.add_argument("--url", default=DEFAULT_URL,
                        help="without --raw: base URL of the official raw files (downloaded into OUT/orig)")
    pc.split_names_args(parser, {"train": "train", "valid": "valid", "test": "test2016"})
    parser.add_argument("--vocab-size", type=pc.positive_int, default=8000, metavar="N",
                        help="joint sentencepiece BPE vocabulary size")
    pc.add_common_args(parser)
    pc.add_smoke_arg(parser, SMOKE)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = pc.parse_args(parser, argv, SMOKE)
    return pc.run_main(parser.prog, lambda: _run(args))


def _run(args) -> int:
    if args.raw is not None:
        args.url = None
    prep = pc.Prep(args)
    if prep.check():
        return pc.already_done(prep)
    limits = {s: getattr(args, f"{s}_lines") for s in pc.SPLITS}
    names = {s: getattr(args, s) for s in pc.SPLITS}
    build = None
    if prep.will_build("data"):
        directory = args.raw
        if directory is None:
            directory = prep.path("orig")
            names = fetch(args.url, names, directory)
        files = pc.raw_inputs(directory, names, SRC, TGT, limits)
        build = lambda tmp: pc.build_raw_data(tmp, TASK, pc.read_raw_splits(files), limits)  # noqa: E731
    prep.begin()
    prep.stage("data", build)  # build is None only when data/ is finished: then it is skipped
    return pc.finish(prep, TASK, args, vocab_size=args.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
