"""``python -m fairseq_el --user-dir`` prints the path for fairseq's ``--user-dir``."""
import argparse
import os
import sys

#: the criteria this plugin registers (the Encouraging Loss first, then the paper's companion losses)
CRITERIA = ("encouraging_label_smoothed_cross_entropy", "focal_cross_entropy", "halted_focal_cross_entropy",
            "mse_mirror_bonus")


def main(argv=None) -> int:
    from encouraging_loss.tools.cli import Parser

    parser = Parser(
        prog="python -m fairseq_el",
        description="Encouraging Loss plugin for fairseq. Use it as: "
        'fairseq-train DATA --user-dir "$(python -m fairseq_el --user-dir)" '
        "--criterion encouraging_label_smoothed_cross_entropy --log-end 0.5 ...",
    )
    parser.add_argument("--user-dir", action="store_true", help="print the directory to pass to fairseq's --user-dir")
    parser.add_argument(
        "--criterion-help", nargs="?", const=CRITERIA[0], choices=CRITERIA, metavar="CRITERION",
        help="list a criterion's flags (fairseq-train --help does not show criterion flags); "
        f"one of {', '.join(CRITERIA)} (default {CRITERIA[0]})",
    )
    args = parser.parse_args(argv)
    if args.criterion_help:
        from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
        from fairseq.dataclass.utils import gen_parser_from_dataclass

        from . import register

        register()
        flags = argparse.ArgumentParser(
            prog=f"fairseq-train ... --criterion {args.criterion_help}",
            add_help=False, usage="%(prog)s [flags]",
        )
        gen_parser_from_dataclass(flags, CRITERION_DATACLASS_REGISTRY[args.criterion_help]())
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
