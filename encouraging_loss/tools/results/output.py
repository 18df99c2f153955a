"""The output folder of the results: refusing to overwrite, creating it, writing every file at once.

:class:`Staging` writes each file to a temporary name beside its target and renames them all into
place together, so that a failure (a read-only folder, a full disk) leaves no partial file.
"""
import contextlib
from pathlib import Path
from typing import Sequence

from ..files import FileProblem, atomic_path, check_writable_dir, os_error_line
from .records import ResultsError


def check_free(paths: Sequence[Path], force: bool) -> None:
    """Refuse to write ``paths``: a folder in a file's place always, an existing file unless ``force``."""
    folders = [p for p in paths if p.is_dir()]
    if folders:  # found now, not when the files are renamed into place
        raise ResultsError(f"{folders[0]} is a folder, where the results write a file")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ResultsError(f"refusing to overwrite {', '.join(existing)} (use --force)")


class Staging:
    """Files written to temporary names beside their targets, renamed into place together when
    the ``with`` block ends without an error, all removed otherwise (:func:`atomic_path` each).

    An ``OSError`` (a read-only folder, a full disk) becomes a :class:`ResultsError` with one line
    naming the file being written; nothing partial is left, and the targets keep what they held.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.current = self.out_dir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Staging":
        self._stack.__enter__()
        return self

    def path(self, target: Path) -> Path:
        """The temporary path to write ``target``'s content to."""
        self.current = Path(target)
        return self._stack.enter_context(atomic_path(target))

    def __exit__(self, exc_type, exc, tb):
        try:  # renames every temporary file (no error) or removes them all
            suppressed = self._stack.__exit__(exc_type, exc, tb)
        except OSError as err:
            raise ResultsError(os_error_line(err, self.current, "cannot write")) from None
        if isinstance(exc, OSError):
            raise ResultsError(os_error_line(exc, self.current, "cannot write")) from None
        return suppressed


def make_out_dir(out_dir: Path) -> Path:
    """Create ``--out`` (and its parents) and check that it takes a new file; :class:`ResultsError` if not."""
    try:
        return check_writable_dir(out_dir, "--out")
    except FileProblem as err:
        raise ResultsError(str(err)) from None
