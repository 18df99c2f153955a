"""Why the Encouraging Loss works: margins, energy, calibration, OOD detection, linear probe.

The paper's argument (Zhao et al., AAAI 2022, Sections 4-5 and the appendix;
EL_SPEC sections 2.5 and 5): rewarding well-classified examples enlarges the
margins, lowers the (conditional) energy on the data and therefore separates
in-distribution from out-of-distribution inputs better, at some cost in
calibration that label smoothing repairs. This module measures all of that on
any classifier's outputs; it is framework-free (torch, numpy, matplotlib for
the PNGs) and is used by ``timm_el.analyze`` (images) and the fairseq plugin
(target tokens).

Definitions (``z`` the logits of one example, ``y`` its class)::

    margin                      z_y - max_{k != y} z_k                (EL_SPEC 5)
    conditional energy          E(x, k) = -z_k                        (EL_SPEC 5)
    free energy                 F(x) = -logsumexp_k z_k
    OOD scores (higher = more in-distribution):
        min_energy              -min_k E(x, k) = max_k z_k           (the paper's indicator)
        msp                     max_k softmax(z)_k
        free_energy             -F(x) = logsumexp_k z_k
    AUROC                       P(s_in > s_out) + P(s_in = s_out) / 2, in-distribution positive
    FPR95                       fraction of OOD inputs accepted at the threshold that keeps
                                >= 95% of the in-distribution inputs (ties accepted)
    ECE                         sum_b |B_b| / N * |acc(B_b) - conf(B_b)|, 15 equal-width bins
    shot groups (long tail)     many: > 100 training images, medium: 20-100, few: < 20 (Kang et al.
                                2020); a group's accuracy is the mean of its classes' accuracies
    accuracy under attack       fraction of attacked inputs x' (||x' - x|| <= eps) still classified right,
                                per eps (the paper's Tables 7 and 11, Fig. 7); margins on x': Fig. 8
    input-gradient zero fraction  fraction of clean inputs whose CE input gradient is exactly 0
                                (a saturated softmax: gradient masking, FGSM / PGD see nothing)

The low-level functions return fractions in [0, 1]; :func:`summarize` reports
accuracies, ECE, AUROC and FPR in **percent**, like the paper's tables.

Typical use::

    summary, raw = analyze(logits, targets, ood_logits=ood_logits)
    write_report({"CE": s_ce, "EL": s_el}, "report/", raw={"CE": raw_ce, "EL": raw_el})
"""
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .files import FileProblem, atomic_path, check_writable_dir, os_error_line

__all__ = [
    "ATTACK_REPORT_FILES",
    "OOD_SCORES",
    "REPORT_FILES",
    "ReportError",
    "analyze",
    "attack_curve",
    "auroc",
    "calibration",
    "check_out_dir",
    "conditional_energy",
    "ece",
    "fpr_at_tpr",
    "free_energy",
    "linear_probe",
    "margins",
    "ood_scores",
    "reliability_table",
    "render_markdown",
    "SHOT_GROUPS",
    "shot_accuracy",
    "shot_groups",
    "summarize",
    "write_report",
    "zero_gradient_fraction",
]

#: the OOD scores of :func:`ood_scores`, in report order (higher score = more in-distribution).
OOD_SCORES = ("min_energy", "msp", "free_energy")
#: what :func:`write_report` writes: key -> file name.
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "margins": "margins.png",
    "energy_per_class": "energy_per_class.png",
    "reliability": "reliability.png",
    "ood_scores": "ood_scores.png",
}
#: what :func:`write_report` writes besides, for models with attack results (``el-analyze --attack``):
#: accuracy vs eps per attack (the paper's Fig. 7), margin histograms on attacked inputs (Fig. 8).
ATTACK_REPORT_FILES = {
    "attacks": "attacks.png",
    "attack_margins": "attack_margins.png",
}
_SCORE_LABELS = {
    "min_energy": "max logit (min conditional energy)",
    "msp": "max softmax probability",
    "free_energy": "logsumexp (negative free energy)",
}
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


class ReportError(Exception):
    """A report that cannot be written (e.g. it exists and ``force`` is not set)."""


# ----------------------------------------------------------------------------- inputs


def _logits(logits) -> torch.Tensor:
    """``logits`` as a floating tensor ``[N, V]`` (leading dimensions flattened; half precision upcast)."""
    z = torch.as_tensor(logits)
    if not torch.is_floating_point(z):
        z = z.to(torch.get_default_dtype())
    elif z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if z.dim() == 0:
        raise ValueError("logits must have a class dimension, got a scalar")
    if z.dim() == 1:
        z = z.unsqueeze(0)
    return z.detach().reshape(-1, z.shape[-1])


def _targets(target, n: int, num_classes: int, device) -> torch.Tensor:
    t = torch.as_tensor(target, device=device)
    if torch.is_floating_point(t) or t.dtype == torch.bool:
        if torch.is_floating_point(t) and not bool(torch.all(t == t.round())):
            raise ValueError("target must hold class indices (integers)")
        t = t.long()
    t = t.reshape(-1).long()
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries but logits have {n} rows")
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target holds classes outside [0, {num_classes - 1}] "
                         f"(min {int(t.min())}, max {int(t.max())})")
    return t


def _scores(values, what: str) -> np.ndarray:
    """A 1-D float64 numpy array of finite scores (tensors, arrays and lists accepted)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} holds {int(np.sum(~np.isfinite(a)))} non-finite value(s)")
    return a


# ----------------------------------------------------------------------------- margins and energies


def margins(logits: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """The margin of each example, ``z_y - max_{k != y} z_k`` (EL_SPEC 5; the paper's Section 5).

    Positive when the example is classified correctly (with a unique maximum),
    negative when it is not. ``logits`` is ``[N, V]`` (or ``[..., V]``,
    flattened), ``target`` the ``N`` class indices. Raises ``ValueError`` for
    fewer than two classes (a margin needs a competing class) or targets out
    of range.
    """
    z = _logits(logits)
    if z.shape[1] < 2:
        raise ValueError(f"margins need at least 2 classes, got logits with {z.shape[1]} class(es)")
    t = _targets(target, z.shape[0], z.shape[1], z.device)
    z_y = z.gather(1, t[:, None]).squeeze(1)
    # the best competitor: the runner-up when the target is the arg-max, else the maximum (no N x V copy)
    top2 = z.topk(2, dim=1)
    best_other = torch.where(top2.indices[:, 0] == t, top2.values[:, 1], top2.values[:, 0])
    return z_y - best_other


def conditional_energy(logits: ArrayLike) -> torch.Tensor:
    """The conditional energy ``E(x, k) = -z_k`` of every class (EL_SPEC 5), same shape as ``logits``."""
    z = torch.as_tensor(logits)
    if not torch.is_floating_point(z):
        z = z.to(torch.get_default_dtype())
    return -z.detach()


def free_energy(logits: ArrayLike) -> torch.Tensor:
    """The free energy ``F(x) = -logsumexp_k z_k`` of each example (EL_SPEC 5), ``[N]``."""
    return -torch.logsumexp(_logits(logits), dim=1)


def ood_scores(logits: ArrayLike) -> Dict[str, torch.Tensor]:
    """The three OOD scores of each example (EL_SPEC 5; the paper's appendix), higher = more in-distribution.

    ``min_energy``: ``-min_k E(x, k) = max_k z_k``, the paper's indicator;
    ``msp``: the maximum softmax probability; ``free_energy``: ``-F(x) =
    logsumexp_k z_k``. Each is a tensor ``[N]``.
    """
    z = _logits(logits)
    lse = torch.logsumexp(z, dim=1)
    top = z.max(dim=1).values
    return {"min_energy": top, "msp": torch.exp(top - lse), "free_energy": lse}


# ----------------------------------------------------------------------------- OOD metrics


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve of telling in-distribution (positive) from OOD inputs by score.

    The Mann-Whitney statistic ``P(s_in > s_out) + P(s_in = s_out) / 2`` over
    all (in, out) pairs: a tie counts one half. 1.0 is a perfect separation,
    0.5 chance (EL_SPEC 5; the paper's Table 4 reports it in percent).
    """
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    ranks[order] = np.arange(1, both.size + 1, dtype=np.float64)
    # ties get the mean of their ranks
    sorted_vals = both[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], both.size]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def fpr_at_tpr(scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate of OOD inputs at the threshold that keeps ``tpr`` of the in-distribution ones.

    An input is accepted as in-distribution when its score is ``>= t``. The
    threshold ``t`` is the largest score that accepts at least ``tpr`` of the
    in-distribution inputs: with their scores sorted in decreasing order,
    ``t = s_(k)``, ``k = ceil(tpr * n_in)``. **Ties** at ``t`` are accepted,
    on both sides: in-distribution inputs tied with ``t`` raise the true
    positive rate above ``tpr``, OOD inputs tied with ``t`` count as false
    positives (the pessimistic choice). Returns the fraction of OOD scores
    ``>= t`` ("FPR95" for ``tpr=0.95``, EL_SPEC 5).
    """
    if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    k = max(1, math.ceil(tpr * a.size - 1e-9))
    threshold = np.sort(a)[::-1][k - 1]
    return float(np.mean(b >= threshold))


# ----------------------------------------------------------------------------- calibration


def _calibration_inputs(confidences, correct) -> Tuple[np.ndarray, np.ndarray]:
    conf = _scores(confidences, "confidences")
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    ok = np.asarray(correct).reshape(-1).astype(np.float64)
    if ok.size != conf.size:
        raise ValueError(f"correct has {ok.size} entries but confidences have {conf.size}")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidences must lie in [0, 1]")
    if np.any((ok != 0) & (ok != 1)):
        raise ValueError("correct must hold 0/1 (or booleans)")
    return conf, ok


def _bins(conf: np.ndarray, n_bins: int) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b is (edges[b], edges[b + 1]]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    return edges, index


def reliability_table(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> List[dict]:
    """The reliability table of ECE (Guo et al. 2017; EL_SPEC 5): equal-width confidence bins.

    Bin ``b`` holds the confidences in ``(b / n_bins, (b + 1) / n_bins]`` (the
    first bin also 0). Each row: ``lo``, ``hi``, ``count``, and the mean
    ``confidence`` and ``accuracy`` (fraction correct) of the bin, ``None``
    for an empty bin.
    """
    conf, ok = _calibration_inputs(confidences, correct)
    edges, index = _bins(conf, n_bins)
    rows = []
    for b in range(n_bins):
        member = index == b
        count = int(member.sum())
        rows.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
            "confidence": float(conf[member].mean()) if count else None,
            "accuracy": float(ok[member].mean()) if count else None,
        })
    return rows


def ece(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error, ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the bins of
    :func:`reliability_table` (EL_SPEC 5: 15 bins), a fraction in [0, 1]."""
    conf, _ = _calibration_inputs(confidences, correct)
    total = conf.size
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in reliability_table(confidences, correct, n_bins) if row["count"]))


def calibration(logits: ArrayLike, target: ArrayLike, n_bins: int = 15) -> dict:
    """ECE and reliability table of a classifier's top-1 predictions (EL_SPEC 5).

    Confidence: the maximum softmax probability; correct: the arg-max equals
    the target. Returns ``{"ece": fraction, "table": reliability_table(...)}``.
    """
    z = _logits(logits)
    t = _targets(target, z.shape[0], z.shape[1], z.device)
    top, pred = z.max(dim=1)
    correct = (pred == t).cpu().numpy()
    conf = torch.exp(top - torch.logsumexp(z, dim=1)).clamp(0, 1).cpu().double().numpy()
    return {"ece": ece(conf, correct, n_bins), "table": reliability_table(conf, correct, n_bins)}


# ----------------------------------------------------------------------------- representation probe


def linear_probe(train_features: ArrayLike, train_targets: ArrayLike, test_features: ArrayLike,
                 test_targets: ArrayLike, *, epochs: int = 100, lr: float = 0.01, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0, num_classes: Optional[int] = None) -> float:
    """Accuracy of a fresh linear classifier trained with plain cross-entropy on frozen features.

    The representation probe of the paper's analysis (does EL learn better
    features, or only a better classifier?): the features are fixed, a new
    ``Linear(D, C)`` is trained on ``train_features`` and scored on
    ``test_features``. The features are standardised with the training
    features' mean and standard deviation; training is Adam (``lr``,
    ``weight_decay``) for ``epochs`` passes over the training set in
    minibatches of ``batch_size`` (one full batch when it is larger than the
    set), shuffled by a generator seeded with ``seed``, in float32 on the
    features' device: the result is deterministic for a given seed (on the
    CPU). ``num_classes`` defaults to ``1 + max(target)`` over both sets.
    Returns the test accuracy as a fraction.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    x_tr = torch.as_tensor(train_features).detach().float()
    x_te = torch.as_tensor(test_features).detach().float().to(x_tr.device)
    x_tr, x_te = x_tr.reshape(x_tr.shape[0], -1), x_te.reshape(x_te.shape[0], -1)
    if x_tr.shape[0] == 0 or x_te.shape[0] == 0:
        raise ValueError("linear_probe needs at least one training and one test example")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"train features have {x_tr.shape[1]} dimensions but test features {x_te.shape[1]}")
    y_tr = torch.as_tensor(train_targets, device=x_tr.device).reshape(-1).long()
    y_te = torch.as_tensor(test_targets, device=x_tr.device).reshape(-1).long()
    if y_tr.numel() != x_tr.shape[0] or y_te.numel() != x_te.shape[0]:
        raise ValueError("linear_probe: one target per feature row is needed")
    classes = num_classes or int(max(int(y_tr.max()), int(y_te.max()))) + 1
    if int(min(int(y_tr.min()), int(y_te.min()))) < 0 or int(max(int(y_tr.max()), int(y_te.max()))) >= classes:
        raise ValueError(f"linear_probe: targets outside [0, {classes - 1}]")
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    gen = torch.Generator(device="cpu").manual_seed(seed)
    layer = torch.nn.Linear(x_tr.shape[1], classes)
    with torch.no_grad():  # PyTorch's default init, drawn from our generator
        bound = 1.0 / math.sqrt(x_tr.shape[1])
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
        layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=gen))
    layer = layer.to(x_tr.device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_tr.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x_tr.device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(layer(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        return float((layer(x_te).argmax(dim=1) == y_te).double().mean())


# ----------------------------------------------------------------------------- summary


def _stats(values: np.ndarray) -> dict:
    out = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
           "max": float(values.max())}
    for q, v in zip(_QUANTILES, np.quantile(values, _QUANTILES)):
        out["median" if q == 0.5 else f"q{int(round(q * 100)):02d}"] = float(v)
    return out


def _none_if_nan(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def analyze(logits: ArrayLike, target: ArrayLike, *, ood_logits: Optional[ArrayLike] = None,
            features: Optional[ArrayLike] = None, probe: Optional[Tuple[ArrayLike, ArrayLike]] = None,
            n_bins: int = 15, probe_kwargs: Optional[Mapping] = None) -> Tuple[dict, dict]:
    """All the measurements of one model: ``(summary, raw)``.

    Args:
        logits: ``[N, V]`` logits on the in-distribution evaluation set (or
            ``[..., V]``, e.g. target tokens, flattened).
        target: the ``N`` classes.
        ood_logits: ``[M, V]`` logits on an out-of-distribution set (no targets).
        features: ``[N, D]`` frozen features of the same ``N`` examples, for the probe.
        probe: ``(train_features [P, D], train_targets [P])``: train a fresh
            linear classifier on these and test it on ``features`` / ``target``
            (:func:`linear_probe`; ``probe_kwargs`` go to it).
        n_bins: ECE bins.

    Returns:
        ``summary`` (JSON-able, see :func:`summarize`) and ``raw``, the per-example
        arrays the plots need (numpy): ``margins [N]``, ``confidences [N]``,
        ``correct [N]``, ``target_energy [N]`` (``E(x, y)``), and with OOD
        logits ``ood_scores = {"in": {score: [N]}, "out": {score: [M]}}``.
    """
    z = _logits(logits)
    n, v = z.shape
    if n == 0:
        raise ValueError("logits hold no examples")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits hold non-finite values")
    t = _targets(target, n, v, z.device)
    top, pred = z.max(dim=1)
    lse = torch.logsumexp(z, dim=1)
    conf = torch.exp(top - lse).clamp(0, 1)  # the max softmax probability, without an N x V softmax
    correct = (pred == t)
    summary: dict = {"n": n, "num_classes": v, "accuracy": 100.0 * float(correct.double().mean())}

    raw: dict = {"confidences": conf.cpu().double().numpy(), "correct": correct.cpu().numpy()}
    if v >= 2:
        m = margins(z, t).cpu().double().numpy()
        raw["margins"] = m
        summary["margin"] = {**_stats(m), "negative_pct": 100.0 * float(np.mean(m < 0))}
    else:
        summary["margin"] = None

    # conditional energy on the data: at the target class, at the other classes; free energy
    # (sums in float64, no N x V temporaries: token-level logits can be large)
    target_energy = -z.gather(1, t[:, None]).squeeze(1).double()
    raw["target_energy"] = target_energy.cpu().numpy()
    row_energy = -z.sum(dim=1, dtype=torch.float64)
    other_mean = ((row_energy - target_energy) / (v - 1)) if v > 1 else torch.full_like(target_energy, math.nan)
    summary["energy"] = {
        "data": {
            "target_mean": float(target_energy.mean()),
            "non_target_mean": _none_if_nan(float(other_mean.mean())),
            "min_mean": float(-top.double().mean()),
            "free_mean": float(-lse.double().mean()),
        },
        "ood": None,
    }
    # per class c: mean E(x, c) over the examples of class c, and over the examples of other classes
    count_c = torch.bincount(t, minlength=v).double()
    on_sum = torch.zeros(v, dtype=torch.float64, device=z.device).index_add_(0, t, target_energy)
    column_energy = -z.sum(dim=0, dtype=torch.float64)
    on = on_sum / count_c
    off = (column_energy - on_sum) / (n - count_c)
    summary["energy_per_class"] = {
        "count": [int(c) for c in count_c.tolist()],
        "target": [_none_if_nan(x) for x in on.tolist()],
        "other": [_none_if_nan(x) for x in off.tolist()],
    }

    summary["ece"] = 100.0 * ece(raw["confidences"], raw["correct"], n_bins)
    summary["n_bins"] = n_bins
    summary["reliability"] = reliability_table(raw["confidences"], raw["correct"], n_bins)

    summary["ood"] = None
    if ood_logits is not None:
        zo = _logits(ood_logits)
        if zo.shape[0] == 0:
            raise ValueError("ood_logits hold no examples")
        if zo.shape[1] != v:
            raise ValueError(f"ood_logits have {zo.shape[1]} classes but logits have {v}")
        if not bool(torch.isfinite(zo).all()):
            raise ValueError("ood_logits hold non-finite values")
        s_in, s_out = ood_scores(z), ood_scores(zo)
        raw["ood_scores"] = {"in": {k: s.cpu().double().numpy() for k, s in s_in.items()},
                             "out": {k: s.cpu().double().numpy() for k, s in s_out.items()}}
        summary["ood"] = {"n": int(zo.shape[0])}
        for name in OOD_SCORES:
            a, b = raw["ood_scores"]["in"][name], raw["ood_scores"]["out"][name]
            summary["ood"][name] = {"auroc": 100.0 * auroc(a, b), "fpr95": 100.0 * fpr_at_tpr(a, b, 0.95)}
        summary["energy"]["ood"] = {
            "min_mean": float(-s_out["min_energy"].double().mean()),
            "free_mean": float(-s_out["free_energy"].double().mean()),
        }

    summary["probe"] = None
    if probe is not None:
        if features is None:
            raise ValueError("probe needs the test features (features=...) of the evaluated examples")
        train_features, train_targets = probe
        kwargs = dict(probe_kwargs or {})
        kwargs.setdefault("num_classes", v)
        acc = linear_probe(train_features, train_targets, features, t.cpu(), **kwargs)
        summary["probe"] = {"accuracy": 100.0 * acc, "n_train": int(len(train_targets)), "n_test": n}
    return summary, raw


def summarize(logits: ArrayLike, target: ArrayLike, *, ood_logits: Optional[ArrayLike] = None,
              features: Optional[ArrayLike] = None, probe: Optional[Tuple[ArrayLike, ArrayLike]] = None,
              n_bins: int = 15, probe_kwargs: Optional[Mapping] = None) -> dict:
    """The JSON-able summary of one model (the first half of :func:`analyze`; same arguments).

    Keys (percentages where marked %): ``n``, ``num_classes``, ``accuracy`` (%),
    ``margin`` (mean, std, min, max, q05, q25, median, q75, q95, negative_pct),
    ``energy.data`` (``target_mean`` = mean ``E(x, y)``, ``non_target_mean``,
    ``min_mean``, ``free_mean``), ``energy.ood`` (``min_mean``, ``free_mean``
    on the OOD set, or None), ``energy_per_class`` (per class: ``count``,
    ``target`` = mean ``E(x, c)`` over its examples, ``other`` = over the
    others), ``ece`` (%), ``n_bins``, ``reliability`` (the table), ``ood``
    (``n`` and per score ``auroc`` / ``fpr95`` in %, or None), ``probe``
    (``accuracy`` in %, ``n_train``, ``n_test``, or None).
    """
    return analyze(logits, target, ood_logits=ood_logits, features=features, probe=probe, n_bins=n_bins,
                   probe_kwargs=probe_kwargs)[0]


# ----------------------------------------------------------------------------- attacks


def attack_curve(eps: Sequence[float], logits: Sequence[ArrayLike], target: ArrayLike, *, norm: str,
                 subset: bool = False) -> Tuple[dict, Dict[float, np.ndarray]]:
    """Accuracy and margins under one attack over an epsilon grid (the paper's Tables 7 and 11, Fig. 7;
    the margins on attacked inputs: Fig. 8; EL_SPEC 6).

    ``logits[i]``: ``[N, V]`` logits of the same ``N`` examples attacked at ``eps[i]`` (``target`` their
    classes). Returns ``(summary, margins)``: ``summary = {"norm", "samples": N, "subset", "eps": [...],
    "accuracy": [% per eps], "margin_mean": [per eps; None if not finite]}`` (the ``attacks`` entry of
    ``el-analyze``'s report) and ``margins = {eps: numpy array [N]}`` (:func:`margins` per eps).
    Raises ``ValueError`` for a grid and logits of different lengths, an ``eps`` that is not a finite
    number ``>= 0``, or logits of different shapes.
    """
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    eps = [float(e) for e in eps]
    if len(eps) != len(logits) or not eps:
        raise ValueError(f"attack_curve needs one logits array per eps, got {len(eps)} eps and {len(logits)} "
                         f"logits arrays")
    bad = [e for e in eps if not (math.isfinite(e) and e >= 0)]
    if bad:
        raise ValueError(f"eps must be finite numbers >= 0, got {bad[0]}")
    zs = [_logits(z) for z in logits]
    if any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"logits of every eps must have the same shape, got {[tuple(z.shape) for z in zs]}")
    n, v = zs[0].shape
    if n == 0:
        raise ValueError("logits hold no examples")
    t = _targets(target, n, v, zs[0].device)
    accuracy, margin_mean, per_eps = [], [], {}
    for e, z in zip(eps, zs):
        accuracy.append(100.0 * float((z.argmax(dim=1) == t).double().mean()))
        m = margins(z, t).cpu().double().numpy()
        per_eps[e] = m
        margin_mean.append(_none_if_nan(float(m.mean())))
    summary = {"norm": norm, "samples": int(n), "subset": bool(subset), "eps": eps, "accuracy": accuracy,
               "margin_mean": margin_mean}
    return summary, per_eps


def zero_gradient_fraction(gradients: ArrayLike) -> float:
    """The fraction of examples whose input gradient is exactly zero: the gradient-masking indicator of
    ``el-analyze --attack`` (EL_SPEC 6; the paper's section 5.4 attacks follow this gradient).

    ``gradients``: ``[N, ...]`` per-example gradients (or any per-example values that are zero exactly
    when the gradient is, such as its largest absolute entry, ``[N]``). A saturated softmax (``p_y == 1``
    and the other probabilities 0 in float32) gives a cross-entropy gradient of exactly zero: FGSM and
    PGD then cannot move the input, and their accuracy measures the saturation, not robustness.
    """
    g = torch.as_tensor(gradients).detach()
    if g.dim() == 0:
        raise ValueError("gradients must have an example dimension, got a scalar")
    if g.shape[0] == 0:
        raise ValueError("gradients hold no examples")
    if torch.is_floating_point(g) and not bool(torch.isfinite(g).all()):
        raise ValueError("gradients hold non-finite values")
    zero = (g.reshape(g.shape[0], -1) == 0).all(dim=1)
    return float(zero.double().mean())


# ----------------------------------------------------------------------------- long-tailed: shot groups

#: the shot groups of :func:`shot_groups`, in report order.
SHOT_GROUPS = ("many", "medium", "few")


def _int_array(values, what: str) -> np.ndarray:
    """A 1-D int64 numpy array of integers (tensors, arrays, lists; integer-valued floats accepted)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.double().numpy() if values.is_floating_point() else values.numpy()
    try:
        a = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a sequence of integers ({exc})") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{what} must hold integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise ValueError(f"{what} must hold integers, got non-integer values")
    return a.reshape(-1).astype(np.int64)


def _shot_thresholds(many, few) -> Tuple[int, int]:
    for name, value in (("many", many), ("few", few)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if few > many + 1:
        raise ValueError(f"few ({few}) must be at most many + 1 ({many + 1}): the groups would overlap")
    return int(many), int(few)


def shot_groups(train_counts: ArrayLike, many: int = 100, few: int = 20) -> List[str]:
    """The shot group of each class from its number of training images (Kang et al., "Decoupling
    Representation and Classifier for Long-Tailed Recognition", ICLR 2020, section 5; the paper's
    Table 3 / Table 9, EL_SPEC 6): ``"many"`` for more than ``many`` images, ``"few"`` for fewer
    than ``few``, ``"medium"`` otherwise (``few <= n <= many``: 20-100 by default).

    ``train_counts``: the ``C`` per-class training counts (integers >= 0), class-index order.
    Returns a list of ``C`` strings. ``ValueError`` for bad counts or thresholds."""
    many, few = _shot_thresholds(many, few)
    counts = _int_array(train_counts, "train_counts")
    if counts.size == 0:
        raise ValueError("train_counts is empty: one count per class is needed")
    if int(counts.min()) < 0:
        raise ValueError(f"train_counts must be >= 0, got {int(counts.min())} for class {int(counts.argmin())}")
    return ["many" if n > many else "few" if n < few else "medium" for n in counts.tolist()]


def shot_accuracy(logits_or_pred: ArrayLike, target: ArrayLike, train_counts: ArrayLike, many: int = 100,
                  few: int = 20) -> Dict[str, Optional[float]]:
    """Top-1 accuracy overall and by shot group, in percent, as Kang et al. 2020 report it (their
    ``shot_acc``; the All / Many / Medium / Few columns of the paper's Table 3 / Table 9, EL_SPEC 6).

    ``"all"``: top-1 accuracy over every evaluated example. ``"many"`` / ``"medium"`` / ``"few"``:
    the mean, over the group's classes that occur in ``target``, of each class's accuracy (so every
    class counts the same, whatever its number of evaluation images); ``None`` when no class of the
    group occurs. Groups from the training counts (:func:`shot_groups`).

    Args:
        logits_or_pred: ``[N, C]`` logits or scores (``[..., C]`` flattened; arg-max taken), or the
            ``N`` predicted classes (1-D).
        target: the ``N`` true classes, in ``[0, C)``.
        train_counts: the ``C`` per-class training counts.
        many, few: the group thresholds (more than ``many``: many-shot; fewer than ``few``: few-shot).

    ``ValueError`` for inputs that do not fit together (sizes, classes out of range, no examples)."""
    groups = shot_groups(train_counts, many, few)
    C = len(groups)
    if isinstance(logits_or_pred, torch.Tensor):
        scores = logits_or_pred.detach()
    else:
        scores = torch.as_tensor(np.asarray(logits_or_pred))
    if scores.dim() == 0:
        raise ValueError("logits_or_pred must be [N, C] logits or N predicted classes, got a scalar")
    if scores.dim() == 1:
        pred = _int_array(scores, "logits_or_pred (predicted classes)")
    else:
        if scores.shape[-1] != C:
            raise ValueError(f"logits_or_pred has {scores.shape[-1]} classes but train_counts has {C}")
        pred = scores.reshape(-1, C).argmax(-1).cpu().numpy().astype(np.int64)
    t = _int_array(target, "target")
    if t.size != pred.size:
        raise ValueError(f"target has {t.size} entries but logits_or_pred has {pred.size} examples")
    if t.size == 0:
        raise ValueError("target is empty: no examples to evaluate")
    for name, a in (("target", t), ("logits_or_pred (predicted classes)", pred)):
        if int(a.min()) < 0 or int(a.max()) >= C:
            raise ValueError(f"{name} holds classes outside [0, {C - 1}] (min {int(a.min())}, max {int(a.max())})")
    correct = pred == t
    per_class_n = np.bincount(t, minlength=C)
    per_class_hit = np.bincount(t, weights=correct.astype(np.float64), minlength=C)
    out: Dict[str, Optional[float]] = {"all": 100.0 * float(correct.mean())}
    kinds = np.asarray(groups)
    for group in SHOT_GROUPS:
        present = (kinds == group) & (per_class_n > 0)
        out[group] = (100.0 * float(np.mean(per_class_hit[present] / per_class_n[present]))
                      if present.any() else None)
    return out


# ----------------------------------------------------------------------------- report


def _fmt(value, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{decimals}f}"


def _get(summary: Mapping, path: Sequence[str]):
    node = summary
    for key in path:
        if not isinstance(node, Mapping) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _report_rows(summaries: Mapping[str, Mapping]) -> List[Tuple[str, Tuple[str, ...]]]:
    rows = [
        ("examples", ("n",)),
        ("accuracy (%)", ("accuracy",)),
        ("ECE (%)", ("ece",)),
        ("margin mean", ("margin", "mean")),
        ("margin median", ("margin", "median")),
        ("margin 5% quantile", ("margin", "q05")),
        ("margin 95% quantile", ("margin", "q95")),
        ("negative margins (%)", ("margin", "negative_pct")),
        ("energy E(x,y), data", ("energy", "data", "target_mean")),
        ("energy E(x,k), k != y, data", ("energy", "data", "non_target_mean")),
        ("min energy, data", ("energy", "data", "min_mean")),
        ("free energy, data", ("energy", "data", "free_mean")),
    ]
    if any(_get(s, ("ood",)) for s in summaries.values()):
        rows += [("OOD examples", ("ood", "n")),
                 ("min energy, OOD", ("energy", "ood", "min_mean")),
                 ("free energy, OOD", ("energy", "ood", "free_mean"))]
        for name in OOD_SCORES:
            rows += [(f"AUROC {name} (%)", ("ood", name, "auroc")), (f"FPR95 {name} (%)", ("ood", name, "fpr95"))]
    if any(_get(s, ("probe",)) for s in summaries.values()):
        rows += [("linear probe accuracy (%)", ("probe", "accuracy"))]
    return rows


def render_markdown(summaries: Mapping[str, Mapping], decimals: int = 2) -> str:
    """The models side by side: one row per measurement, one column per model (Markdown); with attack
    results (``el-analyze --attack``) an attacks section after it: accuracy (%) per attack and eps, the
    images attacked, the input-gradient zero fraction and a gradient-masking warning."""
    names = list(summaries)
    lines = ["| measurement | " + " | ".join(n.replace("|", "\\|") for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for label, path in _report_rows(summaries):
        lines.append(f"| {label} | " + " | ".join(_fmt(_get(summaries[n], path), decimals) for n in names) + " |")
    text = "\n".join(lines) + "\n"
    attacks = _render_attacks(summaries, decimals)
    return text + ("\n" + attacks if attacks else "")


def _attack_names(summaries) -> List[str]:
    names: List[str] = []
    for s in summaries.values():
        for attack in (s.get("attacks") or {}):
            if attack not in names:
                names.append(attack)
    return names


def _render_attacks(summaries: Mapping[str, Mapping], decimals: int = 2) -> str:
    """The attacks section of :func:`render_markdown` ('' without attack results): accuracy (%) per attack
    and eps, the models side by side, the images attacked (``samples``), and the input-gradient zero
    fraction with a warning where FGSM / PGD numbers may be inflated by gradient masking."""
    names = list(summaries)
    attacks = _attack_names(summaries)
    gradient = {n: summaries[n].get("input_gradient") for n in names}
    if not attacks and not any(gradient.values()):
        return ""
    header = " | ".join(n.replace("|", "\\|") for n in names)
    lines = ["**Attacks**: accuracy (%) on attacked test images (inputs in [0, 1], eps in pixel units; "
             "samples: images attacked)", "",
             f"| attack | norm | eps | samples | {header} |", "|---|---|---:|---:|" + "---:|" * len(names)]
    for attack in attacks:
        entries = {n: (summaries[n].get("attacks") or {}).get(attack) for n in names}
        present = [e for e in entries.values() if e]
        grid: List[float] = []
        for e in present:
            grid += [x for x in e["eps"] if x not in grid]
        samples = sorted({int(e["samples"]) for e in present})
        shown_samples = "/".join(str(x) for x in samples)
        if any(e.get("subset") for e in present):
            shown_samples += " (subset)"
        norm = present[0]["norm"] if present else ""
        for x in sorted(grid):
            cells = []
            for n in names:
                e = entries[n]
                cells.append(_fmt(e["accuracy"][e["eps"].index(x)], decimals) if e and x in e["eps"] else "–")
            lines.append(f"| {attack} | {norm} | {x:g} | {shown_samples} | " + " | ".join(cells) + " |")
    if any(gradient.values()):
        lines += ["", f"| clean input gradient | {header} |", "|---|" + "---:|" * len(names),
                  "| samples | " + " | ".join(_fmt(_get(gradient, (n, "samples"))) for n in names) + " |",
                  "| zero fraction | " + " | ".join(_fmt(_get(gradient, (n, "zero_fraction")), 3)
                                                    for n in names) + " |"]
        masked = [(n, g["zero_fraction"]) for n, g in gradient.items() if g and g.get("zero_fraction")]
        if masked:
            who = ", ".join(f"{n} ({f:.1%})" for n, f in masked)
            lines += ["", f"Gradient masking: the cross-entropy input gradient is exactly zero on part of the "
                          f"clean points of {who}; FGSM / PGD / PGD-L2 follow that gradient, so their accuracies "
                          f"may be inflated there. APGD-DLR and AutoAttack (scale-free) measure robustness."]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    from .results.plots import new_figure  # the project's one Agg figure helper
    return new_figure(width, height)


def _colour(k: int) -> str:
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    return palette[k % len(palette)]


def _margin_data(summaries, raw):
    return [(k, name, np.asarray(raw[name]["margins"])) for k, name in enumerate(summaries)
            if raw.get(name) is not None and raw[name].get("margins") is not None]


def _has_margins(summaries, raw) -> bool:
    return bool(_margin_data(summaries, raw))


def _plot_margins(summaries, raw, path: Path) -> bool:
    data = _margin_data(summaries, raw)
    if not data:
        return False
    allv = np.concatenate([d for _, _, d in data])
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    bins = np.linspace(lo, hi, 61)
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for k, name, m in data:
        ax.hist(m, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=_colour(k),
                label=f"{name} (mean {m.mean():.2f})")
        ax.hist(m, bins=bins, density=True, histtype="step", color=_colour(k))
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("margin  z_y - max_{k != y} z_k")
    ax.set_ylabel("density")
    ax.set_title("Margins on the evaluation set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _energy_models(summaries):
    return [(k, name, summaries[name]["energy_per_class"]) for k, name in enumerate(summaries)
            if isinstance(summaries[name].get("energy_per_class"), Mapping)]


def _has_energy(summaries) -> bool:
    return bool(_energy_models(summaries))


def _plot_energy(summaries, path: Path) -> bool:
    models = _energy_models(summaries)
    if not models:
        return False
    classes = max(len(e["target"]) for _, _, e in models)
    fig = _figure(max(6.4, 0.45 * classes + 2), 6.0)
    width = 0.8 / len(models)
    for row, (key, title) in enumerate((("target", "on the data: mean E(x, c) over the examples of class c"),
                                        ("other", "off the target: mean E(x, c) over the other examples"))):
        ax = fig.add_subplot(2, 1, row + 1)
        for j, (k, name, e) in enumerate(models):
            values = [np.nan if v is None else v for v in e[key]]
            xs = np.arange(len(values)) + (j - (len(models) - 1) / 2) * width
            ax.bar(xs, values, width=width, color=_colour(k), label=name)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("energy -z_c")
        if classes <= 40:
            ax.set_xticks(np.arange(classes))
        ax.legend(fontsize=8)
    fig.axes[-1].set_xlabel("class c")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _reliability_models(summaries):
    return [(k, name, summaries[name]) for k, name in enumerate(summaries) if summaries[name].get("reliability")]


def _has_reliability(summaries) -> bool:
    return bool(_reliability_models(summaries))


def _plot_reliability(summaries, path: Path) -> bool:
    models = _reliability_models(summaries)
    if not models:
        return False
    fig = _figure(3.6 * len(models), 3.8)
    for j, (k, name, s) in enumerate(models):
        ax = fig.add_subplot(1, len(models), j + 1)
        table = s["reliability"]
        centres = [(r["lo"] + r["hi"]) / 2 for r in table]
        widths = [r["hi"] - r["lo"] for r in table]
        acc = [r["accuracy"] if r["count"] else 0.0 for r in table]
        conf = [r["confidence"] if r["count"] else 0.0 for r in table]
        ax.bar(centres, acc, width=widths, color=_colour(k), edgecolor="k", lw=0.5, label="accuracy")
        ax.bar(centres, np.array(conf) - np.array(acc), bottom=acc, width=widths, color="none",
               edgecolor="#888888", hatch="//", lw=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        if j == 0:
            ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {_fmt(s.get('ece'))}%", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _ood_models(summaries, raw):
    return [(k, name, raw[name]["ood_scores"]) for k, name in enumerate(summaries)
            if raw.get(name) is not None and raw[name].get("ood_scores")]


def _has_ood(summaries, raw) -> bool:
    return bool(_ood_models(summaries, raw))


def _plot_ood(summaries, raw, path: Path) -> bool:
    models = _ood_models(summaries, raw)
    if not models:
        return False
    fig = _figure(4.0 * len(OOD_SCORES), 3.2 * len(models))
    for i, (k, name, scores) in enumerate(models):
        for j, score in enumerate(OOD_SCORES):
            ax = fig.add_subplot(len(models), len(OOD_SCORES), i * len(OOD_SCORES) + j + 1)
            a, b = np.asarray(scores["in"][score]), np.asarray(scores["out"][score])
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
            if hi <= lo:
                lo, hi = lo - 1, hi + 1
            bins = np.linspace(lo, hi, 51)
            ax.hist(a, bins=bins, density=True, alpha=0.5, color=_colour(k), label="in-distribution")
            ax.hist(b, bins=bins, density=True, alpha=0.5, color="#7f7f7f", label="OOD")
            metrics = _get(summaries[name], ("ood", score)) or {}
            ax.set_title(f"{name}: AUROC {_fmt(metrics.get('auroc'))}, FPR95 {_fmt(metrics.get('fpr95'))}",
                         fontsize=9)
            ax.set_xlabel(_SCORE_LABELS[score], fontsize=8)
            if j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _attack_entries(summaries, attack):
    return [(k, name, summaries[name]["attacks"][attack]) for k, name in enumerate(summaries)
            if isinstance(summaries[name].get("attacks"), Mapping) and summaries[name]["attacks"].get(attack)]


def _has_attacks(summaries) -> bool:
    return bool(_attack_names(summaries))


def _grid(count: int) -> Tuple[int, int]:
    cols = min(count, 4)
    return (count + cols - 1) // cols, cols


def _eps_axis(ax, eps: Sequence[float], norm: str) -> None:
    positive = [e for e in eps if e > 0]
    if positive and max(positive) / min(positive) > 100:  # the L2 grid 0.3 ... 100: zero and decades visible
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(f"eps ({norm}, images in [0, 1])")


def _plot_attacks(summaries, path: Path) -> bool:
    """Accuracy vs eps, one panel per attack, one curve per model (the paper's Fig. 7)."""
    attacks = _attack_names(summaries)
    if not attacks:
        return False
    rows, cols = _grid(len(attacks))
    fig = _figure(4.2 * cols, 3.6 * rows)
    for j, attack in enumerate(attacks):
        ax = fig.add_subplot(rows, cols, j + 1)
        entries = _attack_entries(summaries, attack)
        grid: List[float] = []
        for k, name, e in entries:
            order = np.argsort(e["eps"])
            ax.plot(np.asarray(e["eps"])[order], np.asarray(e["accuracy"], dtype=float)[order], marker="o",
                    ms=3, color=_colour(k), label=name)
            grid += list(e["eps"])
        samples = sorted({int(e["samples"]) for _, _, e in entries})
        _eps_axis(ax, grid, entries[0][2]["norm"])
        ax.set_ylim(-2, 102)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{attack} ({'/'.join(map(str, samples))} images)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _attack_margin_data(summaries, raw):
    out = []
    for attack in _attack_names(summaries):
        series = [(k, name, raw[name]["attack_margins"][attack]) for k, name in enumerate(summaries)
                  if isinstance((raw.get(name) or {}).get("attack_margins"), Mapping)
                  and raw[name]["attack_margins"].get(attack) is not None]
        if series:
            out.append((attack, series))
    return out


def _has_attack_margins(summaries, raw) -> bool:
    return bool(_attack_margin_data(summaries, raw))


def _plot_attack_margins(summaries, raw, path: Path) -> bool:
    """Margin histograms on attacked inputs, per attack at one eps, the models overlaid (the paper's Fig. 8).

    ``raw[name]["attack_margins"][attack] = {"eps": e, "margins": array}``; the eps is in the titles."""
    data = _attack_margin_data(summaries, raw)
    if not data:
        return False
    rows, cols = _grid(len(data))
    fig = _figure(4.4 * cols, 3.6 * rows)
    for j, (attack, series) in enumerate(data):
        ax = fig.add_subplot(rows, cols, j + 1)
        allv = np.concatenate([np.asarray(s["margins"], dtype=float).reshape(-1) for _, _, s in series])
        allv = allv[np.isfinite(allv)]
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (-1.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
        bins = np.linspace(lo, hi, 41)
        eps = sorted({float(s["eps"]) for _, _, s in series})
        for k, name, s in series:
            m = np.asarray(s["margins"], dtype=float).reshape(-1)
            m = m[np.isfinite(m)]
            label = f"{name} (mean {m.mean():.2f})" if m.size else name
            if len(eps) > 1:
                label += f", eps {float(s['eps']):g}"
            ax.hist(m, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=_colour(k), label=label)
            ax.hist(m, bins=bins, density=True, histtype="step", color=_colour(k))
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        norm = (_attack_entries(summaries, attack) or [(0, "", {"norm": ""})])[0][2]["norm"]
        ax.set_title(f"{attack}: margins at {norm} eps {'/'.join(f'{e:g}' for e in eps)}", fontsize=10)
        ax.set_xlabel("margin on attacked input  z_y - max_{k != y} z_k", fontsize=8)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_out_dir(out_dir, flag: str = "--out") -> Path:
    """Check, before any work and creating nothing, that a report can be written into ``out_dir``
    (:func:`encouraging_loss.tools.files.check_writable_dir` with ``create=False``): a read-only folder,
    or something that is not a folder in the way, raises :class:`ReportError` with one line naming
    ``flag``. A full disk is only found when writing; :func:`write_report` then leaves no partial
    file. Returns ``Path(out_dir)``."""
    try:
        return check_writable_dir(out_dir, flag, create=False)
    except FileProblem as err:
        raise ReportError(str(err)) from None


def write_report(summaries: Mapping[str, Mapping], out_dir, *, raw: Optional[Mapping[str, Mapping]] = None,
                 force: bool = False, meta: Optional[Mapping] = None,
                 extra: Optional[Callable[[Dict[str, Path]], Mapping[str, str]]] = None) -> Dict[str, Path]:
    """Write the report of one or more models into ``out_dir``; return ``{key: path}`` of what was written.

    ``summaries``: model name -> :func:`summarize` output (report order);
    ``raw``: model name -> the ``raw`` of :func:`analyze` (for the histograms).
    Files (:data:`REPORT_FILES`): ``report.json`` (``{"models": summaries,
    "meta": meta}``), ``report.md`` (:func:`render_markdown`), and the PNGs
    ``energy_per_class.png`` and ``reliability.png`` (from the summaries),
    ``margins.png`` (histograms of all models overlaid; needs ``raw``) and
    ``ood_scores.png`` (in vs out per model and score; needs ``raw`` with OOD
    scores). With attack results (summaries holding ``attacks``, ``el-analyze --attack``) also
    :data:`ATTACK_REPORT_FILES`: ``attacks.png`` (accuracy vs eps per attack, Fig. 7) and
    ``attack_margins.png`` (needs ``raw[name]["attack_margins"][attack] = {"eps", "margins"}``,
    Fig. 8). A PNG without its data is not written. Existing report files are
    refused (:class:`ReportError`) unless ``force``.

    ``extra``: called with the report's ``{key: path}``, returns more files to write with it
    (``{file name: text}``, e.g. a command's own summary); they are in the returned dict under
    their file names.

    All or nothing: every file is written to a temporary name in ``out_dir`` first and only
    renamed into place when all of them are complete. A failure (a read-only folder, a full
    disk) raises :class:`ReportError` with one line naming the file, and leaves ``out_dir`` as it
    was: no partial file, no 0-byte plot, and with ``force`` the previous report untouched.
    """
    if not summaries:
        raise ReportError("no model to report")
    out = Path(out_dir)
    targets = {key: out / name for key, name in {**REPORT_FILES, **ATTACK_REPORT_FILES}.items()}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise ReportError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    folders = [p for p in targets.values() if p.is_dir()]
    if folders:  # found now, not when the files are renamed into place
        raise ReportError(f"{folders[0]} is a folder, where the report writes a file")
    raw = raw or {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReportError(f"{os.fspath(out)}: exists and is not a folder") from None
    except OSError as err:
        raise ReportError(os_error_line(err, out, "cannot create")) from None
    json_text = json.dumps({"models": summaries, "meta": dict(meta or {})}, indent=2, default=_json_default,
                           allow_nan=False) + "\n"
    written: Dict[str, Path] = {}
    current = out
    try:
        with contextlib.ExitStack() as stack:  # on leaving: every file renamed into place, or every temp removed
            def stage(target: Path) -> Path:
                nonlocal current
                current = target
                return stack.enter_context(atomic_path(target))

            Path(stage(targets["json"])).write_text(json_text, encoding="utf-8")
            written["json"] = targets["json"]
            Path(stage(targets["markdown"])).write_text(render_markdown(summaries), encoding="utf-8")
            written["markdown"] = targets["markdown"]
            for key, has_data, draw in (
                    ("margins", _has_margins(summaries, raw), lambda p: _plot_margins(summaries, raw, p)),
                    ("energy_per_class", _has_energy(summaries), lambda p: _plot_energy(summaries, p)),
                    ("reliability", _has_reliability(summaries), lambda p: _plot_reliability(summaries, p)),
                    ("ood_scores", _has_ood(summaries, raw), lambda p: _plot_ood(summaries, raw, p)),
                    ("attacks", _has_attacks(summaries), lambda p: _plot_attacks(summaries, p)),
                    ("attack_margins", _has_attack_margins(summaries, raw),
                     lambda p: _plot_attack_margins(summaries, raw, p))):
                if has_data:
                    draw(stage(targets[key]))
                    written[key] = targets[key]
            for name, text in dict(extra(dict(written)) if extra else {}).items():
                target = out / name
                Path(stage(target)).write_text(text, encoding="utf-8")
                written[name] = target
            current = out
    except OSError as err:
        raise ReportError(os_error_line(err, current, "cannot write")) from None
    # force: a stale plot must not survive a report without its data
    for key, target in targets.items():
        if key not in written:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    return written
