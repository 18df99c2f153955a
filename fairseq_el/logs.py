"""Per-epoch curves from a ``fairseq-train`` log.

Reads what ``fairseq-train`` writes in its two machine-readable formats,
whether captured from its output (``fairseq-train ... 2>&1 | tee train.log``,
each line ``DATE TIME | INFO | TAG | MESSAGE``) or written with
``--log-file`` (the bare ``MESSAGE``):

* ``--log-format json``::

      ... | valid | {"epoch": 1, "valid_loss": "8.43", "valid_nll_loss": "8.1", ..., "valid_num_updates": "120"}
      ... | train | {"epoch": 1, "train_loss": "9.2", ..., "train_num_updates": "120", "train_wall": "60"}

* ``--log-format simple`` (and ``tqdm``, whose epoch summaries are the same)::

      ... | valid | epoch 001 | valid on 'valid' subset | loss 8.43 | nll_loss 8.1 | ... | num_updates 120
      ... | train | epoch 001 | loss 9.2 | nll_loss 8.9 | ... | num_updates 120 | lr 0.0005 | train_wall 55 | wall 60

Each epoch becomes one row, keyed the way fairseq's JSON format keys them:
``valid_<stat>`` for the validation on subset ``valid`` (``valid1_<stat>``
for a subset ``valid1``), ``train_<stat>`` for the epoch's training
summary; ``num_updates`` (int, the update count at the end of the epoch),
``train_wall`` and ``wall`` (seconds) are kept without a second prefix.
Per-update lines (``train_inner``) are not part of a row.

When validation runs more than once in an epoch (``--validate-interval-updates``
or ``--save-interval-updates``), the row holds the epoch's last validation,
the one at the epoch's end; :func:`parse_validations` returns them all.
When a log holds an epoch twice (a resumed run appending to the same file,
or the duplicated lines ``--log-file`` writes), the later line wins.

Used for the validation-NLL-per-epoch plots of the recipes (issue 7).
:func:`split_line` and :func:`inner_stats` read single lines of fairseq's
output, as the training runner (``fairseq_el.train``) does for its progress
lines.
"""
import csv
import json
import math
import os
import re
import sys
from typing import Dict, Iterator, List, Optional, Tuple

from encouraging_loss.tools.cli import HelpFormatter, Parser
from encouraging_loss.tools.files import atomic_write

__all__ = ["iter_records", "parse_train_log", "parse_validations", "write_curve", "split_line", "inner_stats", "main"]

#: ``DATE TIME | LEVEL | TAG | `` before the message, when the log was captured from the console
_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)? \| [A-Z]+ \| (?P<tag>[^|]+?) \| (?P<msg>.*)$")
#: the start of a simple/tqdm epoch summary: ``epoch 001 | ...``
_SIMPLE = re.compile(r"^epoch (?P<epoch>\d+) \| (?P<rest>.*)$")
_VALID_ON = re.compile(r"^(?:.* )?valid on '(?P<subset>[^']+)' subset$")
#: stats that are about the run, not the subset, and keep no subset prefix
_RUN_STATS = {"num_updates": "num_updates", "wall": "wall", "train_wall": "train_wall"}


def _number(text):
    """A log value as int or float (fairseq writes them as strings); None if not a number."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return text
    text = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _prefixed(tag: str, stats: Dict[str, object]) -> Dict[str, object]:
    """``{stat: value}`` of one summary -> ``{tag_stat: number}`` (run stats unprefixed)."""
    row = {}
    for key, value in stats.items():
        number = _number(value)
        if number is None:
            continue
        if key in _RUN_STATS:
            row[_RUN_STATS[key]] = number
        else:
            row[f"{tag}_{key}"] = number
    return row


def _from_json(tag: Optional[str], message: str) -> Optional[Tuple[str, int, Dict[str, object]]]:
    try:
        stats = json.loads(message)
    except ValueError:
        return None
    if not isinstance(stats, dict) or "epoch" not in stats:
        return None
    epoch = _number(stats.pop("epoch"))
    if not isinstance(epoch, int):
        return None
    if "update" in stats:  # train_inner: {"epoch": 1, "update": 0.263, "loss": ...}
        return None
    if tag is None:  # a --log-file line: the tag is the keys' common prefix
        prefixes = {k.split("_", 1)[0] for k in stats if "_" in k}
        if len(prefixes) != 1 or not all("_" in k for k in stats):
            return None
        tag = prefixes.pop()
    if tag == "train_inner":
        return None
    lead = tag + "_"
    plain = {}
    for key, value in stats.items():
        if not key.startswith(lead):
            return None
        plain[key[len(lead):]] = value
    return tag, epoch, _prefixed(tag, plain)


def _from_simple(tag: Optional[str], message: str) -> Optional[Tuple[str, int, Dict[str, object]]]:
    match = _SIMPLE.match(message)
    if match is None:  # train_inner: "epoch 001:     10 / 19 loss=..." has a colon
        return None
    epoch = int(match.group("epoch"))
    fields = [f.strip() for f in match.group("rest").split(" | ")]
    valid_on = _VALID_ON.match(fields[0]) if fields else None
    if valid_on is not None:
        tag = valid_on.group("subset")
        fields = fields[1:]
    elif tag in (None, "train"):  # the epoch's training summary (untagged in a --log-file)
        tag = "train"
    else:
        return None
    stats = {}
    for field in fields:
        name, _, value = field.partition(" ")
        if not name or not value:
            return None
        stats[name] = value
    return tag, epoch, _prefixed(tag, stats)


def split_line(line: str) -> Tuple[Optional[str], str]:
    """One line of fairseq output -> ``(tag, message)``: the tag (``train_inner``, ``valid``,
    ``fairseq_cli.train``, ...) and the message of a console line ``DATE TIME | LEVEL | TAG | MESSAGE``;
    ``(None, line)`` for anything else (a ``--log-file`` line, a warning, the model printout)."""
    line = line.rstrip("\r\n")
    match = _PREFIX.match(line)
    if match is None:
        return None, line
    return match.group("tag").strip(), match.group("msg")


#: a simple-format per-update line: ``epoch 001:     10 / 19 loss=9.2, nll_loss=8.9, ..., num_updates=10, ...``
_SIMPLE_INNER = re.compile(r"^epoch (?P<epoch>\d+):\s+(?P<i>\d+) / (?P<n>\d+) (?P<rest>.*)$")


def inner_stats(tag: Optional[str], message: str) -> Optional[Dict[str, object]]:
    """The statistics of a per-update (``train_inner``) line, as numbers, or None for any other line:
    ``{"epoch": 1, "update": 0.455, "num_updates": 5, "loss": 12.7, "ups": 8.15, ...}``, where ``update``
    is the epoch's progress (epoch - 1 + the fraction of it done), from ``--log-format json`` or
    ``simple``."""
    if tag != "train_inner":
        return None
    message = message.strip()
    if message.startswith("{"):
        try:
            raw = json.loads(message)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
    else:
        match = _SIMPLE_INNER.match(message)
        if match is None:
            return None
        raw = dict(field.strip().partition("=")[::2] for field in match.group("rest").split(", "))
        raw["epoch"] = match.group("epoch")
        raw["update"] = int(match.group("epoch")) - 1 + int(match.group("i")) / max(int(match.group("n")), 1)
    stats = {key: _number(value) for key, value in raw.items()}
    stats = {key: value for key, value in stats.items() if value is not None}
    if not isinstance(stats.get("epoch"), int) or not isinstance(stats.get("num_updates"), int):
        return None
    return stats


def iter_records(path) -> Iterator[Tuple[str, int, Dict[str, object]]]:
    """Every epoch-level summary in a fairseq-train log, in order:
    ``(tag, epoch, {prefixed stat: number})`` with tag ``train`` or the
    validation subset's name. Skips everything else (config dumps,
    per-update lines, warnings)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            # tqdm redraws its bar with carriage returns: the summary is the last segment
            if "\r" in line:
                line = line.rsplit("\r", 1)[-1]
            match = _PREFIX.match(line)
            tag, message = (match.group("tag").strip(), match.group("msg")) if match else (None, line)
            message = message.strip()
            if message.startswith("{"):
                record = _from_json(tag, message)
            elif message.startswith("epoch "):
                record = _from_simple(tag, message)
            else:
                record = None
            if record is not None:
                yield record


def parse_validations(path) -> List[Dict[str, object]]:
    """Every validation in the log, in order, one dict each:
    ``{"epoch": E, "subset": "valid", "num_updates": U, "valid_loss": ...}``."""
    rows = []
    for tag, epoch, stats in iter_records(path):
        if tag != "train":
            rows.append({"epoch": epoch, "subset": tag, **stats})
    return rows


def parse_train_log(path) -> List[Dict[str, object]]:
    """One dict per epoch, ordered by epoch, with numeric values:
    ``epoch``, ``num_updates``, ``valid_loss``, ``valid_nll_loss``,
    ``valid_ppl``, ..., ``train_loss``, ``train_nll_loss``, ..., whatever the
    log holds (module docstring: the formats read, how keys are named, which
    line wins). An epoch without validation has no ``valid_*`` keys.

    Raises ``ValueError`` when the log holds no epoch summary at all (not a
    fairseq-train log, or a run that ended inside its first epoch)."""
    by_epoch: Dict[int, Dict[str, Dict[str, object]]] = {}
    for tag, epoch, stats in iter_records(path):
        by_epoch.setdefault(epoch, {})[tag] = stats  # the later line wins
    if not by_epoch:
        raise ValueError(f"{path}: no epoch summary found (expected fairseq-train output "
                         f"in --log-format json or simple)")
    rows = []
    for epoch in sorted(by_epoch):
        row: Dict[str, object] = {"epoch": epoch}
        parts = by_epoch[epoch]
        # validation first, then the training summary: its num_updates / wall win
        for tag in sorted((t for t in parts if t != "train")) + (["train"] if "train" in parts else []):
            row.update(parts[tag])
        rows.append(_ordered(row))
    return rows


def _key_order(keys) -> List[str]:
    """epoch, num_updates, the validation stats, the training stats, the wall clock."""
    keys = list(dict.fromkeys(keys))
    head = [k for k in ("epoch", "num_updates") if k in keys]
    tail = [k for k in ("train_wall", "wall") if k in keys]
    train = sorted(k for k in keys if k.startswith("train_") and k not in tail)
    valid = sorted(k for k in keys if k not in head and k not in tail and k not in train)
    return head + valid + train + tail


def _ordered(row: Dict[str, object]) -> Dict[str, object]:
    return {k: row[k] for k in _key_order(row)}


def _columns(rows: List[Dict[str, object]]) -> List[str]:
    """Every key of any row, in :func:`_key_order` (``epoch`` first)."""
    return _key_order(k for row in rows for k in row)


def write_curve(log_path, csv_path) -> List[Dict[str, object]]:
    """Write :func:`parse_train_log`'s rows as CSV (``epoch`` first, one
    column per key found in any epoch, empty where an epoch lacks it);
    returns the rows. Writes through a temporary file, so a reader never sees
    half a CSV."""
    rows = parse_train_log(log_path)
    columns = _columns(rows)
    directory = os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(directory, exist_ok=True)
    with atomic_write(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return rows


def _csv_value(value):
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return value


def main(argv=None) -> int:
    parser = Parser(
        prog="python -m fairseq_el.logs",
        description="Per-epoch train/valid statistics of a fairseq-train log (--log-format json or "
        "simple; captured console output or --log-file) as CSV, one row per epoch, 'epoch' first.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("log", help="the fairseq-train log")
    parser.add_argument("--csv", default=None, help="write the rows here (default: print them as CSV)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.log):
        parser.error(f"LOG {args.log}: no such file")
    try:
        if args.csv is None:
            rows = parse_train_log(args.log)
            columns = _columns(rows)
            writer = csv.DictWriter(sys.stdout, fieldnames=columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
        else:
            rows = write_curve(args.log, args.csv)
            last = rows[-1]
            nll = last.get("valid_nll_loss")
            print(f"{len(rows)} epochs -> {args.csv}" + (f" (last valid_nll_loss {nll})" if nll is not None else ""))
    except ValueError as err:
        parser.error(f"LOG {args.log}: {str(err).split(': ', 1)[-1]}")
    except OSError as err:
        parser.error(f"--csv {args.csv}: {err.strerror or err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
