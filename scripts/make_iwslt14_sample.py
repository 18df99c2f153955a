#!/usr/bin/env python
"""Build a small binarized IWSLT14 De-En set for smoke tests and quick runs.

Takes the first N pairs of each split from a directory laid out like
``shared/data/iwslt14-de-en`` (Moses-tokenized, lowercased text and the joint
BPE codes of fairseq's ``prepare-iwslt14.sh``), applies the BPE with
subword-nmt and binarizes with stock ``fairseq-preprocess``.

    python scripts/make_iwslt14_sample.py --data ../shared/data/iwslt14-de-en \\
        --out runs/iwslt14-sample --train 2000 --valid 200 --test 100
"""
import argparse
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

SPLITS = {"train": "train-sample", "valid": "valid", "test": "test"}


def read_lines(path: Path, n: int):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = []
        for line in f:
            lines.append(line.rstrip("\n"))
            if len(lines) == n:
                break
    if len(lines) < n:
        raise SystemExit(f"{path} has only {len(lines)} lines, asked for {n}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path,
                    help="directory with {train-sample,valid,test}.{de,en}.gz and code.gz")
    ap.add_argument("--out", required=True, type=Path, help="output directory (text in OUT/text, binary in OUT/bin)")
    ap.add_argument("--train", type=int, default=2000, help="training pairs (default 2000)")
    ap.add_argument("--valid", type=int, default=200, help="validation pairs (default 200)")
    ap.add_argument("--test", type=int, default=100, help="test pairs (default 100)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    args = ap.parse_args(argv)
    for name in ("train", "valid", "test"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.data / "code.gz").is_file():
        ap.error(f"--data {args.data}: no code.gz there (expected the iwslt14-de-en layout)")
    if args.out.exists():
        if not args.force:
            ap.error(f"--out {args.out} exists; pass --force to overwrite it")
        shutil.rmtree(args.out)

    from subword_nmt.apply_bpe import BPE

    with gzip.open(args.data / "code.gz", "rt", encoding="utf-8") as codes:
        bpe = BPE(codes)
    text = args.out / "text"
    text.mkdir(parents=True)
    for split, stem in SPLITS.items():
        n = getattr(args, split)
        for lang in ("de", "en"):
            lines = read_lines(args.data / f"{stem}.{lang}.gz", n)
            with open(text / f"{split}.{lang}", "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(bpe.process_line(line) + "\n")
        print(f"{split}: {n} pairs", flush=True)
    cmd = [
        "fairseq-preprocess", "--source-lang", "de", "--target-lang", "en",
        "--trainpref", str(text / "train"), "--validpref", str(text / "valid"), "--testpref", str(text / "test"),
        "--destdir", str(args.out / "bin"), "--joined-dictionary", "--workers", "1",
    ]
    exe = Path(sys.executable).with_name("fairseq-preprocess")
    if exe.exists():
        cmd[0] = str(exe)
    subprocess.run(cmd, check=True)
    print(f"binarized data in {args.out / 'bin'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
