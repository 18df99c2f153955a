"""Token-level analysis of fairseq checkpoints: margins, energy, calibration, OOD scores.

    python -m fairseq_el.analyze DATA --path ce/checkpoint_last.pt el/checkpoint_last.pt --names ce el \\
        --gen-subset test --out analysis/

Each checkpoint is run with teacher forcing on the ``--gen-subset`` split of
``DATA`` (a fairseq binarized directory, or the data preparation's output
with ``prep.json`` and ``bin/``), and every non-padding target token is one
example: its logits ``z`` (the decoder's output before the softmax) and the
reference token ``y``. Per token it keeps (EL_SPEC section 5; the paper's
Section 5 and appendix) the margin ``z_y - max_{k != y} z_k``, the
conditional energy on the data ``E(x, y) = -z_y`` (and its mean over the
other classes), the free energy ``-logsumexp z``, the confidence ``max_k p_k``
and whether the arg-max is the reference, never the ``N x V`` logits
themselves. With ``--ood-data`` / ``--ood-subset`` the same model is run on a
second (out-of-distribution) test set and the three OOD scores of
:func:`encouraging_loss.tools.analysis.ood_scores` of its tokens are compared
with those of the in-distribution tokens (AUROC, FPR at 95% TPR).

The summaries have the layout of :func:`encouraging_loss.tools.analysis.summarize`
(accuracy = token accuracy under teacher forcing, ECE over tokens with 15
bins) and go to :func:`encouraging_loss.tools.analysis.write_report`: ``report.json``,
``report.md``, ``margins.png``, ``energy_per_class.png`` (the
``--energy-classes`` most frequent reference tokens, ranked by frequency; the
token strings are in ``report.json``), ``reliability.png`` and, with an OOD
set, ``ood_scores.png``. The Markdown table goes to stdout.

The plugin is loaded automatically (the checkpoints' criterion may be the
Encouraging Loss), and so are the :mod:`fairseq_el.compat` fixes (torch >= 2.6
checkpoints, every example batched, checkpoints read safely); ``--user-dir``
adds another fairseq plugin. Each checkpoint is first read with
``torch.load(weights_only=True)`` passed explicitly: a file that would run code
when unpickled, a truncated file or one that is not a checkpoint is refused
with one line before fairseq loads it.
"""
import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from encouraging_loss.tools import analysis
from encouraging_loss.tools.cli import Parser

__all__ = ["AnalyzeError", "TokenStats", "load_checkpoint", "resolve_data", "token_statistics", "analyze", "main"]

PROG = "python -m fairseq_el.analyze"


class AnalyzeError(RuntimeError):
    """A failure with a one-line message for the command line."""


class TokenStats:
    """ Per-token statistics of a classifier, accumulated batch by batch (no ``N x V`` array is kept).

    :meth:`update` takes the logits ``[T, V]`` and reference classes ``[T]`` of
    some tokens (padding already removed) and keeps, per token, the quantities
    of EL_SPEC section 5 (margin ``z_y - max_{k != y} z_k``, conditional energy
    ``-z_y``, mean energy of the other classes, ``min_k -z_k``, free energy
    ``-logsumexp z``, max-softmax confidence, correctness) computed with the
    functions of :mod:`encouraging_loss.tools.analysis`, and per class the sums that
    give the mean energy ``E(x, c)`` on and off the class.
    :meth:`update_ood` keeps the OOD scores of out-of-distribution tokens.
    :meth:`summary` returns what :func:`encouraging_loss.tools.analysis.analyze` would
    return for the concatenated logits: ``(summary, raw)`` in the same layout.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self._parts: Dict[str, List[np.ndarray]] = {k: [] for k in (
            "margins", "target_energy", "non_target_energy", "min_energy", "free_energy", "confidences", "correct")}
        self._scores_in: Dict[str, List[np.ndarray]] = {k: [] for k in analysis.OOD_SCORES}
        self._scores_out: Dict[str, List[np.ndarray]] = {k: [] for k in analysis.OOD_SCORES}
        self._ood_min: List[np.ndarray] = []
        self._ood_free: List[np.ndarray] = []
        self._count = np.zeros(self.num_classes, dtype=np.int64)
        self._on = np.zeros(self.num_classes, dtype=np.float64)     # sum of E(x, c) over tokens of class c
        self._all = np.zeros(self.num_classes, dtype=np.float64)    # sum of E(x, c) over all tokens

    @property
    def n(self) -> int:
        """Tokens seen by :meth:`update`."""
        return int(self._count.sum())

    @property
    def n_ood(self) -> int:
        """Tokens seen by :meth:`update_ood`."""
        return int(sum(len(a) for a in self._ood_min))

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.detach()
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        z = z.reshape(-1, z.shape[-1])
        if z.shape[1] != self.num_classes:
            raise ValueError(f"logits have {z.shape[1]} classes, expected {self.num_classes}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("logits hold non-finite values")
        return z

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().double().numpy()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add tokens: ``logits [T, V]`` (any leading shape, flattened), ``target [T]`` class indices."""
        z = self._logits(logits)
        t = target.reshape(-1).to(z.device).long()
        if t.numel() != z.shape[0]:
            raise ValueError(f"target has {t.numel()} entries but logits have {z.shape[0]} rows")
        if t.numel() == 0:
            return
        if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
            raise ValueError(f"target holds classes outside [0, {self.num_classes - 1}]")
        zd = z.double()
        scores = analysis.ood_scores(zd)  # max z, max softmax, logsumexp z
        z_y = zd.gather(1, t[:, None]).squeeze(1)
        parts = self._parts
        parts["margins"].append(self._np(analysis.margins(zd, t)))
        parts["target_energy"].append(self._np(-z_y))
        parts["non_target_energy"].append(self._np(-(zd.sum(1) - z_y) / max(self.num_classes - 1, 1)))
        parts["min_energy"].append(self._np(-scores["min_energy"]))
        parts["free_energy"].append(self._np(analysis.free_energy(zd)))
        parts["confidences"].append(self._np(scores["msp"]))
        parts["correct"].append((zd.argmax(1) == t).cpu().numpy())
        for name in analysis.OOD_SCORES:
            self._scores_in[name].append(self._np(scores[name]))
        energy = analysis.conditional_energy(zd)  # -z, [T, V]
        self._count += np.bincount(t.cpu().numpy(), minlength=self.num_classes)
        self._on += np.bincount(t.cpu().numpy(), weights=self._np(-z_y), minlength=self.num_classes)
        self._all += self._np(energy.sum(0))

    def update_ood(self, logits: torch.Tensor) -> None:
        """Add out-of-distribution tokens (their logits ``[T, V]``; their references are not used)."""
        z = self._logits(logits).double()
        if z.shape[0] == 0:
            return
        scores = analysis.ood_scores(z)
        for name in analysis.OOD_SCORES:
            self._scores_out[name].append(self._np(scores[name]))
        self._ood_min.append(self._np(-scores["min_energy"]))
        self._ood_free.append(self._np(analysis.free_energy(z)))

    def _cat(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        return np.concatenate(parts) if parts else np.empty(0)

    def per_class(self, top: Optional[int] = None) -> dict:
        """Mean ``E(x, c)`` over the tokens of class ``c`` (``target``) and over the other tokens (``other``),
        with ``count`` and ``classes`` (the class ids): all classes, or the ``top`` most frequent references."""
        n = self.n
        if top is None:
            classes = np.arange(self.num_classes)
        else:
            seen = np.flatnonzero(self._count)
            order = np.lexsort((seen, -self._count[seen]))  # by frequency, ties by id
            classes = seen[order][:top]
        count = self._count[classes]
        on = np.where(count > 0, self._on[classes] / np.maximum(count, 1), np.nan)
        off_n = n - count
        off = np.where(off_n > 0, (self._all[classes] - self._on[classes]) / np.maximum(off_n, 1), np.nan)
        clean = lambda a: [None if not math.isfinite(x) else float(x) for x in a]  # noqa: E731
        return {"classes": [int(c) for c in classes], "count": [int(c) for c in count],
                "target": clean(on), "other": clean(off)}

    def summary(self, n_bins: int = 15, energy_classes: Optional[int] = None):
        """``(summary, raw)`` in the layout of :func:`encouraging_loss.tools.analysis.analyze` over all tokens added:
        ``accuracy`` (%), ``margin`` statistics, ``energy`` on the data (and the OOD tokens), ``energy_per_class``
        (all classes, or the ``energy_classes`` most frequent references), ``ece`` (%) with its reliability
        table, ``ood`` (AUROC / FPR95 in % per score, with OOD tokens), ``probe`` None."""
        n = self.n
        if n == 0:
            raise ValueError("no tokens were added")
        margin = self._cat("margins")
        conf, correct = self._cat("confidences"), self._cat("correct").astype(bool)
        summary: dict = {"n": n, "num_classes": self.num_classes, "accuracy": 100.0 * float(correct.mean())}
        summary["margin"] = {**_describe(margin), "negative_pct": 100.0 * float(np.mean(margin < 0))}
        summary["energy"] = {
            "data": {
                "target_mean": float(self._cat("target_energy").mean()),
                "non_target_mean": float(self._cat("non_target_energy").mean()),
                "min_mean": float(self._cat("min_energy").mean()),
                "free_mean": float(self._cat("free_energy").mean()),
            },
            "ood": None,
        }
        summary["energy_per_class"] = self.per_class(energy_classes)
        summary["ece"] = 100.0 * analysis.ece(conf, correct, n_bins)
        summary["n_bins"] = n_bins
        summary["reliability"] = analysis.reliability_table(conf, correct, n_bins)
        raw = {"margins": margin, "confidences": conf, "correct": correct,
               "target_energy": self._cat("target_energy")}
        summary["ood"] = None
        if self._ood_min:
            scores_in = {k: np.concatenate(v) for k, v in self._scores_in.items()}
            scores_out = {k: np.concatenate(v) for k, v in self._scores_out.items()}
            raw["ood_scores"] = {"in": scores_in, "out": scores_out}
            summary["ood"] = {"n": self.n_ood}
            for name in analysis.OOD_SCORES:
                a, b = scores_in[name], scores_out[name]
                summary["ood"][name] = {"auroc": 100.0 * analysis.auroc(a, b),
                                        "fpr95": 100.0 * analysis.fpr_at_tpr(a, b, 0.95)}
            summary["energy"]["ood"] = {"min_mean": float(np.concatenate(self._ood_min).mean()),
                                        "free_mean": float(np.concatenate(self._ood_free).mean())}
        summary["probe"] = None
        return summary, raw


def _describe(values: np.ndarray) -> dict:
    """mean, std, min, max and the 5/25/50/75/95% quantiles (the keys of the core's margin statistics)."""
    q05, q25, median, q75, q95 = np.quantile(values, (0.05, 0.25, 0.5, 0.75, 0.95))
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "q05": float(q05), "q25": float(q25), "median": float(median),
            "q75": float(q75), "q95": float(q95)}


# ----------------------------------------------------------------------------- fairseq


def _register(user_dir: Optional[str] = None) -> None:
    """The plugin (criterion, compat fixes) and an optional other ``--user-dir``."""
    import fairseq_el

    fairseq_el.register()
    if user_dir:
        from fairseq import utils

        utils.import_user_module(argparse.Namespace(user_dir=os.path.abspath(user_dir)))


def resolve_data(data: str, flag: str = "DATA") -> str:
    """The binarized directory: ``DATA`` itself, or ``DATA/bin`` (``prep.json``'s ``bin``) for the data
    preparation's output. A ``prep.json`` that is damaged or of the wrong shape is an :class:`AnalyzeError`
    naming ``flag`` and the file."""
    prep = os.path.join(data, "prep.json")
    if os.path.isfile(prep) and not any(name.startswith("dict.") for name in os.listdir(data)):
        from encouraging_loss.tools.files import FileProblem

        from .prep_common import read_prep_json

        try:
            bin_name = read_prep_json(data, flag).get("bin", "bin")
        except FileProblem as err:
            raise AnalyzeError(str(err)) from None
        return os.path.join(data, bin_name)
    return data


def load_checkpoint(path: str, data: str, device: torch.device):
    """``(model, cfg, task)`` of a checkpoint, with its task reading ``data`` (fairseq's
    ``checkpoint_utils.load_model_ensemble_and_task``), the model in eval mode on ``device``."""
    from fairseq import checkpoint_utils

    from encouraging_loss.tools.files import FileProblem

    from .compat import read_checkpoint

    try:
        state = read_checkpoint(path, "--path")  # weights_only=True, before fairseq unpickles it
    except FileProblem as err:
        raise AnalyzeError(str(err)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AnalyzeError(f"--path {path}: holds no 'model' state dict; not a fairseq checkpoint")
    del state
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    except Exception as err:  # noqa: BLE001 -- fairseq raises many kinds
        raise AnalyzeError(f"--path {path}: cannot load it with data {data} ({_one_line(err)})") from None
    model = models[0].to(device).eval()
    decoder = getattr(model, "decoder", None)
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise AnalyzeError(f"--path {path}: the model uses an adaptive softmax; its logits are not one softmax "
                           f"over the vocabulary")
    return model, cfg, task


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_split(task, subset: str, flag: str) -> None:
    try:
        task.load_dataset(subset, combine=False, epoch=1)
    except Exception as err:  # noqa: BLE001
        raise AnalyzeError(f"{flag} {subset}: cannot load it from {task.cfg.data} ({_one_line(err)})") from None
    if getattr(task.dataset(subset), "tgt", None) is None:
        raise AnalyzeError(f"{flag} {subset}: the split has no target side in {task.cfg.data}")


def _batches(task, model, subset: str, max_tokens: Optional[int], batch_size: Optional[int]):
    from fairseq import utils

    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    return itr, len(dataset)


@torch.no_grad()
def token_statistics(model, task, subset: str, stats: TokenStats, *, device: torch.device, ood: bool = False,
                     max_tokens: Optional[int] = 4096, batch_size: Optional[int] = None, say=None) -> int:
    """Run ``model`` with teacher forcing over ``task``'s split ``subset`` and add its non-padding target tokens
    to ``stats`` (:meth:`TokenStats.update_ood` if ``ood``). Returns the number of sentences analysed."""
    from fairseq import utils

    pad = task.target_dictionary.pad()
    itr, total = _batches(task, model, subset, max_tokens, batch_size)
    sentences, start, last = 0, time.time(), time.time()
    for sample in itr:
        if not sample:
            continue
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        net_output = model(**sample["net_input"])
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        keep = target.ne(pad)
        if ood:
            stats.update_ood(logits[keep])
        else:
            stats.update(logits[keep], target[keep])
        sentences += int(sample["nsentences"])
        if say is not None and time.time() - last >= 15:
            last = time.time()
            say(f"  {subset}: {sentences}/{total} sentences, {time.time() - start:.0f}s")
    if say is not None and sentences < total:
        say(f"warning: {subset}: {total - sentences} of {total} sentences are longer than the model's maximum "
            f"positions and were left out")
    return sentences


def _same_dictionaries(task, other) -> bool:
    return (list(task.source_dictionary.symbols) == list(other.source_dictionary.symbols)
            and list(task.target_dictionary.symbols) == list(other.target_dictionary.symbols))


def analyze(data: str, paths: Sequence[str], names: Sequence[str], out, *, gen_subset: str = "test",
            ood_data: Optional[str] = None, ood_subset: Optional[str] = None, max_tokens: Optional[int] = 4096,
            batch_size: Optional[int] = None, n_bins: int = 15, energy_classes: int = 20, cpu: Optional[bool] = None,
            force: bool = False, user_dir: Optional[str] = None, say=None) -> Dict[str, Path]:
    """Analyse each checkpoint of ``paths`` (report names ``names``) on ``data``'s ``gen_subset`` and, with
    ``ood_data`` and/or ``ood_subset``, on an out-of-distribution split; write the report into ``out``
    (:func:`encouraging_loss.tools.analysis.write_report`). Returns what was written."""
    say = say or (lambda message: None)
    _register(user_dir)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    data = resolve_data(data)
    use_ood = ood_data is not None or ood_subset is not None
    ood_dir = resolve_data(ood_data, "--ood-data") if ood_data is not None else data
    ood_split = ood_subset or gen_subset
    if use_ood and os.path.abspath(ood_dir) == os.path.abspath(data) and ood_split == gen_subset:
        raise AnalyzeError(f"--ood-subset {ood_split}: the OOD split is the --gen-subset itself")
    summaries, raws, meta = {}, {}, {"command": PROG, "level": "token", "data": os.path.abspath(data),
                                     "gen_subset": gen_subset, "models": {}}
    if use_ood:
        meta.update(ood_data=os.path.abspath(ood_dir), ood_subset=ood_split)
    for path, name in zip(paths, names):
        start = time.time()
        say(f"{name}: loading {path}")
        model, cfg, task = load_checkpoint(path, data, device)
        _load_split(task, gen_subset, "--gen-subset")
        dictionary = task.target_dictionary
        stats = TokenStats(len(dictionary))
        sentences = token_statistics(model, task, gen_subset, stats, device=device, max_tokens=max_tokens,
                                     batch_size=batch_size, say=say)
        if stats.n == 0:
            raise AnalyzeError(f"--gen-subset {gen_subset}: no target tokens were analysed")
        ood_sentences = None
        if use_ood:
            ood_task = task
            if os.path.abspath(ood_dir) != os.path.abspath(data):
                from fairseq import tasks
                from omegaconf import open_dict

                task_cfg = copy.deepcopy(cfg.task)
                with open_dict(task_cfg):
                    task_cfg.data = ood_dir
                try:
                    ood_task = tasks.setup_task(task_cfg)
                except Exception as err:  # noqa: BLE001
                    raise AnalyzeError(f"--ood-data {ood_data}: {_one_line(err)}") from None
                if not _same_dictionaries(task, ood_task):
                    raise AnalyzeError(f"--ood-data {ood_data}: its dictionaries differ from those of {data}; "
                                       f"binarize it with --srcdict/--tgtdict of {data}")
            _load_split(ood_task, ood_split, "--ood-subset")
            ood_sentences = token_statistics(model, ood_task, ood_split, stats, device=device, ood=True,
                                             max_tokens=max_tokens, batch_size=batch_size, say=say)
        summary, raw = stats.summary(n_bins=n_bins, energy_classes=energy_classes)
        summary["energy_per_class"]["tokens"] = [dictionary[c] for c in summary["energy_per_class"]["classes"]]
        summary["n_sentences"] = sentences
        if ood_sentences is not None:
            summary["ood"]["n_sentences"] = ood_sentences
        summaries[name], raws[name] = summary, raw
        criterion = _criterion_name(cfg)
        meta["models"][name] = {"path": os.path.abspath(path), "criterion": criterion}
        say(f"{name}: {sentences} sentences, {stats.n} target tokens"
            + (f"; OOD {ood_sentences} sentences, {stats.n_ood} tokens" if ood_sentences is not None else "")
            + f" ({time.time() - start:.0f}s)")
        del model
    try:
        return analysis.write_report(summaries, out, raw=raws, force=force, meta=meta)
    except analysis.ReportError as err:
        raise AnalyzeError(f"--out {out}: {err}") from None


def _criterion_name(cfg) -> Optional[str]:
    try:
        return cfg.criterion._name if cfg.criterion is not None else None
    except Exception:  # noqa: BLE001 -- legacy args checkpoints
        return None


def _default_names(paths: Sequence[str]) -> List[str]:
    """``ce`` / ``el`` from each checkpoint's criterion where they tell it apart, else the run folder names."""
    from .evaluate import _checkpoint_meta, loss_label

    labels = []
    for path in paths:
        try:
            labels.append(loss_label(_checkpoint_meta(path)["criterion"]))
        except Exception:  # noqa: BLE001
            labels.append(None)
    if None not in labels and len(set(labels)) == len(labels):
        return labels
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    if len(set(folders)) == len(folders):
        return folders
    return [f"model{i + 1}" for i in range(len(paths))]


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Token-level analysis of fairseq checkpoints with teacher forcing on a test set: margins, "
                    "conditional and free energy, ECE, token accuracy and (with an OOD set) OOD scores, side by "
                    "side; writes report.json, report.md and PNGs (encouraging_loss.tools.analysis).")
    p.add_argument("data", metavar="DATA", help="fairseq binarized data directory (or the data preparation's "
                   "output, with prep.json and bin/)")
    p.add_argument("--path", dest="paths", action="extend", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint(s) to analyse (repeat the flag or list several)")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one report name per checkpoint (default: ce / el from the checkpoints' criteria, "
                        "else their folder names)")
    p.add_argument("--gen-subset", default="test", help="the in-distribution split")
    p.add_argument("--ood-data", default=None, metavar="DATA2",
                   help="binarized data (same dictionaries) whose --ood-subset split is the out-of-distribution set")
    p.add_argument("--ood-subset", default=None, metavar="SPLIT",
                   help="the out-of-distribution split (of --ood-data, else of DATA; default: --gen-subset)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="sentences per batch")
    p.add_argument("--bins", type=int, default=15, metavar="N", help="ECE bins")
    p.add_argument("--energy-classes", type=int, default=20, metavar="K",
                   help="energy_per_class: the K most frequent reference tokens")
    p.add_argument("--user-dir", default=None, metavar="DIR", help="another fairseq plugin to load (this one "
                   "is always loaded)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="cpu", action="store_const", const=True, default=None,
                        help="run on CPU (the default when CUDA is not available)")
    device.add_argument("--gpu", dest="cpu", action="store_const", const=False, help="run on CUDA")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--max-tokens", args.max_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--bins", args.bins, 1), ("--energy-classes", args.energy_classes, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not os.path.isdir(args.data):
        parser.error(f"DATA {args.data}: no such directory")
    if args.ood_data is not None and not os.path.isdir(args.ood_data):
        parser.error(f"--ood-data {args.ood_data}: no such directory")
    for path in args.paths:
        if not os.path.isfile(path):
            parser.error(f"--path {path}: no such file")
    if args.user_dir is not None and not os.path.isdir(args.user_dir):
        parser.error(f"--user-dir {args.user_dir}: no such directory")
    if args.names is not None:
        if len(args.names) != len(args.paths):
            parser.error(f"--names: {len(args.names)} name(s) for {len(args.paths)} checkpoint(s)")
        if len(set(args.names)) != len(args.names):
            parser.error(f"--names: names must differ, got {' '.join(args.names)}")
    if args.cpu is False and not torch.cuda.is_available():
        parser.error("--gpu: CUDA is not available")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a directory")
    existing = [name for name in analysis.REPORT_FILES.values() if (out / name).exists()]
    if existing and not args.force:
        parser.error(f"--out {args.out}: holds a report ({', '.join(existing)}); pass --force to overwrite it")
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        _register(args.user_dir)
        names = args.names or _default_names(args.paths)
        written = analyze(args.data, args.paths, names, out, gen_subset=args.gen_subset, ood_data=args.ood_data,
                          ood_subset=args.ood_subset, max_tokens=args.max_tokens, batch_size=args.batch_size,
                          n_bins=args.bins, energy_classes=args.energy_classes, cpu=args.cpu, force=args.force,
                          user_dir=None, say=say)
    except AnalyzeError as err:
        parser.error(str(err))
    import json

    with open(written["json"], encoding="utf-8") as f:
        summaries = json.load(f)["models"]
    print(analysis.render_markdown(summaries), end="")
    say(f"wrote {', '.join(p.name for p in written.values())} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
