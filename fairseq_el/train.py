"""One training run of a translation recipe: the paper's flags, stock ``fairseq-train``.

``python -m fairseq_el.train --preset iwslt14_de_en --data DATA --save-dir RUN
--loss el --seed 1 [-- extra fairseq-train flags]`` builds the stock
``fairseq-train`` command of the paper's setting (EL_SPEC section 4; the
Multi30k preset is the reference point of the project's README) for CE
(``label_smoothed_cross_entropy``) or EL (``encouraging_label_smoothed_cross_entropy
--log-end``) and runs it, logging in fairseq's JSON format to ``RUN/train.log``.

* **Resumable.** A run that was stopped (killed, pre-empted) continues from
  ``RUN/checkpoint_last.pt`` when started again with the same arguments:
  fairseq restores it by default.
* **Finished runs are skipped.** ``RUN/run.json`` records the command; it is
  marked finished when ``fairseq-train`` exits with 0. Running a finished run
  again does nothing (exit 0). A directory that holds a run of another
  configuration is refused, naming the first difference, unless ``--force``
  (fairseq then continues from that directory's ``checkpoint_last.pt``; delete
  the directory to start over). ``run.json`` is written through a temporary
  name; a damaged one (or a damaged ``prep.json`` in ``--data``) is one error
  line naming the file.
* **Extra flags** after ``--`` go to ``fairseq-train`` and replace a preset flag
  of the same name (``-- --max-update 300 --arch transformer``).
* **Several GPUs** on one machine: ``--gpus N`` (fairseq's own spawning,
  ``--distributed-world-size N``; the IWSLT14 preset divides its
  ``--update-freq 4`` by ``N`` to keep the paper's batch of 4 x 4096 tokens).
  **Several machines**: ``--nodes M --node-rank R --master-addr HOST``, run on
  every machine; the command then goes through ``torchrun`` (one process per
  GPU, ``fairseq_cli.train`` as the module). On a machine without CUDA the run
  uses ``--cpu`` and no ``--fp16``.
"""
import errno
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import Parser
from encouraging_loss.tools.files import FileProblem, os_error_line, read_json, write_json

__all__ = ["PRESETS", "LOSSES", "build_command", "merge_flags", "train", "main"]

_ADAM = ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr-scheduler", "inverse_sqrt"]

#: the paper's settings (EL_SPEC 4) and the Multi30k reference point (README).
#: ``avg_last``: checkpoints averaged for evaluation (0: the last checkpoint).
PRESETS: Dict[str, dict] = {
    "iwslt14_de_en": dict(
        flags=[
            "--arch", "transformer_iwslt_de_en", *_ADAM, "--warmup-updates", "4000",
            "--weight-decay", "0.0001", "--label-smoothing", "0.1", "--max-tokens", "4096",
            "--update-freq", "4", "--max-update", "20000", "--dropout", "0.4", "--lr", "1e-3",
            "--keep-last-epochs", "10",
        ],
        update_freq=4, log_end=0.5, avg_last=10,
    ),
    "iwslt17_fr_en": dict(
        flags=[
            "--arch", "transformer_iwslt_de_en", "--encoder-layers", "2", "--decoder-layers", "2",
            "--share-all-embeddings", *_ADAM, "--warmup-updates", "4000", "--weight-decay", "0.001",
            "--label-smoothing", "0.1", "--max-tokens", "4096", "--max-update", "100000",
            "--dropout", "0.3", "--lr", "0.0005", "--keep-last-epochs", "10",
        ],
        update_freq=None, log_end=0.5, avg_last=10,
    ),
    "multi30k_de_en": dict(
        flags=[
            "--arch", "transformer", "--encoder-layers", "3", "--decoder-layers", "3",
            "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
            "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
            "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
            "--share-all-embeddings", "--dropout", "0.3", *_ADAM, "--lr", "1e-3",
            "--warmup-updates", "500", "--max-tokens", "8192", "--label-smoothing", "0.1",
            "--max-update", "2400", "--no-epoch-checkpoints",
        ],
        update_freq=None, log_end=0.5, avg_last=0,
    ),
}
#: loss label -> fairseq criterion
LOSSES = {
    "ce": "label_smoothed_cross_entropy",
    "el": "encouraging_label_smoothed_cross_entropy",
}
RUN_FILE = "run.json"
LOG_FILE = "train.log"


class RunError(Exception):
    """A problem with the run's inputs, reported as one line."""


def _groups(tokens: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Split command-line tokens into ``(--flag, [values])`` groups; ``--flag=v``
    counts as ``--flag v``. Values are the tokens up to the next ``--flag``
    (so negative numbers are values)."""
    groups: List[Tuple[str, List[str]]] = []
    for tok in tokens:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok.partition("=")
            groups.append((name, [value] if eq else []))
        elif groups:
            groups[-1][1].append(tok)
        else:
            raise RunError(f"extra fairseq-train flags must start with a --flag, got {tok!r}")
    return groups


def merge_flags(base: Sequence[str], extra: Sequence[str]) -> List[str]:
    """``base`` flags with every flag that ``extra`` names replaced by its
    value(s) in ``extra``; the extra flags come last, in their order."""
    extra_groups = _groups(extra)
    replaced = {name for name, _ in extra_groups}
    out: List[str] = []
    for name, values in _groups(base):
        if name not in replaced:
            out += [name, *values]
    for name, values in extra_groups:
        out += [name, *values]
    return out


def _data_bin(data: Path) -> Path:
    """The binarized data directory: ``DATA/bin`` of a prepared directory
    (with ``prep.json``), or ``DATA`` itself when it holds fairseq's dictionaries."""
    if (data / "prep.json").is_file():
        from .prep_common import read_prep_json

        try:
            meta = read_prep_json(data, "--data")
        except FileProblem as err:
            raise RunError(str(err)) from None
        return data / meta.get("bin", "bin")
    if list(data.glob("dict.*.txt")):
        return data
    raise RunError(
        f"--data {data}: neither a prepared directory (prep.json, see python -m fairseq_el.prep_iwslt14) "
        "nor a fairseq data-bin directory (dict.*.txt)"
    )


def build_command(
    preset: str,
    data: Path,
    save_dir: Path,
    loss: str,
    seed: int,
    log_end: Optional[float] = None,
    gpus: int = 1,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    cuda: Optional[bool] = None,
    extra: Sequence[str] = (),
) -> List[str]:
    """The command (argv) of one run: stock ``fairseq-train`` with the preset's
    flags, the loss's criterion, the seed, the save directory and the JSON log,
    then ``extra`` (which replaces preset flags of the same name); on several
    machines the same arguments go through ``torchrun -m fairseq_cli.train``."""
    if preset not in PRESETS:
        raise RunError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if loss not in LOSSES:
        raise RunError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if gpus < 1 or nodes < 1 or not 0 <= node_rank < nodes:
        raise RunError(f"--gpus and --nodes must be >= 1 and 0 <= --node-rank < --nodes, "
                       f"got {gpus}, {nodes}, {node_rank}")
    p = PRESETS[preset]
    cuda = _has_cuda() if cuda is None else cuda
    flags = list(p["flags"])
    world = gpus * nodes
    if p["update_freq"] and cuda and world > 1:
        freq = max(1, p["update_freq"] // world)
        flags = merge_flags(flags, ["--update-freq", str(freq)])
    crit = ["--criterion", LOSSES[loss]]
    if loss == "el":
        crit += ["--log-end", str(p["log_end"] if log_end is None else log_end)]
    from . import user_dir

    ours = [
        "--user-dir", user_dir(), *flags, *crit, "--seed", str(seed), "--save-dir", str(save_dir),
        "--log-format", "json", "--log-interval", "100",
    ]
    ours += ["--fp16", "--distributed-world-size", str(world)] if cuda else ["--cpu"]
    args = [str(_data_bin(Path(data)))] + merge_flags(ours, extra)
    if nodes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(gpus),
            "--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port),
            "-m", "fairseq_cli.train", *args,
        ]
    return [str(Path(sys.executable).parent / "fairseq-train"), *args]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def _first_difference(old: Sequence[str], new: Sequence[str]) -> str:
    a, b = dict((n, v) for n, v in _groups(old[1:])), dict((n, v) for n, v in _groups(new[1:]))
    if old[:1] != new[:1]:
        return f"data {old[:1]} != {new[:1]}"
    for name in list(a) + [n for n in b if n not in a]:
        if a.get(name) != b.get(name):
            show = lambda v: "absent" if v is None else " ".join(v) or "set"  # noqa: E731
            return f"{name}: {show(a.get(name))} before, {show(b.get(name))} now"
    return "the launcher"


def _run_and_log(cmd: List[str], log_path: Path) -> int:
    """Run ``cmd``, its output both on stderr and appended to ``log_path``
    (fairseq's own log lines, JSON statistics included: a resumed run appends)."""
    with open(log_path, "a", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in proc.stdout:
            sys.stderr.write(line)
            log_file.write(line)
            log_file.flush()
        return proc.wait()


def _read_state(state_file: Path, force: bool, log) -> Optional[dict]:
    """``run.json``, checked: an object whose ``args`` is a list of strings. A damaged one is a
    RunError naming it, or, with ``force``, ignored (None) and written anew."""
    try:
        state = read_json(state_file, "run record")
        args = state.get("args")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise FileProblem(f"run record {state_file}: its 'args' is not a list of strings")
    except FileProblem as err:
        if force:
            log(f"[train] {err}; --force: starting a new record")
            return None
        raise RunError(f"{err}; delete it, or pass --force to start a new record "
                       f"(fairseq continues from checkpoint_last.pt)") from None
    return state


def train(cmd: List[str], save_dir: Path, force: bool = False, log=print) -> int:
    """Run ``cmd`` for ``save_dir`` unless it is finished; return the exit code.

    ``save_dir/run.json`` holds the command and its state (``running`` or
    ``finished``); see the module doc for resuming and refusals."""
    save_dir = Path(save_dir)
    state_file = save_dir / RUN_FILE
    # the fairseq arguments, without the launcher's own (python, torchrun options)
    key = cmd[cmd.index("fairseq_cli.train") + 1:] if "fairseq_cli.train" in cmd else cmd[1:]
    state = _read_state(state_file, force, log) if state_file.exists() else None
    if state is not None:
        if state.get("args") != key:
            if not force:
                raise RunError(
                    f"{save_dir} holds a run with other settings ({_first_difference(state.get('args', []), key)}); "
                    "use another --save-dir, or --force to continue it with the new settings"
                )
        elif state.get("status") == "finished" and not force:
            log(f"[train] {save_dir}: finished on {state.get('finished', '?')}, skipping (--force to run again)")
            return 0
        else:
            log(f"[train] {save_dir}: resuming from {save_dir / 'checkpoint_last.pt'}"
                if (save_dir / "checkpoint_last.pt").is_file() else f"[train] {save_dir}: starting again")
    save_dir.mkdir(parents=True, exist_ok=True)
    state = {"args": key, "command": cmd, "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(state_file, state, indent=1)
    log("[train] " + " ".join(shlex.quote(c) for c in cmd))
    code = _run_and_log(cmd, save_dir / LOG_FILE)
    if code == 0:
        state.update(status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_json(state_file, state, indent=1)
        log(f"[train] {save_dir}: finished")
    else:
        log(f"[train] {save_dir}: fairseq-train exited with {code}; run the same command again to resume")
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = Parser(
        prog="python -m fairseq_el.train",
        description="One CE or EL training run of a translation recipe with stock fairseq-train "
        "(resumable; a finished run is skipped). Extra fairseq-train flags go after '--'.",
    )
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the paper's setting to use")
    ap.add_argument("--data", required=True, type=Path, help="prepared data directory (prep.json) or data-bin")
    ap.add_argument("--save-dir", required=True, type=Path, help="the run's directory (checkpoints, train.log)")
    ap.add_argument("--loss", required=True, choices=sorted(LOSSES), help="ce: label-smoothed CE; el: Encouraging Loss")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument("--log-end", type=float, default=None, help="EL's log_end (default: the preset's, 0.5)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per machine")
    ap.add_argument("--nodes", type=int, default=1, help="machines (> 1: launched through torchrun)")
    ap.add_argument("--node-rank", type=int, default=0, help="this machine's rank (0 .. nodes-1)")
    ap.add_argument("--master-addr", default="127.0.0.1", help="address of the machine with --node-rank 0")
    ap.add_argument("--master-port", type=int, default=29500, help="its port")
    ap.add_argument("--force", action="store_true", help="run even if finished or configured differently")
    ap.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args = ap.parse_args(argv)
    try:
        if args.log_end is not None and args.loss != "el":
            raise RunError(f"--log-end applies to --loss el, got --loss {args.loss}")
        if args.log_end is not None and not 0.0 < args.log_end <= 1.0:
            raise RunError(f"--log-end must be in (0, 1], got {args.log_end}")
        if not args.data.is_dir():
            raise RunError(f"--data {args.data}: no such directory")
        cmd = build_command(
            args.preset, args.data, args.save_dir, args.loss, args.seed, args.log_end, args.gpus, args.nodes,
            args.node_rank, args.master_addr, args.master_port, extra=extra,
        )
        if args.dry_run:
            print(" ".join(shlex.quote(c) for c in cmd))
            return 0
        if args.nodes > 1 and args.node_rank > 0:  # only rank 0 keeps the run's state
            return subprocess.call(cmd)
        return train(cmd, args.save_dir, force=args.force, log=lambda m: print(m, file=sys.stderr, flush=True))
    except RunError as err:
        print(f"python -m fairseq_el.train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # run.json, train.log: a full disk, a read-only folder
        action = "cannot write" if err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else "cannot use"
        print(f"python -m fairseq_el.train: error: {os_error_line(err, action=action)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
