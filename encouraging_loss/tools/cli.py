"""What every ``python -m`` command of the project shares: argparse with its
defaults shown in ``--help`` (only where there is one) and usage errors as one
line (``prog: error: ...``, exit 2, no usage dump). Framework-free, used by
the core's and both plugins' commands."""
import argparse
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["HelpFormatter", "Parser", "check_choice", "flag_groups", "list_of", "merge_flags", "seed_number",
           "split_extra"]


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


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def flag_groups(tokens: Sequence[str], parser: argparse.ArgumentParser, *, program: str, where: str = "",
                stray_hint: str = "", error=ValueError) -> List[Tuple[str, List[str]]]:
    """Split ``program``'s flags into ``(dest, tokens)`` groups with ``program``'s own argparse ``parser``.

    Aliases share a dest (``-b`` / ``--batch-size``); an option takes the number of values its action
    takes (``--decay-milestones 30 60 80``, a switch none), so negative numbers are values;
    ``--flag=value`` is one token. An unknown option (``--help`` included), a stray value or a missing
    value is ``error`` with one line that starts with ``where`` (``stray_hint`` is added to the stray
    value's line). The recipes use it to check and merge the flags they pass to a training command.
    """
    options = parser._option_string_actions
    groups: List[Tuple[str, List[str]]] = []
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0] if tok.startswith("--") else tok
        action = options.get(name)
        if action is None or action.dest == "help":
            if tok.startswith("-") and not _is_number(tok):
                raise error(f"{where}unknown {program} option {name}")
            raise error(f"{where}unexpected value {tok!r}{stray_hint}")
        group = [tok]
        i += 1
        if "=" not in tok or not tok.startswith("--"):
            nargs = action.nargs
            if nargs == 0:
                pass
            elif nargs is None or nargs == "?":
                if i < len(tokens) and (tokens[i] not in options or nargs is None):
                    group.append(tokens[i])
                    i += 1
                elif nargs is None:
                    raise error(f"{where}{name} needs a value")
            elif isinstance(nargs, int):
                if len(tokens) - i < nargs:
                    raise error(f"{where}{name} needs {nargs} values")
                group.extend(tokens[i:i + nargs])
                i += nargs
            else:  # '+', '*'
                while i < len(tokens) and tokens[i].split("=", 1)[0] not in options:
                    group.append(tokens[i])
                    i += 1
                if nargs == "+" and len(group) == 1:
                    raise error(f"{where}{name} needs at least one value")
        groups.append((action.dest, group))
    return groups


def merge_flags(base: Sequence[str], extra: Sequence[str], parser: argparse.ArgumentParser, *, program: str,
                stray_hint: str = "", error=ValueError) -> List[str]:
    """``base`` flags with each option of ``extra`` replacing the same option (dest) in it, else appended;
    both checked by :func:`flag_groups` (``extra``'s errors start with ``-- ``, where a recipe takes them)."""
    merged = flag_groups(base, parser, program=program, stray_hint=stray_hint, error=error)
    for dest, group in flag_groups(extra, parser, program=program, where="-- ", stray_hint=stray_hint, error=error):
        for k, (d, _) in enumerate(merged):
            if d == dest:
                merged[k] = (dest, group)
                break
        else:
            merged.append((dest, group))
    return [tok for _, group in merged for tok in group]
