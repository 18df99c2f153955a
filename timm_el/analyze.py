""" Analyse timm classifiers: margins, energy, calibration, OOD detection, linear probe

``el-analyze`` (also ``python -m timm_el.analyze``) runs one or more timm
checkpoints over an evaluation set (and optionally an out-of-distribution set
and a training split for the probe) and writes the report of
:mod:`encouraging_loss.tools.analysis` -- the measurements behind the argument of
Zhao et al., AAAI 2022 (EL_SPEC sections 2.5 and 5): margins, conditional and
free energy on and off the data, ECE with a reliability diagram, OOD
detection by min conditional energy, max softmax probability and free energy
(AUROC, FPR at 95% TPR) and a linear probe on the frozen features::

    el-analyze runs/mnist/runs/ce-seed1 runs/mnist/runs/el-seed1 --names CE EL \\
        --data-dir data/mnist --ood-data-dir data/fashion-mnist --probe --out analysis/

A **checkpoint** is a run directory of ``timm-el-train`` (``--which last``:
``last.pth.tar``, ``best``: ``model_best.pth.tar``), or a checkpoint file, read
with ``weights_only=True`` (a file whose unpickling would run code is refused).
The model is rebuilt from the flags stored in the training checkpoint (or the
run's ``args.yaml``): a flag missing there takes ``timm-el-train``'s default, a
damaged ``args.yaml`` (not a mapping, not YAML) or a flag of the wrong type is
refused in one line naming the file and the flag; a plain timm checkpoint (a state dict) needs
``--model`` (with ``--num-classes``, ``--in-chans``, ``--img-size``,
``--model-kwargs`` where they differ from the model's defaults). The images
are preprocessed as ``timm-el-train`` validates them (timm's
``resolve_data_config`` and eval transform).

**Data** (``--dataset`` / ``--ood-dataset``): ``idx`` -- a folder holding the
four original MNIST-format files (``t10k-images-idx3-ubyte[.gz]`` ...; MNIST
and Fashion-MNIST alike, read with :func:`timm_el.data.load_mnist`); ``''``
(default) -- such a folder when the files are there, else an ImageFolder
(``DIR/<split>/<class>/*``; for the OOD set ``DIR`` itself when the split
folder is missing); or any of timm's ``create_dataset`` names such as
``torch/mnist`` / ``torch/fashion_mnist`` (torchvision's layout, no download).
``--max-samples N`` evaluates a fixed random subset of each split (seed
``--seed``). Both sets go through the same transform (the model's, as
trained), so the OOD images are scaled and normalised like the in-distribution
ones; an OOD set holding the same images as the evaluated split (e.g.
``--ood-data-dir DATA`` when ``DATA/mnist`` is the one read) is refused.

Output (``--out``; an existing report is refused unless ``--force``):
``report.json``, ``report.md`` (printed too), ``margins.png``,
``energy_per_class.png``, ``reliability.png`` and, with ``--ood-data-dir``,
``ood_scores.png``. A read-only ``--out`` is refused before any model runs; the
report is written all or nothing (a full disk leaves no partial file).

**Attacks** (``--attack fgsm,pgd,pgd_l2,apgd_dlr,apgd_dlr_l2,autoattack,autoattack_l2``; the paper's
section 5.4, Tables 7 and 11, Fig. 7 and 8; EL_SPEC 6): each checkpoint is attacked through
``torchattacks`` (:mod:`timm_el.attacks`) at every epsilon of ``--eps`` (L-infinity; default the paper's
grid 0, 0.05, ..., 0.3) or ``--eps-l2`` (default 0, 0.3, 1, 3, 10, 30, 100), batch by batch with progress
lines, on the evaluated images (``--max-samples``); APGD and AutoAttack, slow on a CPU, on a fixed seeded
subset of them with ``--aa-max-samples``. The attacks see the model's real input range: the images are
read without normalisation (``[0, 1]``) and the model is wrapped in :class:`timm_el.attacks.NormalizedModel`
with its training mean and std, so ``eps`` is in pixel units. Random starts are seeded per batch from
``--seed`` (the same command gives the same numbers). The report gains, per model, ``attacks`` (accuracy %
and mean margin per eps, the images attacked) and ``input_gradient`` (the fraction of clean evaluated
images whose cross-entropy input gradient is exactly zero: gradient masking, under which FGSM / PGD
accuracies are inflated; APGD-DLR and AutoAttack are scale-free), an attacks section in ``report.md``,
``attacks.png`` (accuracy vs eps) and ``attack_margins.png`` (margins on attacked images at ``--margin-eps``,
default each grid's middle value). Finished (attack, eps) results are kept in ``OUT/.attack-cache/`` until
the report is written, so an interrupted run resumes where it stopped.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from encouraging_loss.tools import analysis
from encouraging_loss.tools.cli import Parser
from encouraging_loss.tools.files import FileProblem, atomic_path, load_checkpoint_safely

from . import attacks as el_attacks

__all__ = [
    'AnalyzeError', 'AttackPlan', 'DataSpec', 'IdxDataset', 'ModelSpec', 'attack_plan', 'build_parser',
    'collect_outputs', 'is_idx_dir', 'load_model', 'main', 'open_dataset', 'resolve_checkpoint', 'run',
    'run_attacks', 'same_images',
]

PROG = 'el-analyze'
WHICH = {'last': 'last.pth.tar', 'best': 'model_best.pth.tar'}


class AnalyzeError(ValueError):
    """Bad input (a flag, a checkpoint, a dataset): reported as one line ``el-analyze: error: ...``, exit 2."""


def _one_line(err: BaseException) -> str:
    return ' '.join(str(err).split()) or type(err).__name__


def _say(message: str) -> None:
    sys.stderr.write(f'[{PROG}] {message}\n')
    sys.stderr.flush()


# ----------------------------------------------------------------------------- data


def is_idx_dir(root) -> bool:
    """Whether ``root`` (or ``root/mnist``) holds the MNIST-format test files (idx, gzipped or not)."""
    from .data import MNIST_FILES

    root = Path(root)
    return any((folder / (name + ext)).is_file()
               for folder in (root, root / 'mnist') for name in MNIST_FILES['test'][:1] for ext in ('.gz', ''))


class IdxDataset(torch.utils.data.Dataset):
    """Images and labels of MNIST-format idx files as a map-style dataset of ``(transform(PIL image), label)``.

    ``img_mode`` is the PIL mode the 28x28 grey images are converted to ('L' or 'RGB').
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_mode: str = 'L'):
        self.images, self.labels, self.img_mode = images, labels, img_mode
        self.transform = None
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index], mode='L')
        if self.img_mode != 'L':
            image = image.convert(self.img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def same_images(a, b) -> bool:
    """Whether two datasets of :func:`open_dataset` (no transform set yet) hold the same images: idx arrays
    byte for byte; other datasets the same length and equal first, middle and last images."""
    if isinstance(a, IdxDataset) and isinstance(b, IdxDataset):
        return a.images.shape == b.images.shape and bool(np.array_equal(a.images, b.images))
    try:
        if len(a) != len(b) or len(a) == 0:
            return False
        return all(np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) for i in sorted({0, len(a) // 2,
                                                                                             len(a) - 1}))
    except Exception:  # noqa: BLE001 -- no length, an unreadable image: reported (if at all) when the models run
        return False


@dataclass(frozen=True)
class DataSpec:
    """One dataset split to evaluate: folder, ``--dataset`` kind, split, the flag names for messages."""
    root: str
    dataset: str
    split: str
    flag: str  # e.g. '--data-dir'
    dataset_flag: str  # e.g. '--dataset'
    ood: bool = False


def _dataset_classes(ds) -> Optional[int]:
    class_to_idx = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(ds, 'classes', None)
    return len(classes) if classes else None


def open_dataset(spec: DataSpec, img_mode: str):
    """The dataset of ``spec`` with images in PIL mode ``img_mode`` (its ``transform`` is set later).

    Raises :class:`AnalyzeError` naming the flag when the folder or split cannot be read.
    """
    from .data import load_mnist

    if not os.path.isdir(spec.root):
        raise AnalyzeError(f'{spec.flag}: directory not found: {spec.root!r}')
    kind = spec.dataset
    if kind == '' and is_idx_dir(spec.root):
        kind = 'idx'
    if kind == 'idx':
        split = 'train' if spec.split in ('train', 'training') else 'test'
        try:
            images, labels = load_mnist(spec.root, split)
        except (OSError, ValueError) as err:
            raise AnalyzeError(f'{spec.flag} {spec.root!r} ({spec.dataset_flag} idx, split {split}): '
                               f'{_one_line(err)}') from None
        return IdxDataset(images, labels, img_mode)
    from timm.data import create_dataset

    try:
        ds = create_dataset(kind, root=spec.root, split=spec.split, is_training=False, download=False,
                            input_img_mode=img_mode)
    except Exception as err:  # noqa: BLE001 -- timm and torchvision raise many kinds
        what = f'{spec.dataset_flag} {kind}' if kind else 'ImageFolder'
        raise AnalyzeError(f'{spec.flag} {spec.root!r} ({what}, split {spec.split!r}): {_one_line(err)}') from None
    reader_root = getattr(getattr(ds, 'reader', None), 'root', None)
    if reader_root and not spec.ood and os.path.abspath(reader_root) == os.path.abspath(spec.root) \
            and any(os.path.isdir(os.path.join(spec.root, s)) for s in ('train', 'training')):
        # timm falls back to DIR itself when the split folder is missing: that would mix in the training images
        raise AnalyzeError(f'{spec.flag} {spec.root!r}: no {spec.split!r} split folder (searched validation, val, '
                           f'valid, eval); name it with --split')
    if len(ds) == 0:
        raise AnalyzeError(f'{spec.flag} {spec.root!r}: split {spec.split!r} holds no images')
    if not hasattr(ds, 'reader'):  # a torchvision dataset gives its images as stored: convert like timm
        ds = _ConvertMode(ds, img_mode)
    return ds


class _ConvertMode(torch.utils.data.Dataset):
    """A torchvision dataset whose PIL images are converted to ``img_mode`` before its transform."""

    def __init__(self, base, img_mode: str):
        self.base, self.img_mode, self.transform = base, img_mode, None
        self.classes = getattr(base, 'classes', None)
        self.base.transform = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        if getattr(image, 'mode', self.img_mode) != self.img_mode:
            image = image.convert(self.img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


# ----------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """A model to analyse: its name in the report, checkpoint file, training flags (or None)."""
    name: str
    checkpoint: Path
    train_args: Optional[argparse.Namespace]


def resolve_checkpoint(path: str, which: str) -> Path:
    """The checkpoint file of a CHECKPOINT argument: a file, or ``last``/``best`` of a run directory."""
    p = Path(path)
    if p.is_dir():
        f = p / WHICH[which]
        if not f.is_file():
            raise AnalyzeError(f'CHECKPOINT {path!r}: run directory without {WHICH[which]} (--which {which})')
        return f
    if not p.is_file():
        raise AnalyzeError(f'CHECKPOINT {path!r}: checkpoint not found')
    return p


def _load_file(path: Path) -> dict:
    """A checkpoint file (tensors on the CPU; training checkpoints hold their argparse flags), read with
    ``weights_only=True``: a file whose unpickling would run code is refused, like a damaged one."""
    try:
        return load_checkpoint_safely(path, 'CHECKPOINT', allowed=[argparse.Namespace])
    except FileProblem as err:
        raise AnalyzeError(str(err)) from None


def _is_int(value, lo: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, n: Optional[int] = None) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and (n is None or len(value) == n) \
        and all(_is_number(v) for v in value)


#: the stored training flags el-analyze reads: dest -> (what it must be, the check, the flag that overrides it)
_FIELDS = {
    'model': ('a timm model name', lambda v: isinstance(v, str) and v.strip() != '', '--model'),
    'num_classes': ('an integer >= 1 or null', lambda v: v is None or _is_int(v), '--num-classes'),
    'in_chans': ('an integer >= 1 or null', lambda v: v is None or _is_int(v), '--in-chans'),
    'img_size': ('an integer >= 1 or null', lambda v: v is None or _is_int(v), '--img-size'),
    'input_size': ('null or three integers >= 1 (C H W)',
                   lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_int, v))),
                   None),
    'model_kwargs': ('a mapping of keyword arguments',
                     lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), '--model-kwargs'),
    'drop': ('a number', _is_number, None),
    'drop_path': ('a number or null', lambda v: v is None or _is_number(v), None),
    'drop_block': ('a number or null', lambda v: v is None or _is_number(v), None),
    'gp': ('a pooling name or null', lambda v: v is None or isinstance(v, str), None),
    'mean': ('null or a list of numbers', lambda v: v is None or _numbers(v), None),
    'std': ('null or a list of positive numbers', lambda v: v is None or (_numbers(v) and min(v) > 0), None),
    'crop_pct': ('null or a number > 0', lambda v: v is None or (_is_number(v) and v > 0), None),
    'crop_mode': ('null or a crop mode name', lambda v: v is None or isinstance(v, str), None),
    'interpolation': ('an interpolation name (or empty)', lambda v: v is None or isinstance(v, str), None),
    'loss': ('a loss name or null', lambda v: v is None or isinstance(v, str), None),
}


def _train_args(stored, source: str) -> argparse.Namespace:
    """The training flags of a checkpoint: ``timm-el-train``'s defaults, overlaid with what ``source`` (the
    checkpoint's ``args`` or the run's ``args.yaml``, given as ``stored``) holds.

    A flag missing from ``stored`` takes the training CLI's default (as when the run was trained without
    it), except the model, which must be there. Raises :class:`AnalyzeError` naming ``source`` and the
    flag when one that el-analyze reads has the wrong type.
    """
    from .train import build_parser as train_parser

    values = vars(stored) if isinstance(stored, argparse.Namespace) else stored
    args = train_parser().parse_args([])
    bad_keys = [k for k in values if not (isinstance(k, str) and k.isidentifier())]
    if bad_keys:
        raise AnalyzeError(f'{source}: {bad_keys[0]!r} is not a training flag name')
    for key, value in values.items():
        setattr(args, key, value)
    if 'model' not in values:
        args.model = None
    for dest, (what, ok, flag) in _FIELDS.items():
        value = getattr(args, dest, None)
        if dest == 'model' and value is None:
            continue  # --model may give it; load_model says so otherwise
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + '...'
            hint = f' (give it with {flag})' if flag else ''
            raise AnalyzeError(f'{source}: training flag {dest!r} is {shown}, expected {what}{hint}')
    return args


def _train_args_from_yaml(path: Path) -> Optional[argparse.Namespace]:
    if not path.is_file():
        return None
    from .train import read_flags_yaml

    try:
        cfg = read_flags_yaml(path, str(path))
    except FileProblem as err:
        raise AnalyzeError(str(err)) from None
    return _train_args(cfg, str(path))


def _plain_args(opts) -> argparse.Namespace:
    """Training-CLI flags for a plain timm checkpoint, from ``--model`` and friends."""
    from .train import build_parser as train_parser

    args = train_parser().parse_args(['--model', opts.model])
    args.num_classes, args.in_chans, args.img_size = opts.num_classes, opts.in_chans, opts.img_size
    args.model_kwargs = dict(opts.model_kwargs or {})
    return args


def load_model(spec: ModelSpec, opts, num_classes: Optional[int]) -> Tuple[nn.Module, dict, int]:
    """Build the model of ``spec`` and load its weights (EMA with ``--ema``).

    Returns ``(model in eval mode on the CPU, data config, input channels)``.
    """
    import timm
    from timm.data import resolve_data_config
    from timm.models import clean_state_dict, get_pretrained_cfg

    from .train import UsageError, _create_model, _resolve_in_chans

    checkpoint = _load_file(spec.checkpoint)
    args = spec.train_args
    if args is None:
        if not opts.model:
            raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r}: not a timm-el-train checkpoint (no stored '
                               f'flags, no args.yaml beside it); give the architecture with --model')
        args = _plain_args(opts)
    else:
        args = argparse.Namespace(**vars(args))
        for dest in ('num_classes', 'in_chans', 'img_size'):
            if getattr(opts, dest) is not None:
                setattr(args, dest, getattr(opts, dest))
        if args.model is None:
            if not opts.model:
                raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r}: its stored training flags name no '
                                   f'model; give the architecture with --model')
            args.model = opts.model
        if opts.model and opts.model != args.model:
            raise AnalyzeError(f'--model {opts.model}: CHECKPOINT {str(spec.checkpoint)!r} was trained with '
                               f'--model {args.model}')
    if not timm.is_model(args.model):
        raise AnalyzeError(f'--model: unknown model {args.model!r} (see timm.list_models())')
    args.pretrained, args.initial_checkpoint = False, ''
    for dest, default in (('drop', 0.0), ('drop_path', None), ('drop_block', None), ('gp', None),
                          ('model_kwargs', {})):
        if not hasattr(args, dest):
            setattr(args, dest, default)
    in_chans = _resolve_in_chans(args)

    if isinstance(checkpoint, dict):
        key = next((k for k in (('state_dict_ema', 'model_ema') if opts.ema else ()) if checkpoint.get(k)), None)
        if opts.ema and key is None:
            raise AnalyzeError(f'--ema: CHECKPOINT {str(spec.checkpoint)!r} holds no EMA weights')
        key = key or next((k for k in ('state_dict', 'model') if isinstance(checkpoint.get(k), dict)), None)
        state = checkpoint[key] if key else checkpoint
    else:
        raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r}: holds no state dict')
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r}: holds no state dict')
    state = clean_state_dict(state)
    if args.num_classes is None:  # the rows of the classifier the model's configuration names, else the data's
        try:
            classifier = getattr(get_pretrained_cfg(args.model), 'classifier', None)
        except Exception:  # noqa: BLE001 -- hub models have no local configuration
            classifier = None
        weight = state.get(f'{classifier}.weight') if isinstance(classifier, str) else None
        args.num_classes = int(weight.shape[0]) if getattr(weight, 'dim', lambda: 0)() == 2 else num_classes
    try:
        model = _create_model(args, in_chans, args.num_classes)
    except UsageError as err:
        raise AnalyzeError(str(err)) from None
    try:
        model.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001 -- RuntimeError for a mismatch, others for values that are no tensors
        raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r} does not fit --model {args.model} '
                           f'({_one_line(err)[:300]})') from None
    model.eval()
    try:
        data_config = resolve_data_config({**vars(args), 'in_chans': in_chans}, model=model)
    except Exception as err:  # noqa: BLE001 -- the stored preprocessing flags, checked above; a safety net
        raise AnalyzeError(f'CHECKPOINT {str(spec.checkpoint)!r}: its stored preprocessing flags do not '
                           f'resolve ({_one_line(err)[:300]})') from None
    for key in ('mean', 'std'):  # as timm-el-train: 3-channel statistics for a 1-channel model are averaged
        values = tuple(data_config[key])
        if len(values) != in_chans:
            data_config[key] = (sum(values) / len(values),) * in_chans
    return model, data_config, in_chans


# ----------------------------------------------------------------------------- forward passes


def _subset_indices(n: int, max_samples: Optional[int], seed: int) -> List[int]:
    if not max_samples or max_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_samples].tolist())


@torch.inference_mode()
def collect_outputs(model: nn.Module, dataset, transform, *, device: torch.device, batch_size: int,
                    workers: int = 0, max_samples: Optional[int] = None, seed: int = 0, features: bool = False,
                    label: str = '') -> Dict[str, torch.Tensor]:
    """Logits (and with ``features`` the pre-logits features, timm's ``forward_head(pre_logits=True)``)
    and targets of ``model`` over ``dataset`` (a fixed random subset of ``max_samples``), on the CPU."""
    dataset.transform = transform
    indices = _subset_indices(len(dataset), max_samples, seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    out: Dict[str, List[torch.Tensor]] = {'logits': [], 'target': [], 'features': []}
    done, start, last_report = 0, time.time(), time.time()
    for images, targets in loader:
        images = images.to(device)
        if features:
            feature_map = model.forward_features(images)
            pre = model.forward_head(feature_map, pre_logits=True)
            logits = model.forward_head(feature_map)
            out['features'].append(pre.float().flatten(1).cpu())
        else:
            logits = model(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        out['logits'].append(logits.float().cpu())
        out['target'].append(torch.as_tensor(targets).long())
        done += len(targets)
        if time.time() - last_report > 10 or done == len(indices):
            last_report = time.time()
            _say(f'{label}: {done}/{len(indices)} images ({done / max(time.time() - start, 1e-9):.0f}/s)')
    return {k: torch.cat(v) if v else None for k, v in out.items()}


# ----------------------------------------------------------------------------- attacks

#: the attack flags that need --attack: dest -> flag
_ATTACK_FLAGS = {'eps': '--eps', 'eps_l2': '--eps-l2', 'attack_steps': '--attack-steps',
                 'aa_max_samples': '--aa-max-samples', 'attack_batch_size': '--attack-batch-size',
                 'margin_eps': '--margin-eps'}
#: the attacks that --aa-max-samples limits (slow on a CPU)
_SUBSET_KINDS = ('APGD', 'AutoAttack')
CACHE_DIR = '.attack-cache'


@dataclass(frozen=True)
class AttackPlan:
    """What ``--attack`` and its flags ask for, checked (:func:`attack_plan`)."""
    attacks: Tuple[str, ...]
    eps: Dict[str, Tuple[float, ...]]  # norm -> the grid, sorted
    margin_eps: Dict[str, float]  # norm -> the eps of attack_margins.png
    steps: int
    aa_max_samples: Optional[int]
    batch_size: int
    torchattacks_version: str

    def meta(self) -> dict:
        """The ``meta.attacks`` entry of report.json."""
        used = {el_attacks.ATTACKS[a].norm for a in self.attacks}
        return {'attacks': list(self.attacks), 'eps': {n: list(g) for n, g in self.eps.items() if n in used},
                'margin_eps': {n: e for n, e in self.margin_eps.items() if n in used}, 'steps': self.steps,
                'alpha_fraction': {n: f for n, f in el_attacks.ALPHA_FRACTION.items() if n in used},
                'aa_max_samples': self.aa_max_samples, 'batch_size': self.batch_size,
                'inputs': 'images in [0, 1] (eval transform with mean 0, std 1); the model normalises inside',
                'torchattacks': self.torchattacks_version}


def _eps_grid(text: Optional[str], default: Sequence[float], flag: str) -> Tuple[float, ...]:
    if text is None:
        return tuple(sorted(set(float(e) for e in default)))
    items = [t for t in re.split(r'[,\s]+', text.strip()) if t]
    if not items:
        raise AnalyzeError(f'{flag}: no epsilon given ({text!r}); give a comma-separated list such as 0,0.1,0.3')
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise AnalyzeError(f'{flag}: {item!r} is not a number (a comma-separated list of eps >= 0)') from None
        if not (math.isfinite(value) and value >= 0):
            raise AnalyzeError(f'{flag}: eps must be finite numbers >= 0, got {item}')
        values.append(value)
    return tuple(sorted(set(values)))


def attack_plan(opts) -> Optional[AttackPlan]:
    """The checked attack flags (None without ``--attack``); raises :class:`AnalyzeError` with one line
    naming the flag: an unknown attack (listing the valid ones), an eps that is not a finite number
    ``>= 0``, a ``--margin-eps`` outside its grid, an attack flag without ``--attack``, torchattacks
    missing (saying how to install it)."""
    if opts.attack is None:
        given = [flag for dest, flag in _ATTACK_FLAGS.items() if getattr(opts, dest, None) is not None]
        if given:
            raise AnalyzeError(f'{given[0]} needs --attack (e.g. --attack fgsm,pgd,autoattack)')
        return None
    names = [t for t in re.split(r'[,\s]+', opts.attack.strip()) if t]
    if not names:
        raise AnalyzeError(f'--attack: no attack given; one or more of {",".join(el_attacks.ATTACKS)}')
    unknown = [n for n in names if n not in el_attacks.ATTACKS]
    if unknown:
        raise AnalyzeError(f'--attack: unknown attack {unknown[0]!r} (valid: {", ".join(el_attacks.ATTACKS)})')
    attacks = tuple(dict.fromkeys(names))
    eps = {'Linf': _eps_grid(opts.eps, el_attacks.LINF_EPS, '--eps'),
           'L2': _eps_grid(opts.eps_l2, el_attacks.L2_EPS, '--eps-l2')}
    margin_eps = {norm: grid[len(grid) // 2] for norm, grid in eps.items()}
    if opts.margin_eps is not None:
        used = {el_attacks.ATTACKS[a].norm for a in attacks}
        for norm, value, flag in (('Linf', opts.margin_eps[0], '--eps'), ('L2', opts.margin_eps[1], '--eps-l2')):
            if norm in used and value not in eps[norm]:
                raise AnalyzeError(f'--margin-eps: {value:g} is not in the {norm} grid {flag} '
                                   f'({",".join(f"{e:g}" for e in eps[norm])})')
            margin_eps[norm] = float(value)
    try:
        ta = el_attacks.require_torchattacks()
    except ImportError as err:
        raise AnalyzeError(f'--attack: {err}') from None
    return AttackPlan(attacks=attacks, eps=eps, margin_eps=margin_eps,
                      steps=el_attacks.EVAL_STEPS if opts.attack_steps is None else opts.attack_steps,
                      aa_max_samples=opts.aa_max_samples, batch_size=opts.attack_batch_size or opts.batch_size,
                      torchattacks_version=str(getattr(ta, '__version__', 'unknown')))


class _AttackCache:
    """The finished eps of one (model, attack) on disk, ``OUT/.attack-cache/<model>-<attack>-<key>/``: what
    makes an interrupted ``--attack`` run resume. ``key`` holds everything the numbers depend on (the
    checkpoint file's path, size and time, the data, the images, the attack's settings), so a change makes
    a new folder instead of reusing stale results. Used as the ``cache`` of
    :func:`timm_el.attacks.evaluate_attack` (``get`` and item assignment)."""

    def __init__(self, root: Path, model: str, attack: str, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', model)[:60]
        self.folder = Path(root) / f'{safe}-{attack}-{digest}'

    def _file(self, eps: float) -> Path:
        return self.folder / f'eps-{float(eps)!r}.pt'

    def get(self, eps: float):
        """``(logits, targets)`` of ``eps`` from an earlier run, or None (none, or unreadable)."""
        file = self._file(eps)
        if not file.is_file():
            return None
        try:
            data = load_checkpoint_safely(file, 'attack cache')
            logits, targets = data['logits'], data['targets']
            if isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor) and logits.dim() == 2 \
                    and targets.dim() == 1 and len(logits) == len(targets):
                return logits.float(), targets.long()
        except (FileProblem, KeyError, TypeError):
            pass
        return None  # a damaged file: computed again and replaced

    def __setitem__(self, eps: float, value) -> None:
        logits, targets = value
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._file(eps)) as tmp:
            torch.save({'logits': logits.detach().cpu(), 'targets': targets.detach().cpu()}, tmp)


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {'path': str(path.resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def run_attacks(plan: AttackPlan, name: str, model: nn.Module, data_config: dict, in_chans: int, dataset, *,
                opts, device: torch.device, checkpoint: Optional[Path] = None) -> Tuple[dict, dict, dict]:
    """Attack one model as ``plan`` says (the paper's Tables 7 and 11, Fig. 7 and 8; EL_SPEC 6).

    The images of ``dataset`` go through the eval transform of ``data_config`` with mean 0 and std 1
    (``[0, 1]``); ``model`` is wrapped in :class:`timm_el.attacks.NormalizedModel` with the data config's
    mean and std. The evaluated images are those of ``--max-samples`` (seed ``--seed``, the same as the
    clean analysis); APGD and AutoAttack take a fixed seeded subset of ``--aa-max-samples`` of them.

    Returns ``(attacks, input_gradient, margins)``: ``attacks[attack]`` (:func:`timm_el.attacks.evaluate_attack`'s
    summary), ``input_gradient = {"samples", "zero_fraction"}`` and ``margins[attack] = {"eps", "margins"}``
    at the plan's ``margin_eps`` for ``attack_margins.png``.
    """
    from timm.data import create_transform

    dlr = [a for a in plan.attacks if el_attacks.ATTACKS[a].kind in _SUBSET_KINDS]
    if dlr and model.num_classes < 3:  # the DLR loss compares the three largest logits
        raise ValueError(f'{dlr[0]} needs a model of at least 3 classes (the DLR loss), this one has '
                         f'{model.num_classes}')
    wrapped = el_attacks.NormalizedModel(model, data_config['mean'], data_config['std']).to(device).eval()
    dataset.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=(0.0,) * in_chans, std=(1.0,) * in_chans, crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'))
    indices = _subset_indices(len(dataset), opts.max_samples, opts.seed)
    aa_indices = [indices[i] for i in _subset_indices(len(indices), plan.aa_max_samples, opts.seed)]

    def loader(idx):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=plan.batch_size,
                                           shuffle=False, num_workers=opts.workers)

    n, zero = el_attacks.input_gradient_zero_fraction(wrapped, loader(indices))
    _say(f'{name}: cross-entropy input gradient exactly zero on {zero:.1%} of {n} clean images'
         + (' (gradient masking: FGSM / PGD accuracies may be inflated)' if zero > 0 else ''))
    root = Path(opts.out) / CACHE_DIR
    base_key = {'checkpoint': _file_identity(checkpoint) if checkpoint else None, 'ema': opts.ema,
                'data': [opts.data_dir, opts.dataset, opts.split], 'seed': opts.seed, 'steps': plan.steps,
                'batch_size': plan.batch_size, 'torchattacks': plan.torchattacks_version, 'device': device.type,
                'mean': list(data_config['mean']), 'std': list(data_config['std']),
                'input_size': list(data_config['input_size']), 'crop_pct': data_config['crop_pct'],
                'interpolation': data_config['interpolation']}
    results, margins = {}, {}
    for attack in plan.attacks:
        spec = el_attacks.ATTACKS[attack]
        idx = aa_indices if spec.kind in _SUBSET_KINDS else indices
        grid = plan.eps[spec.norm]
        _say(f'{name}: {attack} ({spec.norm}) on {len(idx)} images, eps {",".join(f"{e:g}" for e in grid)}')
        key = {**base_key, 'attack': attack,
               'images': hashlib.sha256(json.dumps(idx).encode()).hexdigest()}
        cache = _AttackCache(root, name, attack, key) if checkpoint is not None else None
        summary, per_eps = el_attacks.evaluate_attack(
            wrapped, loader(idx), attack, grid, steps=plan.steps, seed=opts.seed, n_classes=model.num_classes,
            total=len(idx), subset=len(idx) < len(dataset), label=f'{name} ', progress=_say, cache=cache)
        results[attack] = summary
        eps = plan.margin_eps[spec.norm]
        margins[attack] = {'eps': eps, 'margins': per_eps[eps]}
    return results, {'samples': n, 'zero_fraction': zero}, margins


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from timm import utils

    parser = Parser(prog=PROG, description=(
        'Margins, conditional/free energy, ECE, OOD detection (AUROC, FPR95 by min conditional energy, max '
        'softmax probability, free energy) and a linear probe of timm classifiers (Zhao et al., AAAI 2022; '
        'EL_SPEC 5). Writes report.json, report.md and PNGs into --out.'))
    parser.add_argument('checkpoints', nargs='+', metavar='CHECKPOINT',
                        help='timm-el-train run directories or checkpoint files')
    parser.add_argument('--names', nargs='+', default=None, metavar='NAME',
                        help='a name per checkpoint in the report (default: the run directory or file name)')
    parser.add_argument('--which', default='last', choices=tuple(WHICH),
                        help='checkpoint of a run directory: last.pth.tar or model_best.pth.tar')
    parser.add_argument('--ema', action='store_true', help='use the EMA weights of the checkpoints')
    group = parser.add_argument_group('data')
    group.add_argument('--data-dir', required=True, metavar='DIR', help='in-distribution dataset')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help="'' (idx files if DIR holds them, else an ImageFolder), idx, or a timm dataset name "
                            'such as torch/mnist')
    group.add_argument('--split', default='validation', help='evaluation split')
    group.add_argument('--ood-data-dir', default=None, metavar='DIR', help='out-of-distribution dataset')
    group.add_argument('--ood-dataset', default='', metavar='NAME', help='as --dataset, for --ood-data-dir')
    group.add_argument('--ood-split', default='validation', help='split of the OOD dataset')
    group.add_argument('--max-samples', type=int, default=None, metavar='N',
                       help='evaluate a fixed random subset of N images of each split (default: all)')
    group = parser.add_argument_group('linear probe')
    group.add_argument('--probe', action='store_true',
                       help='train a fresh linear classifier with CE on the frozen features of --train-split, '
                            'report its accuracy on --split')
    group.add_argument('--train-split', default='train', help='split the probe trains on')
    group.add_argument('--probe-epochs', type=int, default=100, help='probe training epochs')
    group.add_argument('--probe-lr', type=float, default=0.01, help='probe Adam learning rate')
    group = parser.add_argument_group('model (for a plain timm checkpoint; else from the training flags)')
    group.add_argument('--model', default=None, help='timm model name')
    group.add_argument('--num-classes', type=int, default=None, help='classes (default: the checkpoint\'s)')
    group.add_argument('--in-chans', type=int, default=None, help='input channels')
    group.add_argument('--img-size', type=int, default=None, help='image size')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs, metavar='KEY=VALUE',
                       help='more keyword arguments of the model')
    group = parser.add_argument_group('run')
    group.add_argument('--out', default='el-analysis', metavar='DIR', help='report directory')
    group.add_argument('--force', action='store_true', help='overwrite an existing report in --out')
    group.add_argument('-b', '--batch-size', type=int, default=256, help='evaluation batch size')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device')
    group.add_argument('-j', '--workers', type=int, default=0, help='data loading processes')
    group.add_argument('--n-bins', type=int, default=15, help='ECE bins')
    group.add_argument('--seed', type=int, default=0,
                       help='seed of the --max-samples subsets, the probe and the attacks')
    grid = lambda eps: ','.join(f'{e:g}' for e in eps)  # noqa: E731
    group = parser.add_argument_group(
        'attacks (the paper\'s section 5.4, Tables 7 and 11, Fig. 7 and 8; images in [0, 1], eps in pixel units)')
    group.add_argument('--attack', default=None, metavar='LIST',
                       help=f'comma-separated attacks to run on every checkpoint, of: {", ".join(el_attacks.ATTACKS)}')
    group.add_argument('--eps', default=None, metavar='LIST',
                       help=f'L-infinity epsilons, comma-separated (default: the paper\'s grid '
                            f'{grid(el_attacks.LINF_EPS)})')
    group.add_argument('--eps-l2', default=None, metavar='LIST',
                       help=f'L2 epsilons, comma-separated (default: the paper\'s grid {grid(el_attacks.L2_EPS)})')
    group.add_argument('--attack-steps', type=int, default=None, metavar='N',
                       help=f'steps of PGD, PGD-L2 and APGD (default: {el_attacks.EVAL_STEPS}; step size eps/4 '
                            f'L-infinity, eps/5 L2)')
    group.add_argument('--aa-max-samples', type=int, default=None, metavar='N',
                       help='run AutoAttack and APGD on a fixed seeded subset of N of the evaluated images (they '
                            'are slow on a CPU; default: all of them)')
    group.add_argument('--attack-batch-size', type=int, default=None, metavar='N',
                       help='images per attacked batch (default: --batch-size)')
    group.add_argument('--margin-eps', type=float, nargs=2, default=None, metavar=('LINF', 'L2'),
                       help='the eps of the margin histograms of attack_margins.png, one of --eps and one of '
                            '--eps-l2 (default: the middle value of each grid)')
    return parser


def _check(opts) -> None:
    for dest, lo in (('batch_size', 1), ('workers', 0), ('n_bins', 1), ('probe_epochs', 1), ('seed', 0),
                     ('max_samples', 1), ('num_classes', 1), ('in_chans', 1), ('img_size', 1),
                     ('attack_steps', 1), ('aa_max_samples', 1), ('attack_batch_size', 1)):
        value = getattr(opts, dest)
        if value is not None and value < lo:
            raise AnalyzeError(f'--{dest.replace("_", "-")} must be an integer >= {lo}, got {value}')
    if not (math.isfinite(opts.probe_lr) and opts.probe_lr > 0):
        raise AnalyzeError(f'--probe-lr must be a number > 0, got {opts.probe_lr}')
    if opts.names is not None:
        if len(opts.names) != len(opts.checkpoints):
            raise AnalyzeError(f'--names: {len(opts.names)} name(s) for {len(opts.checkpoints)} checkpoint(s)')
    for flag, path in (('--data-dir', opts.data_dir), ('--ood-data-dir', opts.ood_data_dir)):
        if path is not None and not os.path.isdir(path):
            raise AnalyzeError(f'{flag}: directory not found: {path!r}')
    if opts.ood_data_dir is None and opts.ood_dataset:
        raise AnalyzeError('--ood-dataset needs --ood-data-dir')
    try:
        device = torch.device(opts.device)
    except (RuntimeError, ValueError, TypeError):
        raise AnalyzeError(f'--device: not a device: {opts.device!r}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise AnalyzeError(f'--device {opts.device}: CUDA is not available (use --device cpu)')
    existing = [str(Path(opts.out) / f) for f in {**analysis.REPORT_FILES, **analysis.ATTACK_REPORT_FILES}.values()
                if (Path(opts.out) / f).exists()]
    if existing and not opts.force:
        raise AnalyzeError(f'--out {opts.out!r}: a report exists ({existing[0]}); use --force to overwrite it')
    try:  # a read-only --out fails now, not after the forward passes (creates nothing)
        analysis.check_out_dir(opts.out, '--out')
    except analysis.ReportError as err:
        raise AnalyzeError(str(err)) from None


def _model_specs(opts) -> List[ModelSpec]:
    specs, names = [], []
    for k, path in enumerate(opts.checkpoints):
        file = resolve_checkpoint(path, opts.which)
        run_dir = Path(path) if Path(path).is_dir() else file.parent
        name = opts.names[k] if opts.names else (Path(path).name if Path(path).is_dir() else file.stem)
        if name in names:
            raise AnalyzeError(f'--names: {name!r} twice; give each checkpoint its own name with --names')
        names.append(name)
        checkpoint = _load_file(file)
        stored = checkpoint.get('args') if isinstance(checkpoint, dict) else None
        if isinstance(stored, argparse.Namespace):
            args = _train_args(stored, f'CHECKPOINT {str(file)!r}')
        else:
            args = _train_args_from_yaml(run_dir / 'args.yaml')
        specs.append(ModelSpec(name=name, checkpoint=file, train_args=args))
    return specs


def run(opts) -> Dict[str, Path]:
    """Analyse every checkpoint and write the report; returns the files written."""
    from timm.data import create_transform

    _check(opts)
    plan = attack_plan(opts)
    specs = _model_specs(opts)
    device = torch.device(opts.device)
    data = DataSpec(opts.data_dir, opts.dataset, opts.split, '--data-dir', '--dataset')
    ood = DataSpec(opts.ood_data_dir, opts.ood_dataset, opts.ood_split, '--ood-data-dir', '--ood-dataset',
                   ood=True) if opts.ood_data_dir else None
    train = DataSpec(opts.data_dir, opts.dataset, opts.train_split, '--data-dir', '--dataset') if opts.probe else None
    datasets: Dict[Tuple[DataSpec, str], object] = {}

    def dataset(spec: DataSpec, img_mode: str):
        if (spec, img_mode) not in datasets:
            datasets[(spec, img_mode)] = open_dataset(spec, img_mode)
        return datasets[(spec, img_mode)]

    # every dataset opens before any model runs: a bad folder fails at once
    for spec in (data, ood, train):
        if spec is not None:
            dataset(spec, 'L')
    if ood is not None and same_images(dataset(data, 'L'), dataset(ood, 'L')):
        # e.g. --ood-data-dir DATA with DATA/mnist and DATA/fashion-mnist: the idx reader falls back to DATA/mnist
        raise AnalyzeError(f'--ood-data-dir {opts.ood_data_dir!r}: holds the same {len(dataset(ood, "L"))} images '
                           f'as --data-dir {opts.data_dir!r} (split {opts.split!r}), so OOD detection would be at '
                           f'chance; give the OOD dataset\'s own folder (a folder without idx files is read '
                           f'through its mnist/ subfolder)')
    data_classes = _dataset_classes(dataset(data, 'L'))

    summaries, raws, meta_models = {}, {}, {}
    for spec in specs:
        model, data_config, in_chans = load_model(spec, opts, data_classes)
        if data_classes and model.num_classes < data_classes:
            raise AnalyzeError(f'--data-dir {opts.data_dir!r} has {data_classes} classes but {spec.name} '
                               f'predicts {model.num_classes}')
        model.to(device)
        img_mode = 'L' if in_chans == 1 else 'RGB'
        transform = create_transform(
            data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
            mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode'))
        common = dict(device=device, batch_size=opts.batch_size, workers=opts.workers,
                      max_samples=opts.max_samples, seed=opts.seed)
        _say(f'{spec.name}: {spec.checkpoint} ({model.__class__.__name__}, {model.num_classes} classes)')
        ind = collect_outputs(model, dataset(data, img_mode), transform, features=opts.probe,
                              label=f'{spec.name} {opts.split}', **common)
        if int(ind['target'].max()) >= model.num_classes:
            raise AnalyzeError(f'--data-dir {opts.data_dir!r} has labels up to {int(ind["target"].max())} but '
                               f'{spec.name} predicts {model.num_classes} classes')
        ood_logits = None
        if ood is not None:
            ood_logits = collect_outputs(model, dataset(ood, img_mode), transform,
                                         label=f'{spec.name} OOD {opts.ood_split}', **common)['logits']
        probe = None
        if opts.probe:
            tr = collect_outputs(model, dataset(train, img_mode), transform, features=True,
                                 label=f'{spec.name} probe {opts.train_split}', **common)
            probe = (tr['features'], tr['target'])
            _say(f'{spec.name}: training the linear probe on {len(tr["target"])} frozen features')
        summary, raw = analysis.analyze(
            ind['logits'], ind['target'], ood_logits=ood_logits, features=ind['features'], probe=probe,
            n_bins=opts.n_bins, probe_kwargs=dict(epochs=opts.probe_epochs, lr=opts.probe_lr, seed=opts.seed))
        if plan is not None:
            try:
                summary['attacks'], summary['input_gradient'], raw['attack_margins'] = run_attacks(
                    plan, spec.name, model, data_config, in_chans, dataset(data, img_mode), opts=opts,
                    device=device, checkpoint=spec.checkpoint)
            except ValueError as err:  # e.g. images outside [0, 1] from an unusual eval transform
                raise AnalyzeError(f'--attack ({spec.name}): {_one_line(err)}') from None
        summaries[spec.name], raws[spec.name] = summary, raw
        meta_models[spec.name] = {'checkpoint': str(spec.checkpoint), 'model': getattr(spec.train_args, 'model',
                                                                                      opts.model),
                                  'loss': getattr(spec.train_args, 'loss', None), 'ema': opts.ema}
        model.to('cpu')
    meta = {
        'models': meta_models,
        'data': {'dir': opts.data_dir, 'dataset': opts.dataset, 'split': opts.split},
        'ood': {'dir': opts.ood_data_dir, 'dataset': opts.ood_dataset, 'split': opts.ood_split} if ood else None,
        'probe': {'split': opts.train_split, 'epochs': opts.probe_epochs, 'lr': opts.probe_lr} if opts.probe else None,
        'max_samples': opts.max_samples, 'seed': opts.seed, 'n_bins': opts.n_bins,
    }
    if plan is not None:
        meta['attacks'] = plan.meta()
    try:
        written = analysis.write_report(summaries, opts.out, raw=raws, force=opts.force, meta=meta)
    except analysis.ReportError as err:
        raise AnalyzeError(f'--out {opts.out!r}: {err}') from None
    if plan is not None:  # the report holds the results now: the resume cache is done with
        shutil.rmtree(Path(opts.out) / CACHE_DIR, ignore_errors=True)
    sys.stdout.write(analysis.render_markdown(summaries))
    sys.stdout.flush()
    for path in written.values():
        _say(f'wrote {path}')
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``el-analyze`` / ``python -m timm_el.analyze``; bad input exits 2 with one line."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    logging.getLogger('timm').setLevel(logging.WARNING)
    try:
        run(opts)
    except AnalyzeError as err:
        parser.error(str(err))
    return 0


if __name__ == '__main__':
    sys.exit(main())
