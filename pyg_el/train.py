"""Train SAGPool on a TU graph-classification dataset with cross-entropy or the Encouraging Loss, over runs.

    python -m pyg_el.train --dataset PROTEINS --loss encouraging --log-end 0.75 --runs 10 --seed 777

The paper's graph experiment (EL_SPEC 6): each run draws its own random 80 / 10 / 10 split (seed + run),
trains :class:`~pyg_el.models.SAGPoolNet` with Adam (SAGPool's settings: batch 128, lr 5e-4, weight decay
1e-4, 128 channels, pooling ratio 0.5, dropout 0.5) until the valid accuracy has not improved for
``--patience`` epochs, and reports the test accuracy of the epoch with the best valid accuracy.

Output, ``--out DIR`` (default ``runs/graph/DATASET-LOSS``): ``settings.json`` (what the runs are, checked
when the command is run again), and per run ``runN/`` with ``curve.csv`` (per epoch), ``last.pt`` (where
an interrupted run resumes), ``best.pt`` (the best-valid model, when the run is done) and ``result.json``
(an ``el-result/1`` record that ``el-results`` reads); at the end ``valid_acc.png`` and the mean +- std over
runs. Running the same command again skips the finished runs and resumes the unfinished one from its last
epoch; ``--runs`` may grow. Anything else changed is refused (use another ``--out``).
"""
import csv
import io
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from encouraging_loss.tools.cli import Parser, seed_number
from encouraging_loss.tools.el_flags import EL_FLAG_DEFAULTS, add_el_flags, check_el_flags
from encouraging_loss.tools.files import (
    FileProblem,
    atomic_path,
    atomic_write,
    check_writable_dir,
    load_checkpoint_safely,
    read_json,
    write_json,
)

from .data import DataError

PROG = "python -m pyg_el.train"
SCHEMA = "el-result/1"
#: --loss -> the loss label of the result records
RECORD_LOSS = {"ce": "ce", "encouraging": "el"}
#: the settings that define the runs (a rerun with another value of one of these is refused)
RUN_SETTINGS = ("dataset", "loss", "seed", "batch_size", "lr", "weight_decay", "hidden", "pooling", "pooling_ratio",
                "dropout", "patience", "max_epochs", "stop_on", "smoothing") + tuple(EL_FLAG_DEFAULTS)
CURVE_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_acc", "bonus_rho", "seconds")
CHECKPOINT = "best_valid"


class UsageError(ValueError):
    """A bad flag value or a refused rerun; reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- arguments


def _positive(kind, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(text) from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(text)
        return value
    parse.__name__ = what
    return parse


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0][:-1] + " (Zhao et al., AAAI 2022, section 5.2).")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="PROTEINS", help="TU dataset name (PROTEINS, NCI1, ...)")
    d.add_argument("--root", default="data/TUDataset",
                   help="folder with the dataset as NAME.zip (the TU archive), NAME/NAME_*.txt or PyG's "
                        "NAME/raw/NAME_*.txt; downloaded into it when absent; PyG writes NAME/processed there")
    d.add_argument("--no-download", action="store_true", help="fail instead of downloading a dataset not in --root")
    r = p.add_argument_group("runs")
    r.add_argument("--runs", type=_positive(int, "a positive integer"), default=10,
                   help="number of runs, each on its own random split (seed + run)")
    r.add_argument("--seed", type=seed_number, default=777, help="seed of run 0 (SAGPool's default seed)")
    r.add_argument("--out", default=None, help="output folder (default: runs/graph/DATASET-LOSS)")
    r.add_argument("--threads", type=_positive(int, "a positive integer"), default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    r.add_argument("--log-every", type=_positive(int, "a positive integer"), default=1,
                   help="print a progress line every N epochs")
    m = p.add_argument_group("model and optimisation (SAGPool's defaults)")
    m.add_argument("--pooling", choices=("hierarchical", "global"), default="hierarchical",
                   help="SAGPool_h (three pooling blocks) or SAGPool_g (one pooling after three GCN layers)")
    m.add_argument("--hidden", type=_positive(int, "a positive integer"), default=128, help="channels")
    m.add_argument("--pooling-ratio", type=float, default=0.5, help="fraction of nodes each pooling keeps, in (0, 1]")
    m.add_argument("--dropout", type=float, default=0.5, help="dropout before the second linear layer, in [0, 1)")
    m.add_argument("--batch-size", type=_positive(int, "a positive integer"), default=128, help="graphs per batch")
    m.add_argument("--lr", type=_positive(float, "a number > 0"), default=5e-4, help="Adam learning rate")
    m.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay, >= 0")
    m.add_argument("--patience", type=_positive(int, "a positive integer"), default=50,
                   help="stop a run after this many epochs without a better valid score")
    m.add_argument("--max-epochs", type=_positive(int, "a positive integer"), default=100000,
                   help="stop a run after this many epochs at most (SAGPool: 100000, i.e. early stopping decides)")
    m.add_argument("--stop-on", choices=("acc", "loss"), default="acc",
                   help="early stopping and model choice on valid accuracy (the paper; ties: lower valid loss) "
                        "or on valid cross-entropy (SAGPool's code)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", choices=tuple(RECORD_LOSS), default="ce",
                    help="cross-entropy or the Encouraging Loss (EL_SPEC 2.2)")
    lo.add_argument("--smoothing", type=float, default=0.0, help="label smoothing, in [0, 1) (default: 0)")
    add_el_flags(lo)
    return p


def check_args(args) -> dict:
    """Check the flags that argparse cannot; the Encouraging Loss keyword arguments (None with --loss ce)."""
    if not (0.0 < args.pooling_ratio <= 1.0):
        raise UsageError(f"--pooling-ratio must be in (0, 1], got {args.pooling_ratio!r}")
    if not (0.0 <= args.dropout < 1.0):
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout!r}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0.0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay!r}")
    if not (0.0 <= args.smoothing < 1.0):
        raise UsageError(f"--smoothing must be in [0, 1), got {args.smoothing!r}")
    el = check_el_flags(args, args.loss == "encouraging", loss_flag=f"--loss {args.loss}", smoothing=args.smoothing,
                        error=UsageError)
    if args.out is None:
        args.out = os.path.join("runs", "graph", f"{args.dataset}-{args.loss}")
    return el


def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def check_settings_file(out: Path, settings: dict, write: bool = True) -> None:
    """Write ``settings.json`` into a new ``out`` (only check that ``out`` is new or empty when ``write`` is
    false); in an existing one, refuse other settings."""
    check_writable_dir(out, "--out", create=False)  # a file in the way, a read-only place: one line
    path = out / "settings.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out}: exists and holds files but no settings.json; not a folder of this "
                             f"command (give a new --out)")
        if write:
            out.mkdir(parents=True, exist_ok=True)
            write_json(path, settings)
        return
    try:
        saved = read_json(path, "settings file")
    except FileProblem as err:
        raise UsageError(f"--out {out}: {err}") from None
    for name, value in settings.items():
        if name in saved and saved[name] != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--out {out} holds runs made with {flag} {saved[name]!r}, this command has "
                             f"{flag} {value!r}; give the same flags to continue them, or another --out")
    missing = [name for name in settings if name not in saved]
    if missing:
        raise UsageError(f"--out {out}: settings.json lacks {', '.join(missing)}; written by another version? "
                         f"give another --out")


# ----------------------------------------------------------------------------- one run


def _evaluate(model, loader):
    """(accuracy %, mean cross-entropy) of ``model`` on ``loader``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    correct, total, loss = 0, 0, 0.0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch)
            loss += F.cross_entropy(logits, batch.y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == batch.y).sum())
            total += batch.num_graphs
    return 100.0 * correct / total, loss / total


def _better(acc, loss, best, stop_on) -> bool:
    if best is None:
        return True
    if stop_on == "loss":
        return loss < best["valid_loss"]
    return acc > best["valid_acc"] or (acc == best["valid_acc"] and loss < best["valid_loss"])


def _read_curve(path: Path, last_epoch: int) -> List[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= last_epoch]


def _write_curve(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def _save(obj, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_run(args, el_kwargs: Optional[dict], dataset, run: int, out: Path, say=print) -> dict:
    """Train run ``run`` (seed ``args.seed + run``) into ``out/run<run>``; resume it from ``last.pt`` when
    there is one; return its ``el-result/1`` record (also written to ``result.json``)."""
    import torch
    import torch.nn.functional as F
    from torch_geometric.loader import DataLoader

    from encouraging_loss import EncouragingLoss, bonus_rho_at

    from .data import split_indices
    from .models import SAGPoolNet

    run_dir = out / f"run{run}"
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = args.seed + run
    train_idx, valid_idx, test_idx = split_indices(len(dataset), seed)
    torch.manual_seed(seed)
    model = SAGPoolNet(dataset.num_features, dataset.num_classes, hidden=args.hidden, ratio=args.pooling_ratio,
                       dropout=args.dropout, pooling=args.pooling)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(dataset[train_idx], batch_size=args.batch_size, shuffle=True, generator=shuffle)
    valid_loader = DataLoader(dataset[valid_idx], batch_size=args.batch_size)
    test_loader = DataLoader(dataset[test_idx], batch_size=args.batch_size)
    criterion = EncouragingLoss(**el_kwargs) if el_kwargs is not None else None

    epoch, best, bad, elapsed = 0, None, 0, 0.0
    last_path = run_dir / "last.pt"
    if last_path.exists():
        try:
            state = load_checkpoint_safely(last_path, "run checkpoint")
        except FileProblem as err:
            raise UsageError(f"{err}; delete {run_dir} to train run {run} again") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        shuffle.set_state(state["shuffle_rng"])
        epoch, best, bad, elapsed = state["epoch"], state["best"], state["bad_epochs"], state["elapsed"]
        say(f"run {run}: resuming after epoch {epoch} (best valid acc {best['valid_acc']:.2f} at epoch "
            f"{best['epoch']})")
    curve = _read_curve(run_dir / "curve.csv", epoch)

    while bad < args.patience and epoch < args.max_epochs:
        epoch += 1
        start = time.perf_counter()
        rho = 0.0
        if criterion is not None:
            rho = bonus_rho_at(el_kwargs["bonus_rho"], epoch, defer_start=args.defer_start)
            criterion.bonus_rho = rho
        model.train()
        total, graphs = 0.0, 0
        for batch in train_loader:
            optimizer.zero_grad()
            logits = model(batch)
            if criterion is None:
                loss = F.cross_entropy(logits, batch.y, label_smoothing=args.smoothing)
            else:
                loss = criterion(logits, batch.y)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.num_graphs
            graphs += batch.num_graphs
        valid_acc, valid_loss = _evaluate(model, valid_loader)
        seconds = time.perf_counter() - start
        elapsed += seconds
        curve.append(dict(epoch=epoch, train_loss=f"{total / graphs:.6f}", valid_loss=f"{valid_loss:.6f}",
                          valid_acc=f"{valid_acc:.4f}", bonus_rho=rho, seconds=f"{seconds:.3f}"))
        if _better(valid_acc, valid_loss, best, args.stop_on):
            best = dict(epoch=epoch, valid_acc=valid_acc, valid_loss=valid_loss,
                        model={k: v.detach().clone() for k, v in model.state_dict().items()})
            bad = 0
        else:
            bad += 1
        _write_curve(run_dir / "curve.csv", curve)
        _save(dict(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), best=best,
                   bad_epochs=bad, elapsed=elapsed, rng=torch.get_rng_state(), shuffle_rng=shuffle.get_state()),
              last_path)
        if epoch % args.log_every == 0 or bad >= args.patience:
            say(f"run {run} epoch {epoch}: train loss {total / graphs:.4f}, valid acc {valid_acc:.2f} loss "
                f"{valid_loss:.4f}; best {best['valid_acc']:.2f} at epoch {best['epoch']}, "
                f"{args.patience - bad} epochs of patience left ({seconds:.2f} s)")

    model.load_state_dict(best["model"])
    _save(best["model"], run_dir / "best.pt")
    test_acc, test_loss = _evaluate(model, test_loader)
    record = {
        "schema": SCHEMA, "task": args.dataset, "loss": RECORD_LOSS[args.loss], "seed": seed,
        "run": f"{out.name}/run{run}", "checkpoint": CHECKPOINT,
        "metrics": {"test_acc": test_acc, "valid_acc": best["valid_acc"], "best_epoch": best["epoch"],
                    "epochs": epoch},
        "info": {"test_loss": test_loss, "valid_loss": best["valid_loss"], "wall_s": round(elapsed, 1),
                 "graphs": {"train": len(train_idx), "valid": len(valid_idx), "test": len(test_idx)},
                 "settings": settings_of(args), "el": el_kwargs, "checkpoint_path": "best.pt"},
        "curve": "curve.csv",
    }
    write_json(run_dir / "result.json", record)
    last_path.unlink()
    say(f"run {run}: test acc {test_acc:.2f} (valid {best['valid_acc']:.2f}, best epoch {best['epoch']} of {epoch}, "
        f"{elapsed:.0f} s)")
    return record


# ----------------------------------------------------------------------------- all runs


def _done_record(run_dir: Path) -> Optional[dict]:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    try:
        return read_json(path, "result record")
    except FileProblem as err:
        raise UsageError(f"{err}; delete {run_dir} to train that run again") from None


def plot_runs(out: Path, records: Sequence[dict]) -> Path:
    """``out/valid_acc.png``: the valid accuracy per epoch of every run, the chosen epoch marked, the test
    accuracy in the legend."""
    from encouraging_loss.tools.results.plots import new_figure

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for rec in records:
        rows = _read_curve(out / rec["run"].split("/")[-1] / "curve.csv", 10 ** 9)
        if not rows:
            continue
        epochs = [int(r["epoch"]) for r in rows]
        accs = [float(r["valid_acc"]) for r in rows]
        line, = ax.plot(epochs, accs, linewidth=0.9, alpha=0.8,
                        label=f"{rec['run'].split('/')[-1]}: test {rec['metrics']['test_acc']:.1f}")
        best = int(rec["metrics"]["best_epoch"])
        ax.plot([best], [accs[epochs.index(best)]], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid accuracy (%)")
    name = records[0]["task"] if records else ""
    ax.set_title(f"{name} {records[0]['loss'] if records else ''}: valid accuracy per run (dot: chosen epoch)")
    ax.legend(fontsize=7, ncol=2)
    path = out / "valid_acc.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def summary_line(records: Sequence[dict]) -> str:
    from encouraging_loss.tools.results.tables import describe

    stats = describe([r["metrics"]["test_acc"] for r in records])
    return f"test acc {stats.mean:.2f} +- {stats.std or 0.0:.2f} over {stats.n} runs"


def run(args, el_kwargs: Optional[dict], say=print) -> List[dict]:
    """All ``args.runs`` runs (finished ones read back, the rest trained); their records."""
    import torch

    from .data import load_tu, split_sizes

    out = Path(args.out)
    check_settings_file(out, settings_of(args), write=False)  # refuse other settings before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    records, todo = [], []
    for r in range(args.runs):
        rec = _done_record(out / f"run{r}")
        (records.append(rec) if rec is not None else todo.append(r))
    if todo:
        dataset = load_tu(args.dataset, args.root, download=not args.no_download)
        check_settings_file(out, settings_of(args))  # a new --out is written once its data is there
        sizes = "/".join(map(str, split_sizes(len(dataset))))
        say(f"{args.dataset}: {len(dataset)} graphs, {dataset.num_features} node features, "
            f"{dataset.num_classes} classes; split {sizes}; {len(records)} of {args.runs} runs done")
        for r in todo:
            records.append(train_run(args, el_kwargs, dataset, r, out, say=say))
    records.sort(key=lambda rec: int(rec["run"].split("run")[-1]))
    plot_runs(out, records)
    say(f"{args.dataset} {args.loss}: {summary_line(records)} ({out})")
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    # PyTorch Geometric's import scripts a few functions with torch.jit, which torch now warns about on every run
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        el_kwargs = check_args(args)
        run(args, el_kwargs, say=lambda line: print(line, flush=True))
    except (UsageError, FileProblem, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the same command resumes from the last finished epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
