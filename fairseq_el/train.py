"""One training run of a translation recipe: the paper's flags, stock ``fairseq-train``.

``python -m fairseq_el.train --preset iwslt14_de_en --data DATA --save-dir RUN
--loss el --seed 1 [-- extra fairseq-train flags]`` builds the stock
``fairseq-train`` command of the paper's setting (EL_SPEC section 4; the
Multi30k preset is the reference point of the project's README) for CE
(``label_smoothed_cross_entropy``) or EL (``encouraging_label_smoothed_cross_entropy
--log-end``) and runs it, logging in fairseq's JSON format to ``RUN/train.log``.

* **A concise console.** fairseq-train's whole output (INFO lines, the model
  printout, warnings) goes to ``RUN/train.log`` only; the console gets the
  runner's lines: where the run starts (model size, updates per epoch), one
  progress line per ``--log-interval`` updates (:data:`LOG_INTERVAL`: 100 on a
  GPU, fewer on the CPU so that one shows within about a minute) with
  updates/s, loss and the ETA against ``--max-update`` / ``--max-epoch``, one
  line per checkpoint saved with the validation before it, and the outcome.
  ``--verbose`` shows fairseq-train's output instead, as before. The torch
  FutureWarnings that fairseq's own code triggers on every run are ignored
  in fairseq-train (:data:`_NOISE`); other warnings are kept.
* **Mid-epoch saves.** Besides the epoch checkpoints, the IWSLT presets save
  every few minutes' worth of updates (:data:`SAVE_INTERVAL_UPDATES`,
  ``checkpoint_E_U.pt``, the last 2 kept) and ``checkpoint_last.pt`` with
  them; averaging still takes the epoch checkpoints ``checkpointE.pt``.
* **Failures.** A fairseq-train that fails or is killed ends the runner with
  its status (128 + N for signal N, as a shell shows it: 137 for SIGKILL), the
  end of its output (unless killed) and a line naming the run, the signal,
  the last checkpoint saved and that the same command resumes from
  ``RUN/checkpoint_last.pt``.

* **Resumable.** A run that was stopped (killed, pre-empted) continues from
  ``RUN/checkpoint_last.pt`` when started again with the same arguments:
  fairseq restores it by default.
* **Finished runs are skipped.** ``RUN/run.json`` records the command; it is
  marked finished when ``fairseq-train`` exits with 0. Running a finished run
  again does nothing (exit 0). A directory that holds a run of another
  configuration is refused, naming the first difference, unless ``--force``
  (fairseq then continues from that directory's ``checkpoint_last.pt``; delete
  the directory to start over). Flags that change only what is logged or
  kept (``--log-interval``, ``--save-interval-updates``,
  ``--keep-interval-updates``) do not make another configuration.
  ``run.json`` is written through a temporary
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
import collections
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import Parser, split_extra
from encouraging_loss.tools.files import FileProblem, os_error_line, read_json, write_json

__all__ = ["PRESETS", "SMOKE", "LOSSES", "build_command", "merge_flags", "train", "main"]

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


def _smoke(epochs: int, warmup: int = 100, lr: str = "3e-3") -> List[str]:
    return [
        "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
        "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--dropout", "0.1",
        "--lr", lr, "--warmup-updates", str(warmup), "--max-tokens", "1024", "--update-freq", "1",
        "--max-update", "0", "--max-epoch", str(epochs),
    ]


#: ``--smoke``: flags merged over a preset's (and under the ones after ``--``) for a CPU run of a few minutes
#: that learns something visible: a small model (2+2 layers, 128 dims, 0.9M parameters with the smoke data's
#: 2,000-piece vocabulary), warmup 100, lr 3e-3, batches of 1,024 tokens and a budget of 2 epochs of the
#: preparation's ``--smoke`` data (python -m fairseq_el.prep_* --smoke: the first few thousand pairs, about
#: 150 updates an epoch, a smaller vocabulary; its prep.json names the task ``<task>_smoke``, so every result
#: record and table says smoke). About 0.1 s an update on Multi30k (2 idle CPU cores); on the full Multi30k train
#: data this model reached BLEU 4.5 after 200 updates and 14.5 after 300 (500 test2016 sentences, beam 5).
#: A check of the recipe, not a result.
SMOKE: Dict[str, List[str]] = {
    "iwslt14_de_en": _smoke(epochs=2),
    "iwslt17_fr_en": _smoke(epochs=2),
    "multi30k_de_en": _smoke(epochs=2),
}
#: ``--log-interval`` the runner sets (a console progress line each time), (on a GPU, on the CPU): a line
#: a minute or more often where an update allows it. CPU, measured on 2 cores shared with other jobs (load
#: 6-7): IWSLT14 about 160 s per update (4 x 4096 tokens: every update), IWSLT17 about 20 s, Multi30k
#: about 23 s (every 2). A smoke run: SMOKE_LOG_INTERVAL. ``-- --log-interval N`` replaces it.
LOG_INTERVAL: Dict[str, Tuple[int, int]] = {
    "iwslt14_de_en": (100, 1),
    "iwslt17_fr_en": (100, 2),
    "multi30k_de_en": (100, 2),
}
SMOKE_LOG_INTERVAL = 25  # about 0.1 s an update on 2 idle cores (0.7 s on a loaded machine): a line every 3-20 s
#: mid-epoch saves (``--save-interval-updates N --keep-interval-updates KEEP_INTERVAL_UPDATES``): about 3
#: minutes of updates on the paper's GPU (IWSLT14: 20,000 updates in about 4 hours on an RTX 2080 Ti, 1.4
#: updates/s; an H100 is several times faster) and fewer than an epoch has (estimated from the data: IWSLT14
#: about 290 updates of 4 x 4096 tokens, IWSLT17 Fr-En about 1,700 of 4096). None: Multi30k's epochs
#: (about 70 updates) take seconds on a GPU. They write ``checkpoint_E_U.pt``, which neither averaging
#: (``checkpointE.pt``, the last N epochs) nor ``--keep-last-epochs`` counts, and ``checkpoint_last.pt``,
#: which a restarted run resumes from. Each also validates (fairseq validates before every save), so
#: ``checkpoint_best.pt`` may come from the middle of an epoch.
SAVE_INTERVAL_UPDATES: Dict[str, Optional[int]] = {
    "iwslt14_de_en": 200,
    "iwslt17_fr_en": 1000,
    "multi30k_de_en": None,
}
KEEP_INTERVAL_UPDATES = 2
#: flags that change what is logged, validated or kept, not the weights trained: a run started with other
#: values of these is the same run (it resumes, or is skipped when finished)
_COSMETIC = {"--log-interval", "--save-interval-updates", "--keep-interval-updates"}
#: torch deprecation warnings that fairseq's own code triggers on every run and a user cannot act on:
#: ignored in the fairseq-train process (other warnings are kept)
_NOISE = [
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:`torch.cuda.amp.autocast(args...)` is deprecated:FutureWarning",
    "ignore:`torch.cuda.amp.GradScaler(args...)` is deprecated:FutureWarning",
]
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
    smoke: bool = False,
) -> List[str]:
    """The command (argv) of one run: stock ``fairseq-train`` with the preset's
    flags, the loss's criterion, the seed, the save directory, the JSON log
    (:data:`LOG_INTERVAL`) and the mid-epoch saves (:data:`SAVE_INTERVAL_UPDATES`), then ``extra``
    (which replaces preset flags of the same name; ``smoke``: the preset's :data:`SMOKE` flags in
    between); on several machines the same arguments go through ``torchrun -m fairseq_cli.train``."""
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
        "--log-format", "json",
        "--log-interval", str(SMOKE_LOG_INTERVAL if smoke else LOG_INTERVAL[preset][not cuda]),
    ]
    if SAVE_INTERVAL_UPDATES[preset] and not smoke:  # a smoke run lasts minutes: epoch saves only
        ours += ["--save-interval-updates", str(SAVE_INTERVAL_UPDATES[preset]),
                 "--keep-interval-updates", str(KEEP_INTERVAL_UPDATES)]
    ours += ["--fp16", "--distributed-world-size", str(world)] if cuda else ["--cpu"]
    if smoke:
        ours = merge_flags(ours, SMOKE[preset])
    args = [str(_data_bin(Path(data)))] + merge_flags(ours, extra)
    if nodes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(gpus),
            "--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port),
            "-m", "fairseq_cli.train", *args,
        ]
    return [str(Path(sys.executable).parent / "fairseq-train"), *args]


def _check_smoke_data(data: Path, smoke: bool) -> None:
    """A smoke run trains on data prepared with ``--smoke`` and a real run on data prepared without it
    (prep.json's ``smoke``), so that a smoke run's results never pass for a real run's."""
    if not (data / "prep.json").is_file():
        return  # a bare data-bin directory: nothing recorded
    from .prep_common import read_prep_json

    try:
        prepared = bool(read_prep_json(data, "--data").get("smoke", False))
    except FileProblem as err:
        raise RunError(str(err)) from None
    if prepared != smoke:
        raise RunError(f"--data {data} was prepared {'with' if prepared else 'without'} --smoke; "
                       f"{'so train with --smoke too' if prepared else '--smoke needs data prepared with --smoke'} "
                       "(the recipe's --smoke does both, in its own work directory)")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def _settings(args: Sequence[str]) -> List[str]:
    """A run's fairseq-train arguments without the :data:`_COSMETIC` flags: two commands with the same
    settings train the same model."""
    out = list(args[:1])
    for name, values in _groups(args[1:]):
        if name not in _COSMETIC:
            out += [name, *values]
    return out


def _first_difference(old: Sequence[str], new: Sequence[str]) -> str:
    old, new = _settings(old), _settings(new)
    a, b = dict((n, v) for n, v in _groups(old[1:])), dict((n, v) for n, v in _groups(new[1:]))
    if old[:1] != new[:1]:
        return f"data {old[:1]} != {new[:1]}"
    for name in list(a) + [n for n in b if n not in a]:
        if a.get(name) != b.get(name):
            show = lambda v: "absent" if v is None else " ".join(v) or "set"  # noqa: E731
            return f"{name}: {show(a.get(name))} before, {show(b.get(name))} now"
    return "the launcher"


def _flag_int(cmd: Sequence[str], name: str, default: int) -> int:
    """The integer value of fairseq-train flag ``name`` in ``cmd`` (the last one wins), else ``default``."""
    value = default
    for i, tok in enumerate(cmd):
        text = tok.partition("=")[2] if tok.startswith(name + "=") else (
            cmd[i + 1] if tok == name and i + 1 < len(cmd) else None)
        if text is not None:
            try:
                value = int(text)
            except ValueError:
                pass
    return value


def _duration(seconds: float) -> str:
    """``45s``, ``12m``, ``2h17m``, ``3d04h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


_SAVED = re.compile(r"^Saved checkpoint (?P<path>\S+) \(epoch (?P<epoch>\d+) @ (?P<updates>\d+) updates")
_LOADED = re.compile(r"^Loaded checkpoint (?P<path>\S+) \(epoch (?P<epoch>\d+) @ (?P<updates>\d+) updates\)")
_PER_EPOCH = re.compile(r"^grouped total_num_itrs = (?P<n>\d+)")
_PARAMS = re.compile(r"^num\. (?:shared )?model params: (?P<n>[\d,]+)")


class Console:
    """fairseq-train's output, read line by line: what the runner reports about the run (updates done,
    the last checkpoint saved or loaded, the end of the output) and, unless ``verbose``, the runner's own
    concise lines through ``say``: where the run starts (model size, updates per epoch), one progress line
    per ``--log-interval`` updates (updates/s, loss, ETA against ``--max-update`` / ``--max-epoch``) and one
    per checkpoint saved (with the validation before it). ``verbose``: every line goes to ``stream``
    unchanged instead."""

    def __init__(self, name: str, cmd: Sequence[str], say, verbose: bool = False, stream=None):
        from .logs import inner_stats, split_line

        self._split, self._inner = split_line, inner_stats
        self.name, self.say, self.verbose = name, say, verbose
        self.stream = sys.stderr if stream is None else stream
        self.max_update = _flag_int(cmd, "--max-update", 0)
        self.max_epoch = _flag_int(cmd, "--max-epoch", 0)
        self.log_interval = _flag_int(cmd, "--log-interval", 100)
        self.per_epoch: Optional[int] = None  # updates per epoch
        self.params: Optional[str] = None
        self.started = False
        self.first: Optional[Tuple[float, int]] = None  # (clock, num_updates) at the first progress line
        self.updates: Optional[int] = None  # the last count fairseq reported
        self.valid: Optional[dict] = None  # the last validation, until the save that follows it
        self.loaded: Optional[str] = None  # "checkpoint_last.pt (epoch 3 @ 500 updates)"
        self.saved: Optional[str] = None  # the same, of the last save
        self.lines: collections.deque = collections.deque(maxlen=200)  # the end of the output

    def feed(self, line: str) -> None:
        if self.verbose:
            self.stream.write(line)
            self.stream.flush()
        self.lines.append(line.rstrip("\r\n"))
        tag, message = self._split(line)
        message = message.strip()
        if tag is None:
            return
        stats = self._inner(tag, message)
        if stats is not None:
            self.updates = stats["num_updates"]
            self._progress(stats)
            return
        if tag not in ("train", "train_inner") and message.startswith("{"):  # a validation
            try:
                record = json.loads(message)
            except ValueError:
                record = None
            if isinstance(record, dict) and f"{tag}_loss" in record:
                self.valid = {"subset": tag, **record}
                return
        match = _SAVED.match(message)
        if match:
            where = f"epoch {match['epoch']} @ {int(match['updates']):,} updates"
            self.saved = f"{Path(match['path']).name} ({where})"
            self.updates = int(match["updates"])
            self._show(f"{where}: {self._valid_text()}saved {Path(match['path']).name}")
            return
        match = _LOADED.match(message)
        if match:
            self.loaded = f"{Path(match['path']).name} (epoch {match['epoch']} @ {int(match['updates']):,} updates)"
            self.updates = int(match["updates"])
            self._show(f"loaded {self.loaded}")
            return
        for pattern, attr in ((_PER_EPOCH, "per_epoch"), (_PARAMS, "params")):
            match = pattern.match(message)
            if match:
                setattr(self, attr, int(match["n"]) if attr == "per_epoch" else match["n"])
                return
        if message.startswith("begin training epoch") and not self.started:
            self.started = True
            about = [f"{self.params} parameters" if self.params else None,
                     f"{self.per_epoch:,} updates per epoch" if self.per_epoch else None,
                     f"a progress line every {self.log_interval:,} updates"]
            self._show(f"training: {', '.join(a for a in about if a)}")

    def _show(self, text: str) -> None:
        if not self.verbose:
            self.say(f"[train] {self.name}: {text}")

    def _valid_text(self) -> str:
        if not self.valid:
            return ""
        subset, v = self.valid["subset"], self.valid
        parts = [f"{subset} loss {v[f'{subset}_loss']}"]
        parts += [f"{key} {v[f'{subset}_{key}']}" for key in ("nll_loss", "ppl") if f"{subset}_{key}" in v]
        self.valid = None
        return ", ".join(parts) + "; "

    def _total(self, stats: dict) -> Optional[int]:
        """The update count the run stops at, as far as known: ``--max-update``, or ``--max-epoch`` times
        the updates per epoch, whichever comes first."""
        limits = [self.max_update] if self.max_update > 0 else []
        if self.max_epoch > 0:
            per_epoch = self.per_epoch
            if not per_epoch and stats.get("update"):
                per_epoch = stats["num_updates"] / stats["update"]
            if per_epoch:
                limits.append(int(round(self.max_epoch * per_epoch)))
        return min(limits) if limits else None

    def _progress(self, stats: dict) -> None:
        now, done = time.monotonic(), stats["num_updates"]
        if self.first is None:
            self.first = (now, done)
        start, start_done = self.first
        # the rate since the first line (validation and saves included), else fairseq's own
        rate = (done - start_done) / (now - start) if done > start_done and now > start else stats.get("ups")
        total = self._total(stats)
        parts = [f"update {done:,}" + (f"/{total:,} ({100.0 * done / total:.0f}%)" if total else "")]
        parts.append(f"epoch {stats['epoch']}")
        if "loss" in stats:
            nll = f" (nll {stats['nll_loss']:.3f})" if "nll_loss" in stats else ""
            parts.append(f"loss {stats['loss']:.3f}{nll}")
        if stats.get("ups") is not None:
            parts.append(f"{stats['ups']:.2f} updates/s")
        if total and rate:
            parts.append(f"ETA {_duration(max(total - done, 0) / rate)}")
        self._show(", ".join(parts))

    def failure_output(self, limit: int = 30) -> List[str]:
        """The end of the output worth showing after a failure: from the last traceback on, else the last
        lines (at most ``limit``)."""
        lines = list(self.lines)
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        return (lines[starts[-1]:] if starts else lines)[-limit:]


def _child_env(base: Optional[dict] = None) -> dict:
    """fairseq-train's environment: unbuffered output and the :data:`_NOISE` warnings ignored, after the
    caller's own PYTHONWARNINGS."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    env["PYTHONWARNINGS"] = ",".join([w for w in [env.get("PYTHONWARNINGS", "")] if w] + _NOISE)
    return env


def _run_and_log(cmd: List[str], log_path: Path, console: Console) -> int:
    """Run ``cmd``, its output appended to ``log_path`` (fairseq's own log lines, JSON statistics
    included: a resumed run appends) and read by ``console``. Returns its exit code (-N: killed by
    signal N). Ctrl-C reaches fairseq-train too; the runner waits for it to stop."""
    with open(log_path, "a", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=_child_env(), errors="replace")
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                console.feed(line)
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.wait()
            return -signal.SIGINT
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


def train(cmd: List[str], save_dir: Path, force: bool = False, log=print, verbose: bool = False) -> int:
    """Run ``cmd`` for ``save_dir`` unless it is finished; return the exit status: 0, fairseq-train's
    status, or 128 + N when it was killed by signal N (as a shell reports it).

    ``save_dir/run.json`` holds the command and its state (``running`` or
    ``finished``); see the module doc for resuming and refusals. fairseq-train's
    output goes to ``save_dir/train.log``; ``log`` gets the runner's lines
    (:class:`Console`), or with ``verbose`` fairseq-train's output goes to
    stderr as well."""
    save_dir = Path(save_dir)
    state_file = save_dir / RUN_FILE
    # the fairseq arguments, without the launcher's own (python, torchrun options)
    key = cmd[cmd.index("fairseq_cli.train") + 1:] if "fairseq_cli.train" in cmd else cmd[1:]
    state = _read_state(state_file, force, log) if state_file.exists() else None
    if state is not None:
        if _settings(state.get("args")) != _settings(key):
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
    log_path = save_dir / LOG_FILE
    if verbose:
        log("[train] " + " ".join(shlex.quote(c) for c in cmd))
    else:
        log(f"[train] {save_dir}: fairseq-train started, its output in {log_path} (the command: {state_file})")
    console = Console(save_dir.name, cmd, log, verbose=verbose)
    started = time.monotonic()
    code = _run_and_log(cmd, log_path, console)
    took = _duration(time.monotonic() - started)
    if code == 0:
        state.update(status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_json(state_file, state, indent=1)
        done = f", {console.updates:,} updates" if console.updates is not None else ""
        log(f"[train] {save_dir}: finished ({took}{done})")
        return 0
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        status, how = 128 - code, f"was killed by signal {-code} ({name})"
    else:
        status, how = code, f"exited with status {code}"
        if not verbose:  # what went wrong, which the console did not show
            for line in console.failure_output():
                log(f"  | {line}")
    at = f" at update {console.updates:,}" if console.updates is not None else ""
    last = save_dir / "checkpoint_last.pt"
    if last.is_file():
        point = f" (the last save seen: {console.saved})" if console.saved else (
            f" (loaded at the start: {console.loaded})" if console.loaded else "")
        again = f"run the same command again to resume from {last}{point}"
    else:
        again = "no checkpoint was saved yet, so the same command again starts this run over"
    log(f"[train] {save_dir}: fairseq-train {how}{at}, after {took}; its output: {log_path}; {again}")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
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
    ap.add_argument("--verbose", action="store_true",
                    help="show fairseq-train's whole output (it always goes to SAVE_DIR/train.log) instead of "
                         "the runner's progress lines")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU smoke run of a minute or two, not a result: the preset's SMOKE flags (a 2+2-layer, "
                         "128-dim model, warmup 100, a few epochs) on data prepared with --smoke")
    args = ap.parse_args(argv)
    try:
        if args.log_end is not None and args.loss != "el":
            raise RunError(f"--log-end applies to --loss el, got --loss {args.loss}")
        if args.log_end is not None and not 0.0 < args.log_end <= 1.0:
            raise RunError(f"--log-end must be in (0, 1], got {args.log_end}")
        if not args.data.is_dir():
            raise RunError(f"--data {args.data}: no such directory")
        _check_smoke_data(args.data, args.smoke)
        cmd = build_command(
            args.preset, args.data, args.save_dir, args.loss, args.seed, args.log_end, args.gpus, args.nodes,
            args.node_rank, args.master_addr, args.master_port, extra=extra, smoke=args.smoke,
        )
        if args.dry_run:
            print(" ".join(shlex.quote(c) for c in cmd))
            return 0
        if args.nodes > 1 and args.node_rank > 0:  # only rank 0 keeps the run's state
            return subprocess.call(cmd)
        return train(cmd, args.save_dir, force=args.force, log=lambda m: print(m, file=sys.stderr, flush=True),
                     verbose=args.verbose)
    except RunError as err:
        print(f"python -m fairseq_el.train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # run.json, train.log: a full disk, a read-only folder
        action = "cannot write" if err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else "cannot use"
        print(f"python -m fairseq_el.train: error: {os_error_line(err, action=action)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
