"""``python -m fairseq_el --user-dir`` prints the path for fairseq's ``--user-dir``."""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_el",
        description="Encouraging Loss plugin for fairseq. Use it as: "
        'fairseq-train DATA --user-dir "$(python -m fairseq_el --user-dir)" '
        "--criterion encouraging_label_smoothed_cross_entropy --log-end 0.5 ...",
    )
    parser.add_argument("--user-dir", action="store_true", help="print the directory to pass to fairseq's --user-dir")
    parser.add_argument(
        "--criterion-help", action="store_true",
        help="list the criterion's flags (fairseq-train --help does not show criterion flags)",
    )
    args = parser.parse_args(argv)
    if args.criterion_help:
        from fairseq.dataclass.utils import gen_parser_from_dataclass

        from .criterion import EncouragingLabelSmoothedCrossEntropyConfig

        flags = argparse.ArgumentParser(
            prog="fairseq-train ... --criterion encouraging_label_smoothed_cross_entropy",
            add_help=False, usage="%(prog)s [flags]",
        )
        gen_parser_from_dataclass(flags, EncouragingLabelSmoothedCrossEntropyConfig())
        flags.print_help()
        return 0
    if not args.user_dir:
        parser.print_help()
        return 0
    # the package directory; no fairseq import needed to print it
    print(os.path.dirname(os.path.abspath(__file__)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
