"""The input side of the results: reading and checking ``el-result/1`` records, collecting them.

Also what the other input files share: :func:`read_csv_rows`, the CSV reader that refuses a damaged
file (``--published``, the curve CSVs), and the table order of the losses (:func:`loss_order`).
"""
import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..files import FileProblem, os_error_line, read_json

SCHEMA = "el-result/1"
DEFAULT_BASELINE = "ce"
DEFAULT_TREATMENT = "el"
REQUIRED_TEXT_FIELDS = ("task", "loss", "run", "checkpoint")
#: the largest magnitude a metric (or a published figure) may have: no score, loss or count comes near
#: it, and every mean, standard deviation, difference and plot axis made from such values stays finite
#: (1.7e308 is a finite float, but the mean of two of them is not)
METRIC_LIMIT = 1e100


class ResultsError(Exception):
    """Bad input for the results command; the message is one line for the user."""


class RecordError(ResultsError):
    """A malformed ``el-result`` record; the message names the file and the field."""

    def __init__(self, path, field_name, problem):
        self.path = Path(path)
        self.field = field_name
        super().__init__(f"{path}: field {field_name!r}: {problem}")


@dataclass(frozen=True)
class Record:
    """One evaluated checkpoint of one run, as read from an ``el-result/1`` JSON file.

    ``curve`` is the curve CSV's path resolved against the JSON file's folder
    (``None`` when the record names no curve); ``curve_ref`` is the text as written.
    """

    path: Path
    task: str
    loss: str
    seed: int
    run: str
    checkpoint: str
    metrics: Dict[str, float]
    info: dict = field(default_factory=dict, compare=False)
    curve: Optional[Path] = None
    curve_ref: Optional[str] = None


# ----------------------------------------------------------------------------- collect


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_record(path) -> Optional[Record]:
    """Read one JSON file: a :class:`Record` if its schema is ``el-result/1``, else ``None``.

    Files that are not JSON objects, or whose ``schema`` is not an
    ``el-result`` schema, are not records (``None``). A record with a missing or
    ill-typed field, a non-numeric or non-finite metric, or another
    ``el-result`` version raises :class:`RecordError` naming the file and field.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if b"el-result" not in raw:  # cheap test before parsing large unrelated JSON files
        return None
    try:
        # it mentions el-result: not JSON (truncated, NUL bytes, nested absurdly deep) is a broken
        # record, not a stranger; non-finite numbers are judged per field below
        data = read_json(path, "result record", expect=object, finite=False)
    except FileProblem as exc:
        raise ResultsError(str(exc)) from None
    if not isinstance(data, dict):
        return None
    schema = data.get("schema")
    if not (isinstance(schema, str) and schema.startswith("el-result/")):
        return None
    if schema != SCHEMA:
        raise RecordError(path, "schema", f"unsupported schema {schema!r} (this version reads {SCHEMA!r})")

    values = {}
    for name in REQUIRED_TEXT_FIELDS:
        if name not in data:
            raise RecordError(path, name, "missing")
        value = data[name]
        if not isinstance(value, str) or not value.strip():
            raise RecordError(path, name, f"expected a non-empty string, got {value!r}")
        values[name] = value.strip()

    if "seed" not in data:
        raise RecordError(path, "seed", "missing")
    seed = data["seed"]
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecordError(path, "seed", f"expected an integer, got {data['seed']!r}")

    if "metrics" not in data:
        raise RecordError(path, "metrics", "missing")
    metrics_in = data["metrics"]
    if not isinstance(metrics_in, dict) or not metrics_in:
        raise RecordError(path, "metrics", f"expected a non-empty object of numbers, got {metrics_in!r}")
    metrics = {}
    for name, value in metrics_in.items():
        if not name.strip():
            raise RecordError(path, "metrics", "empty metric name")
        if not _is_number(value):
            raise RecordError(path, f"metrics.{name}", f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RecordError(path, f"metrics.{name}", f"not a finite number: {value!r}")
        if abs(value) > METRIC_LIMIT:
            raise RecordError(path, f"metrics.{name}", f"{float(value):.6g} is too large to be a measurement "
                                                        f"(the limit is +-{METRIC_LIMIT:g}); a damaged record?")
        metrics[name.strip()] = float(value)

    info = data.get("info") or {}
    if not isinstance(info, dict):
        raise RecordError(path, "info", f"expected an object, got {type(info).__name__}")

    curve_ref = data.get("curve")
    curve = None
    if curve_ref is not None:
        if not isinstance(curve_ref, str) or not curve_ref.strip():
            raise RecordError(path, "curve", f"expected a path (string), got {curve_ref!r}")
        curve = Path(os.path.normpath(path.parent / os.path.expanduser(curve_ref)))

    return Record(path=path, seed=seed, metrics=metrics, info=info, curve=curve, curve_ref=curve_ref, **values)


def _json_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(".json"):
                yield Path(dirpath) / name


def loss_order(losses: Iterable[str], baseline: str = DEFAULT_BASELINE,
               treatment: str = DEFAULT_TREATMENT) -> List[str]:
    """The losses in table order: baseline, treatment, then the others alphabetically."""
    losses = set(losses)
    head = [name for name in (baseline, treatment) if name in losses]
    return head + sorted(losses - set(head))


def _record_key(rec: Record, baseline=DEFAULT_BASELINE, treatment=DEFAULT_TREATMENT):
    rank = {baseline: 0, treatment: 1}.get(rec.loss, 2)
    return (rec.task, rec.checkpoint, rank, rec.loss, rec.seed, rec.run, str(rec.path))


def collect(roots: Sequence, *, baseline: str = DEFAULT_BASELINE,
            treatment: str = DEFAULT_TREATMENT) -> List[Record]:
    """All ``el-result/1`` records under ``roots`` (folders searched recursively, or files).

    Returns them sorted by task, checkpoint, loss (baseline, treatment, others),
    seed and run. A file reached through two roots counts once. Raises
    :class:`ResultsError` when a root does not exist or no record is found, and
    when two files hold the same (task, checkpoint, loss, seed, run), which
    would otherwise count one run twice in the mean.
    """
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, os.PathLike)) else roots)]
    if not roots:
        raise ResultsError("no root folder given")
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        raise ResultsError(f"no such file or folder: {', '.join(missing)}")
    seen_files = set()
    by_key = {}
    records = []
    n_json = 0
    for root in roots:
        for path in _json_files(root):
            real = os.path.realpath(path)
            if real in seen_files:
                continue
            seen_files.add(real)
            n_json += 1
            rec = read_record(path)
            if rec is None:
                continue
            key = (rec.task, rec.checkpoint, rec.loss, rec.seed, rec.run)
            if key in by_key:
                raise ResultsError(
                    f"{rec.path}: duplicate record (task={rec.task}, checkpoint={rec.checkpoint}, "
                    f"loss={rec.loss}, seed={rec.seed}, run={rec.run}) also in {by_key[key].path}")
            by_key[key] = rec
            records.append(rec)
    if not records:
        raise ResultsError(f"no {SCHEMA} records found under {', '.join(str(r) for r in roots)} "
                           f"({n_json} JSON file{'s' if n_json != 1 else ''} searched)")
    records.sort(key=lambda r: _record_key(r, baseline, treatment))
    return records


def unique_in_order(items: Iterable[str]) -> List[str]:
    """``items`` without repeats, in order of first appearance."""
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------- CSV input


def read_csv_rows(path: Path, what: str, *, damaged=ResultsError, whole_lines: bool = False
                  ) -> List[Tuple[int, List[str]]]:
    """``(line number, cells)`` of every row of the CSV at ``path``.

    Raises ``damaged`` (a :class:`ResultsError`) with one line naming ``what``, the file and the
    line: NUL bytes (a file preallocated or cut off by a crash), not UTF-8, not CSV, and with
    ``whole_lines`` a last line without its line break (the writer stopped mid-row)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ResultsError(os_error_line(exc, path, f"cannot read {what}")) from None
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise damaged(f"{what} {path}: line {line} holds NUL bytes (a damaged or partly written file)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise damaged(f"{what} {path}: line {line} is not UTF-8 text (a damaged file?)") from None
    if not text.strip():
        raise damaged(f"{what} {path}: empty (a damaged or partly written file)")
    if whole_lines and not text.endswith(("\n", "\r")):
        line = text.count("\n") + 1
        raise damaged(f"{what} {path}: line {line} ends without a line break (truncated mid-row?)")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for cells in reader:
            rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise damaged(f"{what} {path}: line {reader.line_num} is not CSV ({exc})") from None
    return rows
