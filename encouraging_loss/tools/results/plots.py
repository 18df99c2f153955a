"""The plots of the results: curve CSVs read and chosen, the per-seed metric plots and the curve plots.

matplotlib is imported only when a figure is made (:func:`new_figure`, the project's one Agg figure
helper, which :mod:`encouraging_loss.tools.analysis` uses too).
"""
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .records import DEFAULT_BASELINE, DEFAULT_TREATMENT, METRIC_LIMIT, Record, ResultsError, loss_order, read_csv_rows
from .tables import describe

# --curve-column auto: the first of these that a task's curves have
AUTO_CURVE_COLUMNS = ("valid_nll_loss", "eval_top1")


def print_warning(message: str) -> None:
    """``warning: <message>`` on stderr (the default ``warn`` of the functions here)."""
    print(f"warning: {message}", file=sys.stderr)


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
    lines = [(n, cells) for n, cells in read_csv_rows(path, "curve", damaged=CurveDamaged, whole_lines=True)
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
        (warn or print_warning)(f"curve {path}: {len(out_of_range)} value(s) not finite or beyond "
                                f"+-{METRIC_LIMIT:g} (first: {name} at epoch {e:g}) left out of the plots")
        columns = {name: [x if abs(x) <= METRIC_LIMIT else math.nan for x in values]
                   for name, values in columns.items()}
    # keep the columns that hold at least one number
    columns = {k: v for k, v in columns.items() if k == "epoch" or any(not math.isnan(x) for x in v)}
    return CurveData(path=path, columns=columns)


def curve_runs(records: Sequence[Record], task: str) -> List[Tuple[str, str, Path]]:
    """(loss, run, curve path) for each distinct run of ``task`` that names a curve."""
    seen = {}
    for r in records:
        if r.task == task and r.curve is not None:
            seen.setdefault((r.loss, r.run, r.curve), None)
    return list(seen)


def load_curves(records: Sequence[Record], warn: Callable[[str], None]) -> Dict[Path, CurveData]:
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
    for _, _, path in curve_runs(records, task):
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


def new_figure(width=6.4, height=4.4):
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
    fig = new_figure(max(5.6, 1.6 + 1.3 * len(losses)), 4.4)
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


def curve_lines(records: Sequence[Record], curves: Dict[Path, CurveData], task: str, column: str
                ) -> List[Tuple[str, str, List[Tuple[float, float]]]]:
    """(loss, run, [(epoch, value), ...]) of each run of ``task`` whose curve has numbers in ``column``."""
    lines = []
    for loss, run, cpath in curve_runs(records, task):
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
    warn = warn or print_warning
    if curves is None:
        curves = load_curves([r for r in records if r.task == task], warn)
    lines = curve_lines(records, curves, task, column)
    if not lines:
        return None
    losses = loss_order({loss for loss, _, _ in lines}, baseline, treatment)
    colours = loss_colours(losses, baseline, treatment)
    counts = {loss: sum(1 for lo, _, _ in lines if lo == loss) for loss in losses}
    fig = new_figure(6.4, 4.4)
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
