"""Reading and writing files so that a failure is one clear line and never a
half-written file that a later run would take as done.

Framework-free (torch only for :func:`load_checkpoint_safely`), used by the
core's commands and both plugins':

* :func:`atomic_write` / :func:`atomic_path`: write to a temporary name in the
  same folder, then rename over the target; on any error (a full disk, a
  read-only folder, an interrupt) the temporary file is removed and the
  target is left as it was.
* :class:`FileProblem`: a ``ValueError`` whose message is one line naming the
  file and what is wrong; :func:`os_error_line` turns an ``OSError`` into
  such a line.
* :func:`read_json`: a JSON file of an expected type (an object, by default),
  with truncation, wrong types, absurd nesting and non-finite numbers all
  reported as :class:`FileProblem`.
* :func:`load_checkpoint_safely`: ``torch.load(..., weights_only=True)``,
  passed explicitly so that ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn
  the check off: a file whose unpickling would run code is refused.
"""
import contextlib
import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

__all__ = [
    "FileProblem",
    "atomic_path",
    "atomic_write",
    "check_writable_dir",
    "load_checkpoint_safely",
    "os_error_line",
    "read_json",
    "write_json",
]

PathLike = Union[str, "os.PathLike[str]"]

#: the deepest nesting :func:`read_json` accepts (records and settings files are a few levels deep).
MAX_JSON_DEPTH = 64


class FileProblem(ValueError):
    """A file that cannot be read or written as needed; ``str()`` is one line naming it."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_line(err: OSError, path: Optional[PathLike] = None, action: str = "cannot write") -> str:
    """One line for an ``OSError``: ``"cannot write PATH: No space left on device"``.

    ``path`` defaults to the file the error names."""
    name = path if path is not None else (err.filename if err.filename is not None else "?")
    reason = err.strerror or (errno.errorcode.get(err.errno or 0) if err.errno else None) or _one_line(err)
    return f"{action} {os.fspath(name)}: {reason}"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends
    without an error, removed otherwise (and on ``KeyboardInterrupt``).

    For writers that take a file name (``torch.save``, ``savefig``, a tokenizer's trainer)::

        with atomic_path(out / "plot.png") as tmp:
            figure.savefig(tmp, format="png")

    Errors are not translated: ``OSError`` reaches the caller (see :func:`os_error_line`).
    """
    target = Path(path)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:  # mkstemp makes the file 0600: give it the mode a plain open() would (or the target's own)
        os.fchmod(fd, _mode_for(target))
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux tells it without changing it (os.umask must set it to read it: not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = None):
    """``open(path, mode)`` that only ever leaves the whole file at ``path``: the data goes to a
    temporary file beside it, which replaces ``path`` when the block ends without an error and is
    removed otherwise. ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        if mode == "wb":
            with open(tmp, "wb") as f:
                yield f
        else:
            with open(tmp, "w", encoding=encoding, newline=newline) as f:
                yield f


def write_json(path: PathLike, value, *, indent: int = 2) -> None:
    """``value`` as JSON (with a final newline) at ``path``, atomically. Non-finite numbers are
    refused (``ValueError``): they are not JSON."""
    text = json.dumps(value, indent=indent, allow_nan=False) + "\n"
    with atomic_write(path) as f:
        f.write(text)


def check_writable_dir(directory: PathLike, flag: Optional[str] = None, *, create: bool = True) -> Path:
    """Check, before any work, that a file can be made in ``directory``.

    ``create``: make the folder (and its parents) if needed, then make and remove a probe file in it.
    Otherwise create nothing: the folder when it exists, else the nearest folder above it that
    exists, must take a new file. Raises :class:`FileProblem` naming ``flag`` (when given) and the
    folder: a read-only folder, something that is not a folder in the way. A full disk is only
    found when writing. Returns ``Path(directory)``."""
    folder = Path(directory)
    where = f"{flag} {os.fspath(folder)}" if flag else os.fspath(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == folder:
            raise FileProblem(f"{where}: exists and is not a folder")
        raise FileProblem(f"{where}: cannot be created, {os.fspath(probe)} is not a folder")
    if create:
        probe = folder
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except (FileExistsError, NotADirectoryError):
        raise FileProblem(f"{where}: exists and is not a folder") from None
    except OSError as err:
        reason = err.strerror or _one_line(err)
        if probe == folder:
            raise FileProblem(f"{where}: cannot write there ({reason})") from None
        raise FileProblem(f"{where}: cannot create it in {os.fspath(probe)} ({reason})") from None
    return folder


def _depth_ok(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _first_non_finite(value, where: str = "") -> Optional[str]:
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return at or "(top level)"
        if isinstance(item, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
    return None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: PathLike, what: str = "JSON file", *, expect: Union[type, tuple] = dict,
              finite: bool = True, max_depth: int = MAX_JSON_DEPTH):
    """The JSON value in ``path``, which must be of type ``expect`` (an object by default).

    Every problem is a :class:`FileProblem` whose message is one line naming the file: missing,
    unreadable, not UTF-8, truncated or otherwise not JSON (with line and column), nested deeper
    than ``max_depth``, of the wrong type, or (with ``finite``) holding ``NaN`` / ``Infinity``
    or a number too large for a float.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileProblem(f"{what} {name}: not found") from None
    except OSError as err:
        raise FileProblem(os_error_line(err, name, "cannot read")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileProblem(f"{what} {name}: not UTF-8 text (byte {err.start})") from None
    if "\x00" in text:
        raise FileProblem(f"{what} {name}: holds NUL bytes (a damaged or partly written file)")
    if not text.strip():
        raise FileProblem(f"{what} {name}: empty (a damaged or partly written file)")
    try:
        value = json.loads(text, parse_constant=_refuse_constant if finite else None)
    except json.JSONDecodeError as err:
        raise FileProblem(f"{what} {name}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; "
                          f"truncated or damaged?)") from None
    except RecursionError:
        raise FileProblem(f"{what} {name}: nested too deeply to be a {what}") from None
    except ValueError as err:  # the refused constants
        raise FileProblem(f"{what} {name}: {err}") from None
    if not _depth_ok(value, max_depth):
        raise FileProblem(f"{what} {name}: nested more than {max_depth} levels deep; not a {what}")
    if not isinstance(value, expect):
        wanted = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        shown = {"dict": "object", "list": "array", "str": "string", "int": "number", "float": "number"}
        wanted = " or ".join(shown.get(w, w) for w in wanted.split(" or "))
        got = shown.get(type(value).__name__, type(value).__name__) if value is not None else "null"
        raise FileProblem(f"{what} {name}: holds a JSON {got}, expected an {wanted}")
    if finite:
        at = _first_non_finite(value)
        if at is not None:
            raise FileProblem(f"{what} {name}: {at} is not a finite number")
    return value


def load_checkpoint_safely(path: PathLike, what: str = "checkpoint", *, allowed: Iterable[type] = (),
                           mmap: Optional[bool] = None):
    """Read a PyTorch checkpoint with ``weights_only=True`` passed explicitly.

    Only tensors, plain containers and numbers, and the types in ``allowed`` (e.g.
    ``argparse.Namespace`` for fairseq's and timm's ``args``) can be in it: a file whose
    unpickling would call anything else is refused before anything in it runs, on every torch
    this project supports and whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. Tensors are
    mapped to the CPU (memory-mapped where the format allows, so a first safety read of a large
    checkpoint is cheap).

    Raises :class:`FileProblem` with one line naming the file: missing, a folder, not a
    checkpoint (text, truncated), or holding something that is not allowed.
    """
    import torch

    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileProblem(f"{what} {name}: not found")
    if os.path.isdir(name):
        raise FileProblem(f"{what} {name}: is a folder, not a checkpoint file")
    try:
        with open(name, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise FileProblem(os_error_line(err, name, f"cannot read {what}")) from None
    if not head:
        raise FileProblem(f"{what} {name}: empty (a damaged or partly written file)")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle format
        raise FileProblem(f"{what} {name}: not a PyTorch checkpoint file")
    allowed = list(allowed)
    if mmap is None:
        mmap = head == b"PK\x03\x04"
    already = set(torch.serialization.get_safe_globals())
    missing = [t for t in allowed if t not in already]
    # safe_globals() removes what it added on exit: only add what is not allowed already
    context = torch.serialization.safe_globals(missing) if missing else contextlib.nullcontext()
    try:
        with context:
            return torch.load(name, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as err:  # the file opened above: a truncated archive fails to map or seek
        raise FileProblem(f"{what} {name}: not a readable PyTorch checkpoint (a damaged or truncated file: "
                          f"{err.strerror or _one_line(err)})") from None
    except Exception as err:  # noqa: BLE001 -- pickle, zip and torch errors of many kinds
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            detail = _unsafe_detail(text)
            if not _names_something(detail):  # a name cut short: the file ends inside a reference
                raise FileProblem(f"{what} {name}: not a readable PyTorch checkpoint (a damaged or truncated "
                                  f"file: it names {detail!r}, which does not exist)") from None
            raise FileProblem(f"{what} {name}: refused, it holds objects that are not plain data ({detail}); "
                              f"only load files you trust with other tools") from None
        raise FileProblem(f"{what} {name}: not a readable PyTorch checkpoint ({_short_reason(err)})") from None


def _unsafe_detail(text: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("WeightsUnpickler error:", "Unsupported operand")):
            return _one_line(line.replace("WeightsUnpickler error: ", ""), 120)
    return "an unsupported global"


def _names_something(dotted: str) -> bool:
    """Whether ``module.attribute`` (as a pickle's GLOBAL names it) exists, without importing anything
    new: a hostile file names real callables (``posix.system``); a truncated one a cut name."""
    import sys

    module, _, attr = dotted.rpartition(".")
    if not module or not attr:
        return "." not in dotted and dotted != "" and " " in dotted  # an operand message, not a name
    loaded = sys.modules.get(module)
    if loaded is None:
        import importlib.util

        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    return hasattr(loaded, attr)


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    if "invalid load key" in first or isinstance(err, (UnicodeDecodeError, KeyError)):
        return "not a checkpoint file"
    if ("PytorchStreamReader" in first or "miniz" in first or "zip archive" in first or "unexpected EOF" in first
            or "corrupted" in first or "Ran out of input" in first or "unpack requires" in first
            or isinstance(err, (EOFError, IndexError))):
        return "a damaged or truncated file"
    return _one_line(f"{type(err).__name__}: {first}", 160)
