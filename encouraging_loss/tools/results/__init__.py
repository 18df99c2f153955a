"""Results of the recipes: collect run records, tabulate mean +- std, plot.

Run ``el-results ROOT [ROOT ...] --out DIR`` (or ``python -m encouraging_loss.tools.results``; ``--help``
for the options). One package serves the translation and the image recipes
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

The package:

* :mod:`.records`: reading, checking and collecting the records (and the CSV reader for damaged input);
* :mod:`.tables`: statistics over seeds, published values, the Markdown and CSV tables;
* :mod:`.plots`: the curve CSVs, the metric and curve plots, the Agg figure helper;
* :mod:`.output`: the output folder, every file written to a temporary name and renamed together;
* :mod:`.cli`: the command line (:func:`main`, :func:`build_parser`).
"""
# the constants outside __all__ are imported "as" themselves: public as before, not in ``import *``
from .cli import build_parser, main
from .plots import AUTO_CURVE_COLUMNS as AUTO_CURVE_COLUMNS
from .plots import (
    CurveDamaged,
    CurveData,
    choose_curve_columns,
    curve_plot_name,
    load_curve,
    loss_colours,
    metric_plot_name,
    plot_curves,
    plot_metric,
)
from .records import DEFAULT_BASELINE as DEFAULT_BASELINE
from .records import DEFAULT_TREATMENT as DEFAULT_TREATMENT
from .records import METRIC_LIMIT, SCHEMA, Record, RecordError, ResultsError, collect, loss_order, read_record
from .records import REQUIRED_TEXT_FIELDS as REQUIRED_TEXT_FIELDS
from .tables import DEFAULT_DECIMALS as DEFAULT_DECIMALS
from .tables import RESULTS_CSV as RESULTS_CSV
from .tables import SUMMARY_CSV as SUMMARY_CSV
from .tables import SUMMARY_MD as SUMMARY_MD
from .tables import (
    GroupSummary,
    LossSummary,
    MetricStats,
    Published,
    describe,
    difference_label,
    load_published,
    render_markdown,
    summarize,
    write_tables,
)

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
