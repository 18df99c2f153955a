"""The ``el-results`` command line: collect the records, summarize them, write the tables and plots.

:func:`main` (``python -m encouraging_loss.tools.results``) writes every table and plot to a
temporary name and renames them into place together (:class:`~.output.Staging`).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .output import Staging, check_free, make_out_dir
from .plots import (
    AUTO_CURVE_COLUMNS,
    CurveData,
    choose_curve_columns,
    curve_lines,
    curve_plot_name,
    load_curves,
    metric_plot_name,
    plot_curves,
    plot_metric,
    print_warning,
)
from .records import DEFAULT_BASELINE, DEFAULT_TREATMENT, ResultsError, collect, unique_in_order
from .tables import (
    DEFAULT_DECIMALS,
    RESULTS_CSV,
    SUMMARY_CSV,
    SUMMARY_MD,
    load_published,
    render_markdown,
    summarize,
    write_table_files,
)


def _plan_plots(records, summaries, curves, curve_columns) -> List[Tuple[str, dict]]:
    """(file name, plot arguments) for every PNG to write, checked for name collisions."""
    plans = []
    for g in summaries:
        for metric in g.metrics:
            plans.append((metric_plot_name(g.task, g.checkpoint, metric),
                          dict(kind="metric", task=g.task, checkpoint=g.checkpoint, metric=metric)))
    for task in unique_in_order(g.task for g in summaries):
        for column in choose_curve_columns(records, curves, task, curve_columns):
            if curve_lines(records, curves, task, column):  # never an empty plot file
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
    tasks = unique_in_order(r.task for r in records)
    print(f"{len(records)} record{'s' if len(records) != 1 else ''} ({len(summaries)} task/checkpoint "
          f"group{'s' if len(summaries) != 1 else ''}, tasks: {', '.join(tasks)}) under "
          f"{', '.join(args.roots)}", file=sys.stderr)

    plans = []
    curves: Dict[Path, CurveData] = {}
    if not args.no_plots:
        curves = load_curves(records, print_warning)
        plans = _plan_plots(records, summaries, curves, args.curve_column or ["auto"])
        for task in tasks:
            has_curve = any(r.curve is not None for r in records if r.task == task)
            if has_curve and not any(p["kind"] == "curve" and p["task"] == task for _, p in plans):
                wanted = ", ".join(args.curve_column or AUTO_CURVE_COLUMNS)
                print_warning(f"task {task}: no curve has a column among: {wanted}; no curve plot")

    tables = [out / RESULTS_CSV, out / SUMMARY_CSV, out / SUMMARY_MD]
    targets = tables + [out / name for name, _ in plans]
    check_free(targets, args.force)
    make_out_dir(out)

    # every table and plot to a temporary name first, renamed into place together: a read-only
    # folder or a full disk leaves no partial file (and with --force the previous files as they were)
    with Staging(out) as stage:
        write_table_files(stage, tables, records, summaries, args.decimals, published)
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
