""" Train a timm image classifier with the Encouraging Loss (or cross-entropy)

``timm-el-train`` (also ``python -m timm_el.train``): the training command of
the image recipes of "Well-Classified Examples are Underestimated in
Classification with Deep Neural Networks" (Zhao et al., AAAI 2022; EL_SPEC
section 4). It is written on timm's public API (``create_model``,
``create_dataset``, ``create_loader``, ``resolve_data_config``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup`` /
``FastCollateMixup``, ``ModelEmaV3``, ``CheckpointSaver``, ...) and keeps the
names and meanings of timm's ``train.py`` flags for everything the paper's
recipes use, plus ``--loss {ce,encouraging}`` and the Encouraging Loss flags (and the paper's
companion losses, ``--loss {focal,halted_focal,mse,mse_sigmoid}``, EL_SPEC 2.5)::

    timm-el-train /data/imagenet --model resnet50 --loss encouraging --log-end 0.75 \\
        --opt momentum --lr 0.1 --weight-decay 1e-4 -b 256 --epochs 90 \\
        --sched step --decay-epochs 30 --decay-rate 0.1 --warmup-epochs 0
    torchrun --nproc_per_node 2 -m timm_el.train /data/imagenet --model efficientnet_b0 ...

``--loss ce`` trains with timm's own criterion (``CrossEntropyLoss``,
``LabelSmoothingCrossEntropy`` or ``SoftTargetCrossEntropy``, as timm's factory
chooses); ``--loss encouraging`` with the Encouraging Loss through timm's
``create_classification_loss(loss_type='encouraging', ...)`` hook (``timm_el``);
the companion losses come through the same hook (``--focal-gamma``,
``--halt-point``, ``--mirror-rho``, ``--mirror-gamma``).
Validation always uses plain cross-entropy, top-1 and top-5.

A run writes into a fresh directory ``--output/--experiment`` (a suffix
``-1``, ``-2``, ... is added when it exists; ``--resume`` continues in the
directory of the checkpoint instead)::

    args.yaml           the flags of the run (usable as --config)
    log.txt             the log
    summary.csv         epoch, train_loss, eval_loss, eval_top1, eval_top5[, eval_many, eval_medium, eval_few]
                        [, eval_ema_loss, eval_ema_top1, eval_ema_top5[, eval_ema_many, ...]], lr -- epochs
                        numbered from 0, like timm; the shot groups with long-tailed data (below)
    last.pth.tar        training checkpoints (named as timm's CheckpointSaver names them): the last epoch,
    model_best.pth.tar  the best epoch by --eval-metric of the model (not the EMA),
    checkpoint-E.pth.tar  and the --checkpoint-hist best epochs
    eval/last.json, eval/best.json[, eval/last_ema.json, eval/best_ema.json]
                        el-result/1 records for ``python -m encouraging_loss.tools.results``

Every file but the log is written atomically (a temporary file renamed into
place): a kill or a full disk leaves the previous version whole, and the run
stops with one line ``timm-el-train: error: cannot write PATH: REASON``. The
checkpoint history is the run directory's own ``checkpoint-E.pth.tar`` files;
nothing outside the run directory is ever written or deleted.

``--resume RUN/last.pth.tar`` continues after the last finished epoch (an
epoch cut short is trained again from its start; there are no mid-epoch
checkpoints). The checkpoints hold the random number generators (python,
numpy, torch, CUDA) of every process as they are at the start of the next
epoch, so on the CPU a run killed at any point and resumed with the same
flags, data and versions ends bit-identical to an uninterrupted one; on CUDA
it is as deterministic as the kernels are. Loader workers are started afresh
each epoch for this (their seeds come from the restored generators).

Checkpoints given to ``--resume`` and ``--initial-checkpoint`` are read with
``weights_only=True`` first: a file whose unpickling would run code is
refused. Unreadable images: in the validation split the run stops naming the
file; in the training split each is skipped (the next image takes its place,
as in timm), named once in the log, and counted per epoch in the log and in
the records' ``info.skipped_train_images``.

``--adv-train {fgsm,pgd,pgd_l2}`` (with ``--adv-eps``, ``--adv-steps``,
``--adv-alpha``) is the adversarial training of the paper's Table 7 (EL_SPEC 6),
as TorchAttacks' MNIST adversarial-training demo: every training batch is
attacked (torchattacks, the model in eval mode) and the loss, whatever
``--loss``, is computed on the attacked batch only; see :class:`AdversarialBatches`.

Long-tailed data (EL_SPEC 6, Table 3 / 9; :mod:`timm_el.rebalance`): ``--drw-epoch E`` (``--drw-beta``)
weighs the training loss, whatever ``--loss``, by Cao et al.'s class-balanced weights from epoch E on (DRW);
``--crt-from RUN`` is Kang et al.'s classifier re-training, a second stage in a run directory of its own
(the classifier re-initialised, everything else frozen, class-balanced batches); validation adds the
many / medium / few-shot accuracies (``--shot-thresholds``) with long-tailed training data or ``--shot-groups``.

Several GPUs or machines: start it with ``torchrun`` (DDP; NCCL on CUDA, gloo
on CPU, ranks from the RANK / WORLD_SIZE / LOCAL_RANK variables); only rank 0
writes files. Bad flag values stop it before any work with one line
``timm-el-train: error: ...`` naming the flag (exit status 2).
"""
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import timm.loss
import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import (
    FastCollateMixup,
    ImageDataset,
    Mixup,
    create_dataset,
    create_loader,
    create_transform,
    resolve_data_config,
)
from timm.models import create_model, get_pretrained_cfg, load_checkpoint, model_parameters, resume_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch.nn.parallel import DistributedDataParallel as NativeDDP

from encouraging_loss.bonus import bonus_rho_at
from encouraging_loss.tools.analysis import shot_accuracy, shot_groups
from encouraging_loss.tools.files import FileProblem

from .attacks import ATTACKS, NormalizedModel, make_attack
from .checkpoints import (
    _kill_point,
    _restore_rng,
    _restore_scheduler,
    _resume_state,
    _rng_states,
    _RunSaver,
    _scheduler_state,
)
from .data import CheckedImageDataset, ImageReadError, image_problem
from .factory import COMPANION_KWARGS, EL_KWARGS, LOSS_TYPE
from .longtail import (
    class_counts,
    dataset_labels,
    describe_profile,
    is_longtail_dataset,
    long_tail_subset,
    longtail_dataset,
)
from .rebalance import (
    SHOT_GROUPS,
    ClassBalancedSampler,
    DeferredReweighting,
    gather_predictions,
    load_crt_source,
    prepare_crt_model,
    with_sampler,
)
from .run_files import (
    DIGEST_ENV,
    _add_log_file,
    _append_summary,
    _check_writable,
    _remove_stale_temporaries,
    _restore_text,
    _run_dir,
    _trim_summary,
    _write_digest,
    _write_text,
    read_summary,
    state_digest,
    write_result_records,
)
from .train_args import (
    ADV_FLAGS,
    EL_DEFAULTS,
    PROG,
    SHOT_THRESHOLDS,
    UsageError,
    _one_line,
    _read_checkpoint,
    _yaml_safe,
    build_parser,
    check_args,
    parse_args,
    read_flags_yaml,
)

__all__ = [
    'AdversarialBatches',
    'DIGEST_ENV',
    'EL_DEFAULTS',
    'UsageError',
    'bonus_weight',
    'build_parser',
    'check_args',
    'create_train_loss',
    'main',
    'parse_args',
    'read_flags_yaml',
    'read_summary',
    'state_digest',
    'train_one_epoch',
    'validate',
    'write_result_records',
]

_logger = logging.getLogger('timm_el.train')
_logging_ready = False


def _setup_logging() -> None:
    """timm's console logging, set up once per process."""
    global _logging_ready
    if not _logging_ready:
        utils.setup_default_logging()
        _logging_ready = True


# ----------------------------------------------------------------------------- loss


def create_train_loss(args, mixup_active: bool) -> nn.Module:
    """The training criterion, from timm's ``create_classification_loss``.

    ``--loss ce``: timm's choice (``SoftTargetCrossEntropy`` with Mixup/CutMix,
    ``LabelSmoothingCrossEntropy`` with ``--smoothing``, else
    ``CrossEntropyLoss``). ``--loss encouraging``: the Encouraging Loss
    (Zhao et al., AAAI 2022, EL_SPEC section 2) through the
    ``loss_type='encouraging'`` hook, ``EncouragingSoftTargetLoss`` with
    Mixup/CutMix, else ``EncouragingLabelSmoothingLoss``. ``--loss focal``,
    ``halted_focal``, ``mse``, ``mse_sigmoid``: the paper's companion losses
    (EL_SPEC 2.5, ``encouraging_loss.companion``) through the same hook.

    With ``--drw-epoch`` (DRW, Cao et al. 2019) the loss must take class weights (its ``weight`` attribute,
    set at the epoch by :class:`~timm_el.rebalance.DeferredReweighting`): ``--loss ce`` is then
    ``nn.CrossEntropyLoss(label_smoothing=--smoothing)`` (no smoothing with Mixup/CutMix's soft targets, as
    timm), the same numbers as timm's criteria while unweighted.
    """
    kwargs = dict(smoothing=args.smoothing, soft_targets=mixup_active)
    if args.loss == 'ce' and getattr(args, 'drw_epoch', None) is not None:
        return nn.CrossEntropyLoss(label_smoothing=0. if mixup_active else args.smoothing)
    if args.loss == 'encouraging':
        kwargs.update(loss_type=LOSS_TYPE, **{name: getattr(args, name) for name in EL_KWARGS})
    elif args.loss in COMPANION_KWARGS:
        kwargs.update(loss_type=args.loss, **{name: getattr(args, name) for name in COMPANION_KWARGS[args.loss]})
    else:
        kwargs.update(loss_type='ce')
    # looked up through the module: the hook timm_el installed
    return timm.loss.create_classification_loss(**kwargs)


def bonus_weight(args, epoch: int) -> float:
    """The bonus weight during ``epoch`` (0-based, as timm counts): ``--bonus-rho`` ramped by
    ``--bonus-schedule`` over ``--epochs``, 0 during the first ``--defer-start`` epochs
    (EL_SPEC 2.1, ``encouraging_loss.bonus.bonus_rho_at``)."""
    return bonus_rho_at(args.bonus_rho, epoch + 1, defer_start=args.defer_start, schedule=args.bonus_schedule,
                        max_epoch=args.epochs, exp_rate=args.bonus_schedule_rate)


# ----------------------------------------------------------------------------- data and model


def _resolve_in_chans(args) -> int:
    """Input channels: ``--in-chans``, else ``--input-size``'s C, else the model's default, else 3."""
    if args.in_chans is not None:
        return int(args.in_chans)
    if args.input_size is not None:
        return int(args.input_size[0])
    try:
        cfg = get_pretrained_cfg(args.model)
    except Exception:  # noqa: BLE001 -- hub models have no local configuration
        cfg = None
    size = getattr(cfg, 'input_size', None) if cfg is not None else None
    return int(size[0]) if size else 3


def _dataset_classes(dataset) -> Optional[List[str]]:
    """The class names of a timm or torchvision dataset in index order, when it tells them."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) \
        or getattr(dataset, 'class_to_idx', None)
    if class_to_idx:
        return [c for c, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
    classes = getattr(dataset, 'classes', None)
    return list(classes) if classes else None


def _long_tail_train(args, train, classes: Optional[List[str]]):
    """The training split as it trains: ``--long-tail-ratio``'s subset of it (:mod:`timm_el.longtail`, Cao et
    al.'s exponential profile, EL_SPEC 6), its class profile logged in one line (also for ``--dataset inat2018``
    / ``imagenet_lt``); the split itself otherwise."""
    longtail = is_longtail_dataset(args.dataset)
    if args.long_tail_ratio is None and not longtail:
        return train
    try:
        labels = dataset_labels(train)
    except TypeError as err:
        if args.long_tail_ratio is None:
            return train
        raise UsageError(f'--long-tail-ratio {args.long_tail_ratio:g}: {_one_line(err)}') from None
    num_classes = len(classes) if classes else int(labels.max()) + 1 if labels.size else 0
    primary = getattr(args, 'rank', 0) == 0
    if args.long_tail_ratio is None:
        if primary:
            counts = class_counts(train, num_classes)
            _logger.info(f'Training split {args.train_split!r}: {describe_profile(counts, classes)}.')
        return train
    try:
        subset, quotas, kept, clipped = long_tail_subset(
            train, args.long_tail_ratio, num_classes, n_max=args.long_tail_max, seed=args.long_tail_seed,
            classes=classes)
    except ValueError as err:
        raise UsageError(_one_line(err)) from None
    if primary:
        _logger.info(f'Long-tailed training split {args.train_split!r} (--long-tail-ratio {args.long_tail_ratio:g}, '
                     f'n_max {quotas[0]}, --long-tail-seed {args.long_tail_seed}; {len(labels)} images before): '
                     f'{describe_profile(kept, classes)}.')
        if clipped:
            shown = ', '.join(f"{repr(classes[c]) if classes else f'#{c}'} {a} of {q}" for c, q, a in clipped[:5])
            _logger.warning(f'--long-tail-ratio: {len(clipped)} class(es) have fewer training images than the '
                            f'profile asks; all of theirs are kept: {shown}{", ..." if len(clipped) > 5 else ""}.')
    return subset


def _create_datasets(args, in_chans: int):
    """The training and validation datasets (``UsageError`` naming the flags when one cannot be made)."""
    img_mode = args.input_img_mode or ('RGB' if in_chans == 3 else 'L' if in_chans == 1 else None)
    datasets = []
    for split, is_training in ((args.train_split, True), (args.val_split, False)):
        try:
            if is_longtail_dataset(args.dataset):  # iNaturalist 2018, ImageNet-LT (timm_el.longtail)
                datasets.append(longtail_dataset(args.dataset, args.data_dir, split, img_mode=img_mode,
                                                 train=datasets[0] if datasets else None))
                continue
            datasets.append(create_dataset(
                args.dataset, root=args.data_dir, split=split, is_training=is_training,
                class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size,
                seed=args.seed, input_img_mode=img_mode))
        except Exception as err:  # noqa: BLE001 -- timm and torchvision raise many kinds
            what = f'--dataset {args.dataset}' if args.dataset else 'ImageFolder'
            raise UsageError(f'{what} in {args.data_dir!r}, split {split!r}: {_one_line(err)}') from None
    train, val = datasets
    train_root, val_root = (getattr(getattr(ds, 'reader', None), 'root', None) for ds in datasets)
    if train_root and val_root and not is_longtail_dataset(args.dataset):  # timm falls back to DIR itself when a
        # split folder is missing
        train_root, val_root = os.path.abspath(train_root), os.path.abspath(val_root)
        if os.path.commonpath([train_root, val_root]) == val_root:
            raise UsageError(f'--val-split {args.val_split!r}: no such folder in {args.data_dir!r}; the validation '
                             f'images would include the training images of --train-split {args.train_split!r}')
    if not hasattr(train, 'reader'):  # a torchvision dataset gives its images as stored
        mode = getattr(train[0][0], 'mode', None)
        channels = {'L': 1, 'RGB': 3}.get(mode)
        if channels is not None and channels != in_chans:
            raise UsageError(f'--dataset {args.dataset} holds {channels}-channel ({mode}) images but the model takes '
                             f'{in_chans} (--in-chans {channels} or a {channels}-channel model)')
    train_classes, val_classes = _dataset_classes(train), _dataset_classes(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise UsageError(f'--val-split {args.val_split!r} has classes {val_classes[:5]}... unlike --train-split '
                         f'{args.train_split!r} ({train_classes[:5]}...): labels would not match')
    if train_classes is not None and len(train_classes) < 2:
        what = f'--dataset {args.dataset}' if args.dataset else 'ImageFolder'
        found = f'only the class {train_classes[0]!r}' if train_classes else 'no classes'
        raise UsageError(f'{what} in {args.data_dir!r}, split {args.train_split!r}: {found}; a classifier needs at '
                         f'least 2 (every prediction would be right)')
    train = _long_tail_train(args, train, train_classes)
    # unreadable images: validation stops naming the file, training skips and counts them (timm.data.ImageDataset
    # would quietly put the next image, and its label, in their place)
    if type(train) is ImageDataset:
        train = CheckedImageDataset.wrap(train, strict=False, what=f'--train-split {args.train_split!r}')
    if type(val) is ImageDataset:
        val = CheckedImageDataset.wrap(val, strict=True, what=f'--val-split {args.val_split!r}')
    return train, val, train_classes


def _create_model(args, in_chans: int, num_classes: Optional[int]) -> nn.Module:
    """``timm.create_model`` with the model flags (``UsageError`` if the model refuses them)."""
    try:
        return create_model(
            args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
            global_pool=args.gp, checkpoint_path=args.initial_checkpoint or None, **args.model_kwargs)
    except Exception as err:  # noqa: BLE001 -- model constructors raise many kinds
        raise UsageError(f'--model {args.model}: {_one_line(err)}') from None


def _create_loaders(args, dataset_train, dataset_eval, data_config, num_classes: int, device):
    """The training loader (with Mixup/CutMix) and the validation loader; also the batch
    Mixup function when the prefetcher is off."""
    mixup_fn = collate_fn = None
    if args.mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    if args.aa:
        try:
            create_transform(data_config['input_size'], is_training=True, auto_augment=args.aa)
        except Exception as err:  # noqa: BLE001
            raise UsageError(f'--aa {args.aa!r}: {_one_line(err)}') from None
    # workers are started afresh each epoch (not timm's persistent workers): their random seeds then come from
    # the torch RNG at each epoch's start, which the checkpoints hold, so that --resume repeats the epochs exactly
    common = dict(
        input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=args.prefetcher, persistent_workers=False)
    if args.workers > 0:
        for dataset in (dataset_train, dataset_eval):
            if isinstance(dataset, CheckedImageDataset):
                dataset.share_counts()
    train_interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=train_interpolation, collate_fn=collate_fn, **common)
    loader_eval = create_loader(
        dataset_eval, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    if len(loader_train) == 0:
        raise UsageError(f'--batch-size {args.batch_size} is larger than the {len(dataset_train)} training '
                         f'images (per process: {len(dataset_train) // args.world_size})')
    return loader_train, loader_eval, mixup_fn


def _resolve_lr(args) -> None:
    """``--lr`` from ``--lr-base`` and the global batch size when it is not set (as timm)."""
    if args.lr:
        return
    global_batch_size = args.batch_size * args.world_size
    ratio = global_batch_size / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    _logger.info(f'Learning rate {args.lr:g} from --lr-base {args.lr_base:g} and the global batch size '
                 f'{global_batch_size} ({scale} scaling).')


# ----------------------------------------------------------------------------- adversarial training


class AdversarialBatches:
    """The adversarial examples of adversarial training (the paper's Table 7, EL_SPEC 6; ``--adv-train``).

    As TorchAttacks' "Adversarial Training (MNIST)" demo: each training batch is replaced by its attacked
    version, generated on the current weights. The loader's batches are normalised (``(x - mean) / std``,
    timm's prefetcher or not), the attacks work on images in ``[0, 1]``: a batch is un-normalised with the
    data config's ``mean`` / ``std``, clamped to ``[0, 1]`` (random erasing, say, leaves values outside),
    attacked through :class:`~timm_el.attacks.NormalizedModel` (``eps`` in pixel units) and normalised
    again. The attack (:func:`~timm_el.attacks.make_attack`) holds the model itself, not a copy: every call
    attacks the weights of that moment. torchattacks puts the model in eval mode while it attacks
    (BatchNorm statistics and dropout as at test time); the call leaves the model in the mode it found.
    The attack's input gradients never touch the parameters' ``.grad``. PGD's random start draws from
    torch's global generator (which the checkpoints restore: resumed runs repeat the same attacks).

    Args:
        name: an attack of :data:`~timm_el.attacks.TRAIN_DEFAULTS` (``fgsm``, ``pgd``, ``pgd_l2``).
        model: the model being trained (not a DDP wrapper: each process attacks its own batch).
        mean, std: the normalisation of the loader's batches (per channel, or one value for all).
        eps, steps, alpha: the attack's radius, steps and step size (``make_attack``'s defaults when None).
    """

    def __init__(self, name: str, model: nn.Module, mean: Sequence[float], std: Sequence[float], eps: float,
                 steps: Optional[int] = None, alpha: Optional[float] = None):
        self.name, self.eps, self.steps, self.alpha = name, float(eps), steps, alpha
        self.model = model
        device = next(model.parameters()).device
        wrapped = NormalizedModel(model, mean, std).to(device)
        self.mean, self.std = wrapped.mean, wrapped.std
        self.attack = make_attack(name, wrapped, eps, steps=steps, alpha=alpha)

    def describe(self) -> str:
        """One line: ``Adversarial training: PGD eps 0.3, 7 steps, alpha 0.1 (torchattacks)``."""
        spec = ATTACKS[self.name]
        how = f', {self.steps} steps, alpha {self.alpha:g}' if spec.iterative else ''
        return f'Adversarial training: {spec.kind} eps {self.eps:g}{how} (torchattacks)'

    def to_pixels(self, input: torch.Tensor) -> torch.Tensor:
        """Normalised images -> images in ``[0, 1]`` (clamped), float32, detached."""
        return (input.detach().float() * self.std + self.mean).clamp_(0, 1)

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The attacked version of the normalised batch ``input`` (labels ``target``), normalised the same way,
        in ``input``'s dtype."""
        training = self.model.training
        adv = self.attack(self.to_pixels(input), target)
        self.model.train(training)
        return ((adv - self.mean) / self.std).to(input.dtype)


def _adversarial_batches(args, model: nn.Module, data_config: dict) -> Optional[AdversarialBatches]:
    """The ``--adv-train`` examples of a run (None without it)."""
    if not args.adv_train:
        return None
    return AdversarialBatches(args.adv_train, model, data_config['mean'], data_config['std'], args.adv_eps,
                              steps=args.adv_steps, alpha=args.adv_alpha)


# ----------------------------------------------------------------------------- train / validate


def _mean_over_ranks(value: float, args, device) -> float:
    """The mean of a number over the processes (the number itself when not distributed)."""
    if not args.distributed:
        return value
    return utils.reduce_tensor(torch.tensor([value], device=device, dtype=torch.float64), args.world_size).item()


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args,
        device: torch.device,
        lr_scheduler=None,
        model_ema=None,
        amp_autocast=suppress,
        loss_scaler=None,
        mixup_fn=None,
        num_updates: int = 0,
        adversarial: Optional[AdversarialBatches] = None,
) -> Tuple[Dict[str, float], int]:
    """One epoch of training with ``loss_fn``: forward, loss, backward, optimizer step, EMA update,
    per-update schedule step. Logs progress every ``--log-interval`` batches (loss, images/s, ETA).
    With ``adversarial`` (``--adv-train``) each batch is first replaced by its attacked version
    (the loss is the adversarial loss only, EL_SPEC 6).

    Returns ``({'loss': mean training loss over the epoch and the processes}, number of updates so far)``.
    """
    model.train()
    batch_time_m, data_time_m, losses_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    num_batches = len(loader)
    end = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        data_time_m.update(time.time() - end)
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if adversarial is not None:
            input = adversarial(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        with amp_autocast():
            output = model(input)
            loss = loss_fn(output, target)
        optimizer.zero_grad()
        clip_params = model_parameters(model, exclude_head='agc' in args.clip_mode) \
            if args.clip_grad is not None else None
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip_params)
        else:
            loss.backward()
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(clip_params, value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        num_updates += 1
        _kill_point(epoch, batch_idx)
        if model_ema is not None:
            model_ema.update(utils.unwrap_model(model), step=num_updates)
        losses_m.update(loss.item(), input.size(0))
        batch_time_m.update(time.time() - end)

        if last_batch or batch_idx % args.log_interval == 0:
            loss_now = _mean_over_ranks(losses_m.val, args, device)
            loss_avg = _mean_over_ranks(losses_m.avg, args, device)
            if utils.is_primary(args):
                lrs = [group['lr'] for group in optimizer.param_groups]
                global_batch = input.size(0) * args.world_size
                eta = timedelta(seconds=int(batch_time_m.avg * (num_batches - batch_idx - 1)))
                _logger.info(
                    f'Train: {epoch} [{batch_idx:>4d}/{num_batches} ({100. * (batch_idx + 1) / num_batches:>3.0f}%)]  '
                    f'Loss: {loss_now:#.4g} ({loss_avg:#.4g})  '
                    f'Time: {batch_time_m.val:.3f}s, {global_batch / batch_time_m.val:>7.1f}/s '
                    f'({batch_time_m.avg:.3f}s, {global_batch / batch_time_m.avg:>7.1f}/s)  ETA: {eta}  '
                    f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})')
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        end = time.time()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    return OrderedDict([('loss', _mean_over_ranks(losses_m.avg, args, device))]), num_updates


def validate(model: nn.Module, loader, args, device: torch.device, amp_autocast=suppress,
             log_suffix: str = '', train_counts: Optional[Sequence[int]] = None,
             shot_thresholds: Sequence[int] = SHOT_THRESHOLDS) -> Dict[str, Optional[float]]:
    """Plain cross-entropy loss, top-1 and top-5 accuracy (%) of ``model`` on the validation
    loader, averaged over the processes (never the Encouraging Loss).

    With ``train_counts`` (the training images per class) also ``many``, ``medium`` and ``few``: the
    many / medium / few-shot accuracies (%) of Kang et al. 2020 (EL_SPEC 6, Table 3 / 9; classes with more
    than ``shot_thresholds[0]`` training images, fewer than ``shot_thresholds[1]``, the rest), each the mean
    of its classes' accuracies (``encouraging_loss.tools.analysis.shot_accuracy``) over the predictions of
    every process together; None for a group without classes in the validation set."""
    loss_fn = nn.CrossEntropyLoss().to(device)
    preds, targets = [], []
    batch_time_m, losses_m = utils.AverageMeter(), utils.AverageMeter()
    top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter()
    model.eval()
    last_idx = len(loader) - 1
    end = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output.float(), target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, 5))
            if train_counts is not None:
                preds.append(output.argmax(dim=-1).cpu())
                targets.append(target.cpu())
            if args.distributed:
                loss = utils.reduce_tensor(loss.detach(), args.world_size)
                acc1 = utils.reduce_tensor(acc1, args.world_size)
                acc5 = utils.reduce_tensor(acc5, args.world_size)
            n = output.shape[0]
            losses_m.update(loss.item(), n)
            top1_m.update(acc1.item(), n)
            top5_m.update(acc5.item(), n)
            batch_time_m.update(time.time() - end)
            end = time.time()
            if utils.is_primary(args) and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
                _logger.info(
                    f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  Time: {batch_time_m.val:.3f} '
                    f'({batch_time_m.avg:.3f})  Loss: {losses_m.val:>7.4f} ({losses_m.avg:>6.4f})  '
                    f'Acc@1: {top1_m.val:>7.3f} ({top1_m.avg:>7.3f})  Acc@5: {top5_m.val:>7.3f} ({top5_m.avg:>7.3f})')
    metrics = OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])
    if train_counts is not None:
        pred, target = gather_predictions(
            torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
            torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long), args.distributed, device)
        many, few = shot_thresholds
        shots = shot_accuracy(pred, target, list(train_counts), many=many, few=few)
        metrics.update((group, shots[group]) for group in SHOT_GROUPS)
    return metrics


# ----------------------------------------------------------------------------- skipped training images


def _skips_so_far(run: '_Setup') -> int:
    """How many training images were skipped so far in this process."""
    dataset = run.dataset_train
    return int(dataset.skips.sum()) if isinstance(dataset, CheckedImageDataset) else 0


def _note_skips(args, run: '_Setup', epoch: int, before: int) -> None:
    """After an epoch's training: warn once per file about unreadable training images, count the
    epoch's skips (over all processes) into ``run.skipped_per_epoch`` and log them."""
    dataset = run.dataset_train
    count = _skips_so_far(run) - before
    if args.distributed:
        count = int(round(utils.reduce_tensor(
            torch.tensor([float(count)], device=run.device, dtype=torch.float64), 1).item()))
    if isinstance(dataset, CheckedImageDataset):
        root = args.data_dir
        for index in dataset.unreadable():
            path = dataset.path(index)
            name = os.path.relpath(path, root) if os.path.isabs(path) else path
            if name in run.unreadable:
                continue
            run.unreadable.append(name)
            reason = image_problem(path, dataset.input_img_mode) if os.path.isfile(path) else None
            _logger.warning(f'Training image {path} cannot be read{f" ({reason})" if reason else ""}: skipped, '
                            f'the next image of the split takes its place (as in timm).')
    while len(run.skipped_per_epoch) <= epoch:
        run.skipped_per_epoch.append(0)
    run.skipped_per_epoch[epoch] = count
    if count and utils.is_primary(args):
        _logger.warning(f'Epoch {epoch}: {count} training image(s) skipped (unreadable); '
                        f'{sum(run.skipped_per_epoch)} in this run so far.')


# ----------------------------------------------------------------------------- main


@dataclass
class _Setup:
    """Everything a run trains with, as :func:`_build` makes it."""
    device: torch.device
    data_config: dict
    model: nn.Module
    model_ema: Optional[nn.Module]
    loader_train: object
    loader_eval: object
    mixup_fn: Optional[Mixup]
    train_loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    num_epochs: int
    start_epoch: int
    updates_per_epoch: int
    amp_autocast: object = suppress
    loss_scaler: object = None
    dataset_train: object = None
    #: what --resume restores besides timm's states: 'rng' (per process), 'skipped' (per epoch), 'unreadable'
    resume_state: dict = field(default_factory=dict)
    #: training images skipped in each epoch (index: epoch), and the files that could not be read
    skipped_per_epoch: List[int] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)
    #: --adv-train: the attacked batches (None: clean training)
    adversarial: Optional[AdversarialBatches] = None
    #: --drw-epoch: the deferred re-weighting (None: none)
    drw: Optional[DeferredReweighting] = None
    #: the training images per class when validation reports the shot groups (None: it does not)
    shot_counts: Optional[List[int]] = None


def _long_tailed(args) -> bool:
    """Whether the training data is long-tailed by the flags: ``--long-tail-ratio``, ``--dataset inat2018`` /
    ``imagenet_lt``, ``--crt-from`` (then validation reports the shot groups without ``--shot-groups``)."""
    return bool(args.long_tail_ratio is not None or is_longtail_dataset(args.dataset) or args.crt_from)


def _train_labels(args, dataset_train, num_classes: int) -> Tuple[Optional[np.ndarray], Optional[List[int]]]:
    """The training labels and images per class (``timm_el.longtail``, no image decoded) when DRW, cRT or
    the shot groups need them, else ``(None, None)``."""
    if args.drw_epoch is None and not args.crt_from and not args.shot_groups and not _long_tailed(args):
        return None, None
    flag = ('--drw-epoch' if args.drw_epoch is not None else '--crt-from' if args.crt_from
            else '--shot-groups' if args.shot_groups else 'the shot groups')
    try:
        labels = dataset_labels(dataset_train)
        counts = class_counts(dataset_train, num_classes)
    except (TypeError, ValueError) as err:
        raise UsageError(f'{flag}: the training images per class cannot be read: {_one_line(err)}') from None
    return labels, counts


def _crt_model(args, model: nn.Module, primary: bool) -> None:
    """``--crt-from``: the source run's weights (not when resuming: the checkpoint holds them), the classifier
    re-initialised, everything else frozen and kept in eval mode (:func:`timm_el.rebalance.prepare_crt_model`)."""
    if not args.crt_from:
        return
    try:
        if not args.resume:
            checkpoint = _read_checkpoint(args.crt_from, '--crt-from')
            load_crt_source(model, checkpoint['state_dict'], args.crt_from)
        trainable = prepare_crt_model(model)
    except ValueError as err:
        raise UsageError(_one_line(err)) from None
    if args.distributed:
        args.dist_bn = ''  # the frozen BatchNorm statistics are the same on every process
    if primary:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _logger.info(f'cRT from {args.crt_from}: classifier {", ".join(trainable)} re-initialised and trained '
                     f'({learned:,} values); {frozen:,} frozen, BatchNorm statistics and dropout as in eval mode.')


def _build(args) -> _Setup:
    """Data, model, loss, optimizer, resumed state, EMA, DDP wrapper and schedule of a run
    (after ``init_distributed_device``). ``UsageError`` when the flags do not fit the data or model."""
    device = torch.device(args.device)
    primary = utils.is_primary(args)
    args.prefetcher = not args.no_prefetcher
    args.mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None

    in_chans = _resolve_in_chans(args)
    dataset_train, dataset_eval, classes = _create_datasets(args, in_chans)
    num_classes = args.num_classes or (len(classes) if classes else None)
    if classes and num_classes < len(classes):
        raise UsageError(f'--num-classes {num_classes} is smaller than the {len(classes)} classes of the data')
    model = _create_model(args, in_chans, num_classes)
    num_classes = model.num_classes
    if primary:
        _logger.info(f'Model {args.model} created: {sum(p.numel() for p in model.parameters()):,} parameters, '
                     f'{in_chans} input channel(s), {num_classes} classes.')
    _crt_model(args, model, primary)
    train_labels, train_counts = _train_labels(args, dataset_train, num_classes)
    data_config = resolve_data_config({**vars(args), 'in_chans': in_chans}, model=model, verbose=primary)
    for key in ('mean', 'std'):  # e.g. 3-channel ImageNet statistics for a 1-channel model: average them
        values = tuple(data_config[key])
        if len(values) != in_chans:
            data_config[key] = (sum(values) / len(values),) * in_chans
            if primary:
                _logger.info(f'Data {key} {values} averaged over channels for {in_chans} input channel(s).')

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp_autocast, loss_scaler = suppress, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler(device=device.type)
        if device.type == 'cpu' and amp_dtype == torch.float16 and primary:
            _logger.warning('--amp with float16 on the CPU is slow; '
                            '--amp-dtype bfloat16 is the CPU\'s mixed precision.')

    loader_train, loader_eval, mixup_fn = _create_loaders(
        args, dataset_train, dataset_eval, data_config, num_classes, device)
    if args.crt_from:  # Kang et al.'s class-balanced sampling, in timm's loader
        loader_train = with_sampler(loader_train, ClassBalancedSampler(
            train_labels, seed=args.seed, rank=args.rank, world_size=args.world_size))
        if primary:
            _logger.info(f'cRT: class-balanced sampling over {sum(1 for n in train_counts if n)} classes '
                         f'({len(train_labels)} draws per epoch, seed {args.seed}).')
    train_loss_fn = create_train_loss(args, args.mixup_active).to(device)
    if primary:
        _logger.info(f'Training loss (--loss {args.loss}): {train_loss_fn}; validation loss: CrossEntropyLoss.')
    drw = None
    if args.drw_epoch is not None:
        if not hasattr(train_loss_fn, 'weight'):
            raise UsageError(f'--drw-epoch: --loss {args.loss} ({type(train_loss_fn).__name__}) takes no class '
                             f'weights')
        drw = DeferredReweighting(args.drw_epoch, args.drw_beta, train_counts)
        if primary:
            _logger.info(drw.describe())
    shot_counts = train_counts if args.shot_groups or _long_tailed(args) else None
    if shot_counts is not None and primary:
        groups = shot_groups(shot_counts, many=args.shot_thresholds[0], few=args.shot_thresholds[1])
        _logger.info(f'Shot groups by the training images per class (many > {args.shot_thresholds[0]}, '
                     f'few < {args.shot_thresholds[1]}): ' + ', '.join(f'{groups.count(g)} {g}' for g in SHOT_GROUPS))
    adversarial = _adversarial_batches(args, model, data_config)  # the model itself, before any DDP wrapper

    _resolve_lr(args)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    except Exception as err:  # noqa: BLE001 -- e.g. --opt-betas for an optimizer without betas
        raise UsageError(f'--opt {args.opt}: {_one_line(err)}') from None
    resume_epoch, resume_state = None, {}
    if args.resume:  # check_args read the file with weights_only=True first: nothing in it can run code
        resume_epoch = resume_checkpoint(
            model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=primary)
        resume_state = _resume_state(args.resume)
    model_ema = None
    if args.model_ema:  # after the model is on its device and resumed, before the DDP wrapper
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                     device='cpu' if args.model_ema_force_cpu else None)
        if args.resume:
            load_checkpoint(model_ema.module, args.resume, use_ema=True)
    if args.distributed:
        model = NativeDDP(model, device_ids=[device] if device.type == 'cuda' else None)

    updates_per_epoch = len(loader_train)
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    except Exception as err:  # noqa: BLE001 -- the schedulers check their own settings
        raise UsageError(f'--sched {args.sched}: {_one_line(err)}') from None
    start_epoch = resume_epoch or 0
    if lr_scheduler is not None and start_epoch > 0:
        # the plateau schedule: its saved state, and the learning rate the optimizer's state holds; the other
        # schedules are functions of the epoch (or update) count
        restored = not args.no_resume_opt and _restore_scheduler(lr_scheduler, resume_state.get('lr_scheduler'))
        if not restored and args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        elif not restored:
            lr_scheduler.step(start_epoch)
    skipped = [int(n) for n in resume_state.get('skipped', [])][:start_epoch]
    return _Setup(
        device=device, data_config=data_config, model=model, model_ema=model_ema, loader_train=loader_train,
        loader_eval=loader_eval, mixup_fn=mixup_fn, train_loss_fn=train_loss_fn, optimizer=optimizer,
        lr_scheduler=lr_scheduler, num_epochs=num_epochs, start_epoch=start_epoch,
        updates_per_epoch=updates_per_epoch, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
        dataset_train=dataset_train, resume_state=resume_state,
        skipped_per_epoch=skipped + [0] * (start_epoch - len(skipped)),
        unreadable=list(resume_state.get('unreadable', [])), adversarial=adversarial, drw=drw,
        shot_counts=shot_counts)


def _open_run(args, args_text: str, run: _Setup) -> Tuple[str, '_RunSaver', logging.Handler]:
    """Rank 0: the run directory with ``args.yaml``, the log file (its handler is returned) and the
    checkpoint saver (when resuming: its history rebuilt from the run directory's own files, and
    ``summary.csv`` trimmed to the epochs before the resumed one)."""
    run_dir = _run_dir(args, run.data_config)
    log_file = _add_log_file(run_dir)
    _logger.info(f'Run directory: {run_dir}')
    _write_text(os.path.join(run_dir, 'args.yaml'), args_text)
    saver = _RunSaver(
        run_dir, model=run.model, optimizer=run.optimizer, args=args, model_ema=run.model_ema,
        amp_scaler=run.loss_scaler, decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
    if args.resume:
        _remove_stale_temporaries(run_dir)
        saver.restore(run.start_epoch)
    _trim_summary(os.path.join(run_dir, 'summary.csv'), run.start_epoch)
    _logger.info(f'Scheduled epochs: {run.num_epochs}, from epoch {run.start_epoch}; {run.updates_per_epoch} '
                 f'updates per epoch of {args.batch_size} x {args.world_size} images.')
    if run.adversarial is not None:
        _logger.info(run.adversarial.describe())
        _logger.info(f'Attacks on images in [0, 1]: batches un-normalised with mean {tuple(run.data_config["mean"])} '
                     f'std {tuple(run.data_config["std"])} (clamped), attacked with the model in eval mode, '
                     f'normalised again; the training loss (--loss {args.loss}) sees the attacked batches only.')
    return run_dir, saver, log_file


def _fit(args, run: _Setup, run_dir: Optional[str], saver) -> None:
    """The epochs: set the bonus weight, train, distribute BatchNorm statistics, validate the model
    (and the EMA), step the schedule, and on rank 0 append to ``summary.csv`` and save the checkpoints
    (which hold every process's random number generators as they are for the next epoch)."""
    primary = utils.is_primary(args)
    validate_ema = run.model_ema is not None and not args.model_ema_force_cpu
    distribute_bn = args.distributed and args.dist_bn in ('broadcast', 'reduce')
    num_updates = run.start_epoch * run.updates_per_epoch
    for epoch in range(run.start_epoch, run.num_epochs):
        epoch_start = time.time()
        if hasattr(run.loader_train.sampler, 'set_epoch'):
            run.loader_train.sampler.set_epoch(epoch)
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            if args.prefetcher:
                run.loader_train.mixup_enabled = False
            elif run.mixup_fn is not None:
                run.mixup_fn.mixup_enabled = False
        if args.loss == 'encouraging':
            run.train_loss_fn.bonus_rho = bonus_weight(args, epoch)
            if primary:
                _logger.info(f'Epoch {epoch}: bonus weight {run.train_loss_fn.bonus_rho:g}')
        if run.drw is not None and run.drw.apply(run.train_loss_fn, epoch, run.device) and primary:
            _logger.info(f'Epoch {epoch}: DRW class-balanced loss weights on (beta {run.drw.beta:g}, from epoch '
                         f'{run.drw.start}).')

        skips_before = _skips_so_far(run)
        train_metrics, num_updates = train_one_epoch(
            epoch, run.model, run.loader_train, run.optimizer, run.train_loss_fn, args, run.device,
            lr_scheduler=run.lr_scheduler, model_ema=run.model_ema, amp_autocast=run.amp_autocast,
            loss_scaler=run.loss_scaler, mixup_fn=run.mixup_fn, num_updates=num_updates,
            adversarial=run.adversarial)
        _note_skips(args, run, epoch, skips_before)
        if distribute_bn:
            utils.distribute_bn(run.model, args.world_size, args.dist_bn == 'reduce')
        shots = dict(train_counts=run.shot_counts, shot_thresholds=args.shot_thresholds)
        eval_metrics = validate(run.model, run.loader_eval, args, run.device, run.amp_autocast, **shots)
        if validate_ema:
            if distribute_bn:
                utils.distribute_bn(run.model_ema, args.world_size, args.dist_bn == 'reduce')
            ema_metrics = validate(run.model_ema.module, run.loader_eval, args, run.device, run.amp_autocast,
                                   log_suffix=' (EMA)', **shots)
            eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())

        lrs = [group['lr'] for group in run.optimizer.param_groups]  # this epoch's, for summary.csv
        if run.lr_scheduler is not None:
            run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        # the state the next epoch starts from: nothing below draws a random number
        rng_states = _rng_states(args)
        if primary:
            summary_path = os.path.join(run_dir, 'summary.csv')
            before = _append_summary(summary_path, epoch, train_metrics, eval_metrics, sum(lrs) / len(lrs))
            try:
                saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric], extra={
                    'rng': rng_states, 'lr_scheduler': _scheduler_state(run.lr_scheduler),
                    'skipped_train_images': list(run.skipped_per_epoch),
                    'unreadable_train_images': list(run.unreadable)})
            except FileProblem:  # no summary row for an epoch without its checkpoint
                _restore_text(summary_path, before)
                raise
            ema_text = (f', EMA top-1 {eval_metrics["ema_top1"]:.3f} top-5 {eval_metrics["ema_top5"]:.3f}'
                        if validate_ema else '')
            _logger.info(
                f'Epoch {epoch} done in {time.time() - epoch_start:.1f}s: train loss {train_metrics["loss"]:.4f}, '
                f'eval loss {eval_metrics["loss"]:.4f}, top-1 {eval_metrics["top1"]:.3f} '
                f'top-5 {eval_metrics["top5"]:.3f}{_shot_text(eval_metrics)}{ema_text}')


def _shot_text(metrics: dict) -> str:
    """``, many 71.4 medium 65.9 few 61.9`` for the epoch line (``-`` for an empty group), or ''."""
    if 'many' not in metrics:
        return ''
    return ', ' + ' '.join(f'{g} {"-" if metrics[g] is None else format(metrics[g], ".3f")}' for g in SHOT_GROUPS)


def _train(args, args_text: str) -> None:
    """A whole run: distributed setup, :func:`_build`, :func:`_open_run` (rank 0), :func:`_fit`,
    then the result records (rank 0) and the optional state digests."""
    utils.init_distributed_device(args)
    primary = utils.is_primary(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    if not primary:
        logging.getLogger().setLevel(logging.WARNING)
    if primary:  # before any work: the run's files can be written
        if args.resume:
            _check_writable(os.path.dirname(os.path.abspath(args.resume)), '--resume')
        else:
            _check_writable(args.output or './output/train', '--output')
    utils.random_seed(args.seed, args.rank)
    log_file = None
    try:
        run = _build(args)
        run_dir = saver = None
        if primary:
            run_dir, saver, log_file = _open_run(args, args_text, run)
        if args.resume:  # after everything that draws random numbers at setup
            _restore_rng(args, run.resume_state.get('rng'))
        _fit(args, run, run_dir, saver)
        if primary:
            if run.start_epoch >= run.num_epochs:
                _logger.info(f'Nothing to train: the checkpoint is at epoch {run.start_epoch} of {run.num_epochs}.')
            if saver.best_metric is not None:
                _logger.info(f'Best {args.eval_metric}: {saver.best_metric:.4f} (epoch {saver.best_epoch})')
            info = {'skipped_train_images': sum(run.skipped_per_epoch),
                    'unreadable_train_images': list(run.unreadable)}
            if args.adv_train:  # adversarial training (None: steps and alpha of FGSM)
                info.update({dest: getattr(args, dest) for dest in ADV_FLAGS})
            if run.shot_counts is not None:  # the shot groups' classes (Kang et al. 2020)
                many, few = args.shot_thresholds
                groups = shot_groups(run.shot_counts, many=many, few=few)
                info['shot_groups'] = {'many_above': many, 'few_below': few,
                                       **{f'{g}_classes': groups.count(g) for g in SHOT_GROUPS}}
            for path in write_result_records(run_dir, args, extra_info=info):
                _logger.info(f'Wrote {path}')
        _write_digest(args, run.model, run.model_ema)
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
        if args.distributed:
            torch.distributed.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``timm-el-train`` / ``python -m timm_el.train``: parse, check, train.

    Bad flags exit with status 2 and one line ``timm-el-train: error: ...``.
    """
    parser = build_parser()
    try:
        args = parse_args(argv, parser)
    except UsageError as err:
        parser.error(str(err))
    args_text = yaml.safe_dump(_yaml_safe(vars(args)), default_flow_style=False)
    _setup_logging()
    try:
        _train(args, args_text)
    except (UsageError, ImageReadError) as err:
        parser.error(str(err))
    except FileProblem as err:  # e.g. a full disk: the files written so far are whole
        sys.stderr.write(f'{PROG}: error: {err}\n')
        return 1
    except KeyboardInterrupt:
        _logger.warning('Interrupted; continue with --resume <run directory>/last.pth.tar')
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
