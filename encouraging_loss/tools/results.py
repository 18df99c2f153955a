"""Results of the recipes: collect run records, tabulate mean +- std, plot.

Run ``el-results ROOT [ROOT ...] --out DIR`` (or ``python -m encouraging_loss.tools.results``; ``--help``
for the options). One module serves the translation and the image recipes
alike; it is framework-free (standard library, matplotlib for the PNGs,
imported only when plotting) and never imports torch, fairseq or timm itself.

Input: every ``*.json`` file under the roots (searched recursively) whose
``"schema"`` is ``"el-result/1"``; other JSON files are ignored. A record::

    {"schema": "el-result/1",
     "task": "iwslt14_de_en",           # recipe / dataset name
     "loss": "el",                      # loss label ("ce", "el", ...)
     "seed": 1,                         # integer
     "run": "el-seed1",                 # run label
     "checkpoint": "avg_last10",        # "best", "last", ...
     "metrics": {"bleu": 35.1, "sacrebleu": 34.0},   # numbers, higher is better
     "info": {...},                     # optional, free-form
     "curve": "../curve.csv"}           # optional, relative to the JSON's folder

``curve`` names a CSV with an ``epoch`` column and numeric columns (the
translation recipes' ``valid_nll_loss``, ...; timm's ``summary.csv``:
``epoch, train_loss, eval_loss, eval_top1, eval_top5, lr``).

Output (into ``--out``; existing files are refused unless ``--force``):

* ``results.csv``: one row per record;
* ``summary.csv`` / ``summary.md``: per (task, checkpoint) and loss, n and the
  mean +- sample standard deviation (ddof=1) over seeds, min and max of each
  metric, and the difference of means ``treatment - baseline`` ("EL - CE");
* ``<task>__<checkpoint>__<metric>.png``: the metric per seed for each loss;
* ``<task>__curve__<column>.png``: a curve column per epoch, one line per run.

The Markdown summary goes to stdout, the list of files written to stderr.

Damaged input and failed writes are one line (``error: ...``, exit status 1)
naming the file: a record that is not JSON, is cut off, holds NUL bytes or is
nested absurdly deep; a metric that is not a finite number or beyond
+-``METRIC_LIMIT`` (1e100: 1.7e308 is a finite float, but the mean of two is
not, so such a record is refused, naming its field); a curve CSV with NUL
bytes, a row cut off or run together with the next (``--no-plots`` skips the
curves); a read-only ``--out`` or a full disk. Every table and plot is written
to a temporary name and renamed into place only when all of them are
complete: a failure leaves no partial file (no 0-byte PNG), and with
``--force`` the previous files as they were.
"""
import argparse
import contextlib
import csv
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .files import FileProblem, atomic_path, check_writable_dir, os_error_line, read_json

SCHEMA = "el-result/1"
DEFAULT_BASELINE = "ce"
DEFAULT_TREATMENT = "el"
DEFAULT_DECIMALS = 2
# --curve-column auto: the first of these that a task's curves have
AUTO_CURVE_COLUMNS = ("valid_nll_loss", "eval_top1")
REQUIRED_TEXT_FIELDS = ("task", "loss", "run", "checkpoint")
#: the largest magnitude a metric (or a published figure) may have: no score, loss or count comes near
#: it, and every mean, standard deviation, difference and plot axis made from such values stays finite
#: (1.7e308 is a finite float, but the mean of two of them is not)
METRIC_LIMIT = 1e100

__all__ = [
    "METRIC_LIMIT",
    "SCHEMA",
    "CurveDamaged",
    "CurveData",
    "GroupSummary",
    "LossSummary",
    "MetricStats",
    "Published",
    "Record",
    "RecordError",
    "ResultsError",
    "build_parser",
    "choose_curve_columns",
    "collect",
    "curve_plot_name",
    "describe",
    "difference_label",
    "load_curve",
    "load_published",
    "loss_colours",
    "loss_order",
    "main",
    "metric_plot_name",
    "plot_curves",
    "plot_metric",
    "read_record",
    "render_markdown",
    "summarize",
    "write_tables",
]


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


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class MetricStats:
    """n, mean, sample standard deviation (ddof=1; ``None`` when n = 1), min, max of one metric."""

    n: int
    mean: float
    std: Optional[float]
    min: float
    max: float


@dataclass(frozen=True)
class LossSummary:
    """One loss within a (task, checkpoint): its record count and per-metric statistics."""

    loss: str
    n: int
    seeds: Tuple[int, ...]
    stats: Dict[str, MetricStats]


@dataclass(frozen=True)
class GroupSummary:
    """The summary of one (task, checkpoint).

    ``difference`` maps each metric to ``mean(treatment) - mean(baseline)``
    (``None`` where one side lacks the metric); it is ``None`` as a whole when
    one of the two losses has no records, and ``note`` then says why.
    """

    task: str
    checkpoint: str
    metrics: Tuple[str, ...]
    losses: Tuple[LossSummary, ...]
    baseline: str
    treatment: str
    difference: Optional[Dict[str, Optional[float]]]
    note: Optional[str] = None
    signatures: Tuple[str, ...] = ()

    @property
    def difference_label(self) -> str:
        return difference_label(self.baseline, self.treatment)


def difference_label(baseline: str = DEFAULT_BASELINE, treatment: str = DEFAULT_TREATMENT) -> str:
    """The label of the difference row, e.g. ``"EL - CE"``."""
    return f"{treatment.upper()} - {baseline.upper()}"


def describe(values: Sequence[float]) -> MetricStats:
    """n, mean, sample std (ddof=1, ``None`` for a single value), min and max of ``values``.

    The sums are taken with :func:`math.fsum`, so the mean of ``[35.0, 35.2,
    35.4]`` is 35.2 and its std 0.2 up to one rounding.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("describe() needs finite values")
    # computed on the values scaled by a power of two (exact), so that no sum or square overflows
    top = max(abs(v) for v in values)
    exponent = math.frexp(top)[1]
    scaled = [math.ldexp(v, -exponent) for v in values]  # |u| < 1
    mean_s = math.fsum(scaled) / n
    try:
        mean = math.ldexp(mean_s, exponent)
        std = math.ldexp(math.sqrt(math.fsum((u - mean_s) ** 2 for u in scaled) / (n - 1)), exponent) \
            if n > 1 else None
    except OverflowError:
        raise ValueError(f"describe(): the standard deviation of values up to {top:.6g} "
                         "is too large for a float") from None
    return MetricStats(n=n, mean=mean, std=std, min=min(values), max=max(values))


def _unique_in_order(items: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(items))


def summarize(records: Sequence[Record], baseline: str = DEFAULT_BASELINE,
              treatment: str = DEFAULT_TREATMENT) -> List[GroupSummary]:
    """Per (task, checkpoint) and loss: n and :func:`describe` of each metric over the records.

    Also the difference of means ``treatment - baseline`` per metric (the
    "EL - CE" row), skipped with a note when either loss has no record in
    that (task, checkpoint). Groups come sorted by task then checkpoint;
    within a group, losses in :func:`loss_order` and metrics in order of first
    appearance. Tasks and checkpoints are never pooled.
    """
    groups: Dict[Tuple[str, str], List[Record]] = {}
    for rec in records:
        groups.setdefault((rec.task, rec.checkpoint), []).append(rec)
    out = []
    for (task, checkpoint) in sorted(groups):
        recs = groups[(task, checkpoint)]
        metrics = tuple(_unique_in_order(m for r in recs for m in r.metrics))
        losses = []
        for loss in loss_order((r.loss for r in recs), baseline, treatment):
            mine = [r for r in recs if r.loss == loss]
            stats = {}
            for metric in metrics:
                values = [r.metrics[metric] for r in mine if metric in r.metrics]
                if values:
                    stats[metric] = describe(values)
            losses.append(LossSummary(loss=loss, n=len(mine), seeds=tuple(sorted(r.seed for r in mine)),
                                      stats=stats))
        by_loss = {s.loss: s for s in losses}
        missing = [name for name in (baseline, treatment) if name not in by_loss]
        if missing:
            difference = None
            note = (f"{difference_label(baseline, treatment)} not computed: no "
                    f"{' and no '.join(repr(m) for m in missing)} runs for this task and checkpoint.")
        else:
            difference, note = {}, None
            for metric in metrics:
                b, t = by_loss[baseline].stats.get(metric), by_loss[treatment].stats.get(metric)
                difference[metric] = None if b is None or t is None else t.mean - b.mean
        signatures = tuple(_unique_in_order(
            str(r.info["sacrebleu_signature"]) for r in recs if r.info.get("sacrebleu_signature")))
        out.append(GroupSummary(task=task, checkpoint=checkpoint, metrics=metrics, losses=tuple(losses),
                                baseline=baseline, treatment=treatment, difference=difference, note=note,
                                signatures=signatures))
    return out


# ----------------------------------------------------------------------------- published values


@dataclass(frozen=True)
class Published:
    """A published figure to print beside the measured ones (``--published``)."""

    task: str
    loss: str
    metric: str
    mean: float
    std: Optional[float]
    checkpoint: Optional[str] = None  # None: every checkpoint of the task


def load_published(path) -> List[Published]:
    """Read ``--published``: a CSV with columns task, loss, metric, mean and optional std, checkpoint.

    An empty std means none was published; an empty or absent checkpoint
    applies the row to every checkpoint of the task. A damaged file (NUL bytes, not UTF-8, a line
    with more or fewer cells than the header) or a mean/std that is not a finite number within
    +-:data:`METRIC_LIMIT` raises :class:`ResultsError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"--published: no such file: {path}")
    lines = [(n, cells) for n, cells in _csv_lines(path, "--published") if any(c.strip() for c in cells)]
    header = [h.strip() for h in lines[0][1]] if lines else []
    need = {"task", "loss", "metric", "mean"}
    missing = need - set(header)
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                           f"(need task, loss, metric, mean; optional std, checkpoint)")
    rows = []
    for line, cells in lines[1:]:
        if len(cells) != len(header):
            raise ResultsError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)} (a damaged line?)")
        row = dict(zip(header, cells))
        try:
            mean = float(row["mean"])
            std = float(row["std"]) if (row.get("std") or "").strip() else None
        except ValueError:
            raise ResultsError(f"{path}:{line}: mean/std must be numbers, got "
                               f"{row.get('mean')!r}/{row.get('std')!r}") from None
        for name, x in (("mean", mean), ("std", std)):
            if x is not None and not (math.isfinite(x) and abs(x) <= METRIC_LIMIT):
                raise ResultsError(f"{path}:{line}: {name} {x!r} is not a finite number within +-{METRIC_LIMIT:g}")
        rows.append(Published(task=row["task"].strip(), loss=row["loss"].strip(),
                              metric=row["metric"].strip(), mean=mean, std=std,
                              checkpoint=(row.get("checkpoint") or "").strip() or None))
    return rows


def _published_for(group: GroupSummary, published: Sequence[Published]) -> Dict[str, Dict[str, Published]]:
    """loss -> metric -> published figure, for one group."""
    out: Dict[str, Dict[str, Published]] = {}
    for p in published:
        if p.task == group.task and p.checkpoint in (None, group.checkpoint) and p.metric in group.metrics:
            out.setdefault(p.loss, {})[p.metric] = p
    return out


# ----------------------------------------------------------------------------- tables


def _fmt(x: float, decimals: int) -> str:
    text = f"{x:.{decimals}f}"
    return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def _fmt_diff(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    return "+" + text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def _cell(mean: float, std: Optional[float], decimals: int) -> str:
    return f"{_fmt(mean, decimals)} +- {'-' if std is None else _fmt(std, decimals)}"


def _num(x: Optional[float]) -> str:
    """A number for the CSV files: rounded to 10 decimals (hides float noise), '' for none."""
    return "" if x is None else repr(round(float(x), 10))


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(summaries: Sequence[GroupSummary], decimals: int = DEFAULT_DECIMALS,
                    published: Sequence[Published] = ()) -> str:
    """The Markdown summary: one table per (task, checkpoint).

    Columns ``| loss | n | <metric> ... |``, cells ``mean +- std`` (``-`` for
    the std of a single run; ``(n=k)`` added when a metric has fewer values
    than the loss has records), then the ``EL - CE`` row of mean differences
    (``+0.41``), then any published figures.
    """
    parts = []
    for g in summaries:
        parts.append(f"## {g.task}, checkpoint {g.checkpoint}\n")
        header = ["loss", "n"] + [_md_escape(m) for m in g.metrics]
        lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(g.metrics)]
        for s in g.losses:
            cells = [_md_escape(s.loss), str(s.n)]
            for m in g.metrics:
                st = s.stats.get(m)
                if st is None:
                    cells.append("-")
                else:
                    cells.append(_cell(st.mean, st.std, decimals) + (f" (n={st.n})" if st.n != s.n else ""))
            lines.append("| " + " | ".join(cells) + " |")
        if g.difference is not None:
            cells = [g.difference_label, ""] + [
                "-" if g.difference[m] is None else _fmt_diff(g.difference[m], decimals) for m in g.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        pub = _published_for(g, published)
        for loss in loss_order(pub, g.baseline, g.treatment):
            cells = [f"{_md_escape(loss)} (published)", ""] + [
                _cell(pub[loss][m].mean, pub[loss][m].std, decimals) if m in pub[loss] else "-"
                for m in g.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        if g.baseline in pub and g.treatment in pub:
            b, t = pub[g.baseline], pub[g.treatment]
            cells = [f"{g.difference_label} (published)", ""] + [
                _fmt_diff(t[m].mean - b[m].mean, decimals) if m in t and m in b else "-" for m in g.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
        notes = []
        if g.note:
            notes.append(g.note)
        if g.signatures:
            notes.append("sacreBLEU signature: " + "; ".join(f"`{s}`" for s in g.signatures))
        if notes:
            parts.append("\n".join(notes) + "\n")
    parts.append("mean +- sample standard deviation (ddof=1) over seeds; n: runs; "
                 f"{difference_label(summaries[0].baseline, summaries[0].treatment) if summaries else 'EL - CE'}:"
                 " difference of the means.\n")
    return "\n".join(parts)


RESULTS_CSV, SUMMARY_CSV, SUMMARY_MD = "results.csv", "summary.csv", "summary.md"


def _check_free(paths: Sequence[Path], force: bool) -> None:
    folders = [p for p in paths if p.is_dir()]
    if folders:  # found now, not when the files are renamed into place
        raise ResultsError(f"{folders[0]} is a folder, where the results write a file")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ResultsError(f"refusing to overwrite {', '.join(existing)} (use --force)")


class _Staging:
    """Files written to temporary names beside their targets, renamed into place together when
    the ``with`` block ends without an error, all removed otherwise (:func:`atomic_path` each).

    An ``OSError`` (a read-only folder, a full disk) becomes a :class:`ResultsError` with one line
    naming the file being written; nothing partial is left, and the targets keep what they held.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.current = self.out_dir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Staging":
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


def _write_table_files(stage: _Staging, paths: Sequence[Path], records: Sequence[Record],
                       summaries: Sequence[GroupSummary], decimals: int, published: Sequence[Published]) -> None:
    metrics = _unique_in_order(m for r in records for m in r.metrics)
    with open(stage.path(paths[0]), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "checkpoint", "loss", "seed", "run", *metrics, "curve", "path"])
        for r in records:
            w.writerow([r.task, r.checkpoint, r.loss, r.seed, r.run,
                        *(_num(r.metrics.get(m)) for m in metrics),
                        "" if r.curve is None else str(r.curve), str(r.path)])

    with open(stage.path(paths[1]), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "checkpoint", "loss", "metric", "n", "mean", "std", "min", "max"])
        for g in summaries:
            for s in g.losses:
                for m in g.metrics:
                    st = s.stats.get(m)
                    if st is not None:
                        w.writerow([g.task, g.checkpoint, s.loss, m, st.n, _num(st.mean), _num(st.std),
                                    _num(st.min), _num(st.max)])
            if g.difference is not None:
                for m in g.metrics:
                    if g.difference[m] is not None:
                        w.writerow([g.task, g.checkpoint, g.difference_label, m, "", _num(g.difference[m]),
                                    "", "", ""])

    stage.path(paths[2]).write_text(render_markdown(summaries, decimals, published), encoding="utf-8")


def _make_out_dir(out_dir: Path) -> Path:
    try:
        return check_writable_dir(out_dir, "--out")
    except FileProblem as err:
        raise ResultsError(str(err)) from None


def write_tables(records: Sequence[Record], summaries: Sequence[GroupSummary], out_dir,
                 decimals: int = DEFAULT_DECIMALS, published: Sequence[Published] = (),
                 force: bool = False) -> List[Path]:
    """Write ``results.csv``, ``summary.csv`` and ``summary.md`` into ``out_dir``; return their paths.

    ``results.csv``: task, checkpoint, loss, seed, run, one column per metric
    (empty where a record lacks it), curve, path. ``summary.csv``: task,
    checkpoint, loss, metric, n, mean, std, min, max, full precision (std empty
    for n = 1), plus rows whose loss is the difference label (``EL - CE``)
    with the difference of means in ``mean``. ``summary.md``:
    :func:`render_markdown`. Existing files are refused unless ``force``.
    The three files are written together or not at all: a failed write (a
    read-only folder, a full disk) raises :class:`ResultsError` and leaves no
    partial file.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / RESULTS_CSV, out_dir / SUMMARY_CSV, out_dir / SUMMARY_MD]
    _check_free(paths, force)
    _make_out_dir(out_dir)
    with _Staging(out_dir) as stage:
        _write_table_files(stage, paths, records, summaries, decimals, published)
    return paths


# ----------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class CurveData:
    """A curve CSV: its numeric columns by name, rows sorted by epoch (the last row of a repeated epoch wins)."""

    path: Path
    columns: Dict[str, List[float]]

    @property
    def epoch(self) -> List[float]:
        return self.columns["epoch"]


def _to_float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class CurveDamaged(ResultsError):
    """A curve CSV that is damaged (NUL bytes, not UTF-8, a truncated or run-together line): the
    results command stops on it, where a missing curve is only a warning."""


def _csv_lines(path: Path, what: str, *, damaged=ResultsError, whole_lines: bool = False
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


def _is_header(cells: Sequence[str]) -> bool:
    """A header line: it names an ``epoch`` column and holds no number."""
    stripped = [c.strip() for c in cells]
    return "epoch" in stripped and all(math.isnan(_to_float(c)) for c in stripped)


def load_curve(path, warn: Optional[Callable[[str], None]] = None) -> CurveData:
    """Read a per-epoch CSV (needs an ``epoch`` column); non-numeric cells become NaN.

    Repeated header lines (timm writes one again after a resume) are skipped,
    and when an epoch appears twice (a resumed run re-logging epochs) the
    later row wins. Raises :class:`ResultsError` for a missing file or no
    ``epoch`` column, and :class:`CurveDamaged` naming the line for a damaged
    file: NUL bytes, not UTF-8, a last line cut off without its line break, or
    a line with more or fewer cells than its header (truncated mid-row, or two
    lines run together). Cells that are not finite or beyond +-:data:`METRIC_LIMIT` (a diverged
    loss) are left out of the plots like empty ones, said once through ``warn``.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"cannot read curve {path}: No such file or directory")
    lines = [(n, cells) for n, cells in _csv_lines(path, "curve", damaged=CurveDamaged, whole_lines=True)
             if any(c.strip() for c in cells)]
    header = [h.strip() for h in lines[0][1]]
    if "epoch" not in header:
        raise ResultsError(f"curve {path} has no 'epoch' column (columns: {', '.join(header)})")
    names = list(header)  # every column, in order of first appearance
    by_epoch: Dict[float, Dict[str, str]] = {}
    for number, cells in lines[1:]:
        if _is_header(cells):  # written again after a resume (maybe with other columns)
            header = [h.strip() for h in cells]
            names.extend(h for h in header if h not in names)
            continue
        if len(cells) != len(header):
            raise CurveDamaged(f"curve {path}: line {number} has {len(cells)} cells, its header {len(header)} "
                               f"(a row truncated or run together with the next)")
        row = dict(zip(header, cells))
        epoch = _to_float(row.get("epoch"))
        if not abs(epoch) <= METRIC_LIMIT:  # NaN too
            continue
        by_epoch.pop(epoch, None)
        by_epoch[epoch] = row
    epochs = sorted(by_epoch)
    columns = {name: [_to_float(by_epoch[e].get(name)) for e in epochs] for name in names}
    out_of_range = [(name, e) for name, values in columns.items() for e, x in zip(epochs, values)
                    if not math.isnan(x) and not abs(x) <= METRIC_LIMIT]
    if out_of_range:
        name, e = out_of_range[0]
        (warn or _warn)(f"curve {path}: {len(out_of_range)} value(s) not finite or beyond +-{METRIC_LIMIT:g} "
                        f"(first: {name} at epoch {e:g}) left out of the plots")
        columns = {name: [x if abs(x) <= METRIC_LIMIT else math.nan for x in values]
                   for name, values in columns.items()}
    # keep the columns that hold at least one number
    columns = {k: v for k, v in columns.items() if k == "epoch" or any(not math.isnan(x) for x in v)}
    return CurveData(path=path, columns=columns)


def _curve_runs(records: Sequence[Record], task: str) -> List[Tuple[str, str, Path]]:
    """(loss, run, curve path) for each distinct run of ``task`` that names a curve."""
    seen = {}
    for r in records:
        if r.task == task and r.curve is not None:
            seen.setdefault((r.loss, r.run, r.curve), None)
    return list(seen)


def _load_curves(records: Sequence[Record], warn: Callable[[str], None]) -> Dict[Path, CurveData]:
    """Every curve the records name, read once; missing or unreadable ones reported through ``warn``."""
    out: Dict[Path, CurveData] = {}
    failed = set()
    for r in records:
        if r.curve is None or r.curve in out or r.curve in failed:
            continue
        if not r.curve.is_file():
            warn(f"{r.path}: curve file not found: {r.curve} (curve {r.curve_ref!r}); its run has no curve")
            failed.add(r.curve)
            continue
        try:
            out[r.curve] = load_curve(r.curve, warn)
        except CurveDamaged as exc:
            raise CurveDamaged(f"{exc}; named by {r.path} (repair or remove the file, or the record's "
                               f"\"curve\")") from None
        except ResultsError as exc:
            warn(f"{r.path}: {exc}; its run has no curve")
            failed.add(r.curve)
    return out


def choose_curve_columns(records: Sequence[Record], curves: Dict[Path, CurveData], task: str,
                         requested: Sequence[str] = ("auto",)) -> List[str]:
    """The curve columns to plot for ``task``.

    ``"auto"`` picks the first of ``valid_nll_loss``, ``eval_top1`` that one of
    the task's curves has (none: nothing to plot); other names are kept when
    one of the task's curves has them.
    """
    available = set()
    for _, _, path in _curve_runs(records, task):
        if path in curves:
            available.update(curves[path].columns)
    available.discard("epoch")
    chosen = []
    for name in requested:
        if name == "auto":
            name = next((c for c in AUTO_CURVE_COLUMNS if c in available), None)
        if name is not None and name in available and name not in chosen:
            chosen.append(name)
    return chosen


# ----------------------------------------------------------------------------- plots


def _safe(text: str) -> str:
    """A file-name-safe form of a label: letters, digits, '.', '-', '_' kept, the rest '_'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return text or "_"


def metric_plot_name(task: str, checkpoint: str, metric: str) -> str:
    """``<task>__<checkpoint>__<metric>.png`` with unsafe characters replaced by ``_``."""
    return f"{_safe(task)}__{_safe(checkpoint)}__{_safe(metric)}.png"


def curve_plot_name(task: str, column: str) -> str:
    """``<task>__curve__<column>.png`` with unsafe characters replaced by ``_``."""
    return f"{_safe(task)}__curve__{_safe(column)}.png"


_BASELINE_COLOUR, _TREATMENT_COLOUR = "#1f77b4", "#d62728"  # blue, red
_OTHER_COLOURS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def loss_colours(losses: Iterable[str], baseline: str = DEFAULT_BASELINE,
                 treatment: str = DEFAULT_TREATMENT) -> Dict[str, str]:
    """A colour per loss, the same in every plot: baseline blue, treatment red, others after."""
    colours = {}
    others = iter(_OTHER_COLOURS * 10)
    for loss in loss_order(losses, baseline, treatment):
        colours[loss] = (_BASELINE_COLOUR if loss == baseline else
                         _TREATMENT_COLOUR if loss == treatment else next(others))
    return colours


def _figure(width=6.4, height=4.4):
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_metric(records: Sequence[Record], path, *, task: str, checkpoint: str, metric: str,
                baseline: str = DEFAULT_BASELINE, treatment: str = DEFAULT_TREATMENT) -> Path:
    """PNG of one metric of one (task, checkpoint): per loss, a dot per seed, the mean, +- 1 std.

    Losses side by side in :func:`loss_order`; the mean is a horizontal bar,
    the error bar the sample standard deviation (none for a single run), and
    each dot is labelled with its seed.
    """
    recs = [r for r in records if r.task == task and r.checkpoint == checkpoint and metric in r.metrics]
    if not recs:
        raise ResultsError(f"no {metric!r} values for task {task!r}, checkpoint {checkpoint!r}")
    losses = loss_order((r.loss for r in recs), baseline, treatment)
    colours = loss_colours(losses, baseline, treatment)
    fig = _figure(max(5.6, 1.6 + 1.3 * len(losses)), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for x, loss in enumerate(losses):
        mine = sorted((r for r in recs if r.loss == loss), key=lambda r: (r.seed, r.run))
        values = [r.metrics[metric] for r in mine]
        st = describe(values)
        k = len(values)
        offsets = [0.0] if k == 1 else [-0.18 + 0.36 * i / (k - 1) for i in range(k)]
        xs = [x + o for o in offsets]
        ax.scatter(xs, values, s=28, color=colours[loss], zorder=3, label=f"{loss} (n={k})")
        for xi, r in zip(xs, mine):
            ax.annotate(str(r.seed), (xi, r.metrics[metric]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color="0.3")
        ax.hlines(st.mean, x - 0.3, x + 0.3, color=colours[loss], linewidth=2.2, zorder=2)
        if st.std is not None:
            ax.errorbar([x + 0.32], [st.mean], yerr=[st.std], fmt="none", ecolor=colours[loss],
                        elinewidth=1.5, capsize=4, zorder=2)
    ax.set_xticks(range(len(losses)))
    ax.set_xticklabels(losses)
    ax.set_xlim(-0.7, len(losses) - 0.3)
    ax.set_xlabel("loss")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}, checkpoint {checkpoint}: {metric}\n"
                 "dots: seeds (labelled), bar: mean, error bar: sample std", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _curve_lines(records: Sequence[Record], curves: Dict[Path, CurveData], task: str, column: str
                 ) -> List[Tuple[str, str, List[Tuple[float, float]]]]:
    """(loss, run, [(epoch, value), ...]) of each run of ``task`` whose curve has numbers in ``column``."""
    lines = []
    for loss, run, cpath in _curve_runs(records, task):
        data = curves.get(cpath)
        if data is None or column not in data.columns:
            continue
        pts = [(e, v) for e, v in zip(data.epoch, data.columns[column]) if not math.isnan(v)]
        if pts:
            lines.append((loss, run, pts))
    return lines


def plot_curves(records: Sequence[Record], path, *, task: str, column: str,
                curves: Optional[Dict[Path, CurveData]] = None,
                baseline: str = DEFAULT_BASELINE, treatment: str = DEFAULT_TREATMENT,
                warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """PNG of one curve column over epochs for ``task``: a line per run, coloured by loss.

    Runs are deduplicated: records of the same (loss, run) naming the same
    curve CSV draw one line. The legend has one entry per loss with its run
    count. ``curves`` is a cache from curve path to :class:`CurveData` (read
    here when absent). Returns ``None`` (nothing written) when no run's curve
    has the column.
    """
    warn = warn or _warn
    if curves is None:
        curves = _load_curves([r for r in records if r.task == task], warn)
    lines = _curve_lines(records, curves, task, column)
    if not lines:
        return None
    losses = loss_order({loss for loss, _, _ in lines}, baseline, treatment)
    colours = loss_colours(losses, baseline, treatment)
    counts = {loss: sum(1 for lo, _, _ in lines if lo == loss) for loss in losses}
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    labelled = set()
    for loss in losses:
        for lo, run, pts in lines:
            if lo != loss:
                continue
            label = None if loss in labelled else f"{loss} ({counts[loss]} run{'s' if counts[loss] != 1 else ''})"
            labelled.add(loss)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=colours[loss], alpha=0.8, linewidth=1.4,
                    marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(column)
    ax.set_title(f"{task}: {column} per epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="loss", title_fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- command line


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _plan_plots(records, summaries, curves, curve_columns) -> List[Tuple[str, dict]]:
    """(file name, plot arguments) for every PNG to write, checked for name collisions."""
    plans = []
    for g in summaries:
        for metric in g.metrics:
            plans.append((metric_plot_name(g.task, g.checkpoint, metric),
                          dict(kind="metric", task=g.task, checkpoint=g.checkpoint, metric=metric)))
    for task in _unique_in_order(g.task for g in summaries):
        for column in choose_curve_columns(records, curves, task, curve_columns):
            if _curve_lines(records, curves, task, column):  # never an empty plot file
                plans.append((curve_plot_name(task, column), dict(kind="curve", task=task, column=column)))
    names = [name for name, _ in plans]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ResultsError(f"plot file names collide after making labels file-safe: {', '.join(clashes)}")
    return plans


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only for options that have a meaningful default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m encouraging_loss.tools.results``."""
    parser = argparse.ArgumentParser(
        prog="el-results",
        description="Collect el-result/1 JSON records (written by the translation and image recipes) "
        "into results.csv, summary.csv and summary.md (mean +- sample std over seeds per task, "
        "checkpoint and loss, n, treatment - baseline) and PNG plots. The Markdown summary is "
        "printed on stdout, the files written on stderr.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("roots", nargs="+", metavar="ROOT",
                        help="folders searched recursively for *.json records (or record files)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="loss label of the baseline")
    parser.add_argument("--treatment", default=DEFAULT_TREATMENT,
                        help="loss label of the treatment (difference row: treatment - baseline)")
    parser.add_argument("--decimals", type=int, default=DEFAULT_DECIMALS,
                        help="decimals in the Markdown table")
    parser.add_argument("--curve-column", action="append", default=None, metavar="NAME",
                        help="curve CSV column to plot per epoch (repeatable); 'auto': "
                        f"the first of {', '.join(AUTO_CURVE_COLUMNS)} present, else no curve plot "
                        "(default: auto)")
    parser.add_argument("--published", metavar="CSV", default=None,
                        help="published figures to show beside the measured ones: CSV with columns "
                        "task, loss, metric, mean and optional std, checkpoint")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: collect, summarize, write tables and plots; 0 on success, 1 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.decimals < 0 or args.decimals > 12:
        parser.error(f"--decimals must be in 0..12, got {args.decimals}")
    if args.baseline == args.treatment:
        parser.error(f"--baseline and --treatment are both {args.baseline!r}")
    try:
        return _run(args)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ResultsError(f"--out {out} exists and is not a folder")
    published = load_published(args.published) if args.published else []
    records = collect(args.roots, baseline=args.baseline, treatment=args.treatment)
    summaries = summarize(records, args.baseline, args.treatment)
    tasks = _unique_in_order(r.task for r in records)
    print(f"{len(records)} record{'s' if len(records) != 1 else ''} ({len(summaries)} task/checkpoint "
          f"group{'s' if len(summaries) != 1 else ''}, tasks: {', '.join(tasks)}) under "
          f"{', '.join(args.roots)}", file=sys.stderr)

    plans = []
    curves: Dict[Path, CurveData] = {}
    if not args.no_plots:
        curves = _load_curves(records, _warn)
        plans = _plan_plots(records, summaries, curves, args.curve_column or ["auto"])
        for task in tasks:
            has_curve = any(r.curve is not None for r in records if r.task == task)
            if has_curve and not any(p["kind"] == "curve" and p["task"] == task for _, p in plans):
                wanted = ", ".join(args.curve_column or AUTO_CURVE_COLUMNS)
                _warn(f"task {task}: no curve has a column among: {wanted}; no curve plot")

    tables = [out / RESULTS_CSV, out / SUMMARY_CSV, out / SUMMARY_MD]
    targets = tables + [out / name for name, _ in plans]
    _check_free(targets, args.force)
    _make_out_dir(out)

    # every table and plot to a temporary name first, renamed into place together: a read-only
    # folder or a full disk leaves no partial file (and with --force the previous files as they were)
    with _Staging(out) as stage:
        _write_table_files(stage, tables, records, summaries, args.decimals, published)
        for name, p in plans:
            if p["kind"] == "metric":
                plot_metric(records, stage.path(out / name), task=p["task"], checkpoint=p["checkpoint"],
                            metric=p["metric"], baseline=args.baseline, treatment=args.treatment)
            elif plot_curves(records, stage.path(out / name), task=p["task"], column=p["column"],
                             curves=curves, baseline=args.baseline, treatment=args.treatment) is None:
                raise ResultsError(f"{out / name}: no curve data to plot")  # _plan_plots rules this out
    written = targets
    sys.stdout.write(render_markdown(summaries, args.decimals, published))
    sys.stdout.flush()
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
