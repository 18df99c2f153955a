"""The tables of the results: statistics over seeds, published values, Markdown and CSV.

:func:`describe` and :func:`summarize` (mean +- sample std per task, checkpoint and loss, the
treatment - baseline difference), :func:`load_published` (``--published``), :func:`render_markdown`,
and the three table files (:func:`write_tables`; :func:`write_table_files` into a staging area).
"""
import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .output import Staging, check_free, make_out_dir
from .records import (
    DEFAULT_BASELINE,
    DEFAULT_TREATMENT,
    METRIC_LIMIT,
    Record,
    ResultsError,
    loss_order,
    read_csv_rows,
    unique_in_order,
)

DEFAULT_DECIMALS = 2
RESULTS_CSV, SUMMARY_CSV, SUMMARY_MD = "results.csv", "summary.csv", "summary.md"


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
        metrics = tuple(unique_in_order(m for r in recs for m in r.metrics))
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
        signatures = tuple(unique_in_order(
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
    lines = [(n, cells) for n, cells in read_csv_rows(path, "--published") if any(c.strip() for c in cells)]
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

# ----------------------------------------------------------------------------- Markdown


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


# ----------------------------------------------------------------------------- table files


def write_table_files(stage: Staging, paths: Sequence[Path], records: Sequence[Record],
                      summaries: Sequence[GroupSummary], decimals: int, published: Sequence[Published]) -> None:
    """``results.csv``, ``summary.csv`` and ``summary.md`` (``paths``, in that order) written through ``stage``.

    The files are described at :func:`write_tables`.
    """
    metrics = unique_in_order(m for r in records for m in r.metrics)
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
    check_free(paths, force)
    make_out_dir(out_dir)
    with Staging(out_dir) as stage:
        write_table_files(stage, paths, records, summaries, decimals, published)
    return paths
