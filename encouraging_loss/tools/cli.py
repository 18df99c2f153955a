"""What every ``python -m`` command of the project shares: argparse with its
defaults shown in ``--help`` (only where there is one) and usage errors as one
line (``prog: error: ...``, exit 2, no usage dump). Framework-free, used by
the core's and both plugins' commands."""
import argparse
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["HelpFormatter", "Parser", "check_choice", "list_of", "seed_number", "split_extra"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default in ``--help`` only where there is one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` and one-line usage errors."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def split_extra(argv: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """``(own, extra)``: a command's arguments (``sys.argv[1:]`` when ``argv`` is None) split at the first
    ``--``; ``extra`` goes to the program the command runs (fairseq-train, timm-el-train, ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def list_of(kind, what: str):
    """An argparse ``type``: space- or comma-separated values (``"1 2,3"``), each converted by ``kind``; a bad
    one is argparse's one-line error naming it as not ``what``."""
    def parse(text: str):
        values = []
        for v in text.replace(",", " ").split():
            try:
                values.append(kind(v))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{v!r} is not {what}") from None
        return values
    return parse


def seed_number(text: str) -> int:
    """A non-negative integer written in digits (a seed); ``ValueError`` otherwise (for :func:`list_of`)."""
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def check_choice(flag: str, values: Sequence, allowed: Sequence, error=ValueError) -> None:
    """``values`` of ``flag`` (a list option) are some of ``allowed``, at least one, none twice; else ``error``
    with one line naming the flag and the value."""
    choices = ", ".join(map(str, allowed))
    if not values:
        raise error(f"{flag}: nothing given ({choices})")
    for v in values:
        if v not in allowed:
            raise error(f"{flag}: unknown value {v!r} ({choices})")
    for v in values:
        if list(values).count(v) > 1:
            raise error(f"{flag}: {v!r} given twice")
