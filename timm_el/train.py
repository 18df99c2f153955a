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
    summary.csv         epoch, train_loss, eval_loss, eval_top1, eval_top5[, eval_ema_loss,
                        eval_ema_top1, eval_ema_top5], lr -- epochs numbered from 0, like timm
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

Several GPUs or machines: start it with ``torchrun`` (DDP; NCCL on CUDA, gloo
on CPU, ranks from the RANK / WORLD_SIZE / LOCAL_RANK variables); only rank 0
writes files. Bad flag values stop it before any work with one line
``timm-el-train: error: ...`` naming the flag (exit status 2).
"""
import argparse
import csv
import hashlib
import io
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel as NativeDDP

import timm
import timm.loss
from timm import utils
from timm.data import (
    FastCollateMixup, ImageDataset, Mixup, create_dataset, create_loader, create_transform, resolve_data_config)
from timm.models import (
    create_model, get_pretrained_cfg, load_checkpoint, model_parameters, resume_checkpoint, safe_model_name)
from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from encouraging_loss.bonus import BonusConfig, as_integer, as_real, bonus_rho_at, check_schedule
from encouraging_loss.companion import FocalConfig, MirrorMSEConfig
from encouraging_loss.tools.files import (
    FileProblem, atomic_path, atomic_write, check_writable_dir, load_checkpoint_safely, os_error_line, write_json)
from encouraging_loss.checks import check_probability
from encouraging_loss.tools.results import SCHEMA

from .data import CheckedImageDataset, ImageReadError, image_problem
from .factory import COMPANION_KWARGS, EL_KWARGS, LOSS_TYPE

__all__ = [
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

PROG = 'timm-el-train'

_logger = logging.getLogger('timm_el.train')
_logging_ready = False

#: --loss choices: timm's cross-entropy, the Encouraging Loss, or the paper's companion losses.
LOSSES = ('ce', 'encouraging') + tuple(COMPANION_KWARGS)
#: the name of each --loss in the result records.
RECORD_LOSS = {'ce': 'ce', 'encouraging': 'el', **{name: name for name in COMPANION_KWARGS}}
#: the companion losses' flags (dests, as the factory's options) -> the --loss values they apply to.
COMPANION_FLAGS = {}
for _loss, _options in COMPANION_KWARGS.items():
    for _option in _options:
        COMPANION_FLAGS[_option] = COMPANION_FLAGS.get(_option, ()) + (_loss,)
del _loss, _options, _option
#: defaults of the Encouraging Loss flags with --loss encouraging (None on the command line
#: means "not given", so that they can be refused with --loss ce).
EL_DEFAULTS = {**EL_KWARGS, 'defer_start': 0, 'bonus_schedule': 'none', 'bonus_schedule_rate': 5.0}
#: the core's parameter names -> the flags, for the core's error messages.
CORE_NAMES = {
    'kind': '--bonus', 'log_end': '--log-end', 'bonus_start': '--bonus-start', 'gamma': '--bonus-gamma',
    'rho': '--bonus-rho', 'smoothing': '--smoothing', 'bonus_smoothing': '--bonus-smoothing',
    'defer_start': '--defer-start', 'schedule': '--bonus-schedule', 'max_epoch': '--epochs',
    'exp_rate': '--bonus-schedule-rate',
}
#: the core's companion-loss parameter names -> the flags.
COMPANION_NAMES = {
    'gamma': '--focal-gamma', 'halt': '--halt-point', 'mirror_rho': '--mirror-rho', 'mirror_gamma': '--mirror-gamma',
}
#: learning-rate schedules of timm's create_scheduler_v2.
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')
#: when set, each rank writes ``rank<R>.sha256`` (the digest of its model's state) into this
#: directory at the end of training: a check that the ranks of a DDP run agree.
DIGEST_ENV = 'TIMM_EL_STATE_DIGEST_DIR'
#: for tests only: ``E:B`` makes the process SIGKILL itself after the update of batch B of epoch E,
#: ``E:save`` while it writes epoch E's checkpoint (the data written, the file not yet in place):
#: how the tests prove that a killed run, resumed, ends exactly as an uninterrupted one.
KILL_ENV = 'TIMM_EL_TEST_SIGKILL_AT'
#: dataset prefixes whose data dir must exist.
_LOCAL_DATASETS = ('', 'torch')


class UsageError(ValueError):
    """A bad flag value or combination; :func:`main` reports it as one line and exits with status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (such options say in their help what unset means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == '':
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``timm-el-train: error: ...``, exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}\n')


# ----------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: timm's ``train.py`` flags the recipes use, ``--loss`` and the EL flags."""
    parser = _Parser(
        prog=PROG,
        description='Train a timm image classifier with the Encouraging Loss (Zhao et al., AAAI 2022) '
                    'or cross-entropy. Flags keep the names and meanings of timm\'s train.py.',
        formatter_class=_HelpFormatter,
    )
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file of defaults (option names with underscores, e.g. a run\'s args.yaml); '
                             'command-line flags override it')
    parser.add_argument('data', nargs='?', metavar='DIR', help='path to the dataset (same as --data-dir)')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', help='path to the dataset root')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset "<type>/<name>" as timm\'s create_dataset takes it, e.g. torch/cifar10, '
                            'torch/mnist, torch/fashion_mnist; empty: an ImageFolder (or image tar) in DIR')
    group.add_argument('--train-split', metavar='NAME', default='train', help='training split (sub-folder)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='validation split (sub-folder; validation, val, valid, eval are searched)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow torch/ datasets to download')
    group.add_argument('--class-map', default='', metavar='FILENAME', help='class to index mapping file')
    group.add_argument('--input-img-mode', default=None, metavar='MODE',
                       help='image mode the images are converted to (default: RGB for 3 input channels, L for 1)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', metavar='MODEL', help='timm model name')
    group.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    group.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load these weights first')
    group.add_argument('--resume', default='', metavar='PATH',
                       help='continue a run from its checkpoint (model, optimizer, scheduler, EMA, epoch, random '
                            'number generators), in the checkpoint\'s directory')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not restore the optimizer state when resuming')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes (default: the classes of the training data, else the model\'s)')
    group.add_argument('--gp', default=None, metavar='POOL', help='global pool type (model default if unset)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='input channels (default: --input-size, else the model\'s default, e.g. 1 for '
                            'mnist_cnn, else 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input size C H W (model default)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='PCT', help='validation center crop')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std')
    group.add_argument('--interpolation', default='', metavar='NAME', help='resize interpolation')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--channels-last', action='store_true', default=False, help='channels-last memory layout')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       metavar='KEY=VALUE', help='more keyword arguments of the model')

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='device (under torchrun the local rank picks the GPU)')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    group.add_argument('--sync-bn', action='store_true', default=False, help='synchronised BatchNorm (DDP)')
    group.add_argument('--dist-bn', default='reduce', choices=('', 'broadcast', 'reduce'),
                       help='after each epoch, average ("reduce") or copy from rank 0 ("broadcast") the '
                            'BatchNorm statistics across processes; "" leaves them')
    group.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', metavar='OPTIMIZER',
                       help='timm optimizer (sgd and nesterov: SGD with Nesterov momentum, momentum: plain '
                            'SGD with momentum, rmsproptf, adamw, ...)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradients')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'), help='clipping mode')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', default='cosine', choices=SCHEDULERS, metavar='SCHEDULER',
                       help=f'learning-rate schedule: {", ".join(SCHEDULERS)}')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the schedule every update instead of every epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate (default: --lr-base scaled by the global batch size)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='learning rate for a global batch of --lr-base-size, used when --lr is not set')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
    group.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'),
                       help='scaling of --lr-base with the batch size (default: sqrt for adaptive optimizers, '
                            'else linear)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='learning rate at warmup start')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower bound of cyclic schedules')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='multistep decay epochs; timm\'s convention: milestone M applies from epoch index '
                            'M - 1 (after M - 1 epochs; PyTorch\'s MultiStepLR: after M)')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step schedule period')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='linear warmup epochs')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='warmup epochs come before --epochs instead of within them')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at --min-lr at the end')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='learning-rate decay')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar='PCT',
                       help='random-resized-crop scale range')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random-resized-crop aspect ratio range')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--aa', default=None, metavar='NAME', help='AutoAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'), help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are enabled')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='mixup mode')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn mixup off from this epoch on (0: never)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing, in [0, 1)')
    group.add_argument('--train-interpolation', default='random', help='training resize interpolation')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', '--drop-connect', dest='drop_path', type=float, default=None, metavar='PCT',
                       help='drop-path (stochastic depth) rate; --drop-connect is the old name')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop-block rate')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep and validate an exponential moving average of the weights (ModelEmaV3)')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU (then it is not validated)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    group.add_argument('--model-ema-warmup', action='store_true', default=False, help='EMA decay warmup')

    group = parser.add_argument_group('Loss parameters (each loss\'s flags apply to that --loss only)')
    group.add_argument('--loss', default='ce', choices=LOSSES,
                       help='ce: timm\'s cross-entropy (label smoothing / soft targets as timm chooses); '
                            'encouraging: the Encouraging Loss through timm\'s create_classification_loss; '
                            'the paper\'s companion losses: focal, halted_focal (Eq. 12), mse, mse_sigmoid '
                            '(MSE with the mirror bonus, Table 5)')
    group.add_argument('--log-end', type=float, default=None,
                       help=f'conservative bonus end point, in (0, 1]; 1 = normal bonus '
                            f'(default: {EL_DEFAULTS["log_end"]})')
    group.add_argument('--bonus', default=None,
                       help=f'bonus kind: log, power or cosine (default: {EL_DEFAULTS["bonus"]})')
    group.add_argument('--bonus-start', type=float, default=None,
                       help=f'aggressive bonus: reward only p >= this, in [0, 1) '
                            f'(default: {EL_DEFAULTS["bonus_start"]})')
    group.add_argument('--bonus-gamma', type=float, default=None,
                       help=f'exponent of the power bonus, > 0 (default: {EL_DEFAULTS["bonus_gamma"]})')
    group.add_argument('--bonus-rho', type=float, default=None,
                       help=f'weight of the bonus, >= 0; 0 = cross-entropy (default: {EL_DEFAULTS["bonus_rho"]})')
    group.add_argument('--bonus-smoothing', type=float, default=None,
                       help='label smoothing of the bonus term, in [0, 1) (default: --smoothing)')
    group.add_argument('--defer-start', type=int, default=None,
                       help=f'bonus off for the first N epochs (default: {EL_DEFAULTS["defer_start"]})')
    group.add_argument('--bonus-schedule', default=None,
                       help='ramp of --bonus-rho over --epochs, t = epoch / epochs: none, linear (t), cosine '
                            f'((cos(pi (1 + t)) + 1) / 2), exp (exp((t - 1) r)) '
                            f'(default: {EL_DEFAULTS["bonus_schedule"]})')
    group.add_argument('--bonus-schedule-rate', type=float, default=None,
                       help=f'r of the exp schedule, > 0 (default: {EL_DEFAULTS["bonus_schedule_rate"]})')
    group.add_argument('--focal-gamma', type=float, default=None,
                       help='--loss focal / halted_focal: focusing exponent of -(1 - p)**gamma log p, >= 0 '
                            f'(default: {COMPANION_KWARGS["focal"]["focal_gamma"]})')
    group.add_argument('--halt-point', type=float, default=None,
                       help='--loss halted_focal: focal loss below p = this, cross-entropy shifted to be '
                            f'continuous above (Eq. 12), in (0, 1) '
                            f'(default: {COMPANION_KWARGS["halted_focal"]["halt_point"]})')
    group.add_argument('--mirror-rho', type=float, default=None,
                       help='--loss mse / mse_sigmoid: weight of the mirror bonus (Table 5), >= 0; 0 = plain MSE '
                            f'(default: {COMPANION_KWARGS["mse"]["mirror_rho"]})')
    group.add_argument('--mirror-gamma', type=float, default=None,
                       help='--loss mse / mse_sigmoid: exponent of the mirror bonus, > 0 '
                            f'(default: {COMPANION_KWARGS["mse"]["mirror_gamma"]})')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='log progress every N batches')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of best epoch checkpoints to keep')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='data loading processes (started afresh each epoch)')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in the loader')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='no prefetching loader (normalisation and mixup on the batch instead)')
    group.add_argument('--output', default='', metavar='PATH',
                       help='folder of the run directories (default: ./output/train)')
    group.add_argument('--experiment', default='', metavar='NAME',
                       help='name of the run directory (default: date-time-model-size)')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'),
                       help='validation metric that ranks the checkpoints')
    group.add_argument('--task-name', default=None, metavar='NAME',
                       help='task of the result records (default: <dataset>_<model>, e.g. mnist_mnist_cnn)')
    return parser


def _flag(dest: str) -> str:
    """The flag of an option's ``dest`` (``data_dir`` -> ``--data-dir``)."""
    return '--' + dest.replace('_', '-')


def _one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return ' '.join(str(err).split()) or type(err).__name__


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse and check the command line (and ``--config`` YAML defaults, which flags override).

    Returns the checked ``argparse.Namespace`` (EL defaults filled in with
    ``--loss encouraging``, ``data_dir`` set from DIR). Raises
    :class:`UsageError` (one line naming the flag) on a bad value; argparse's
    own errors exit with status 2.
    """
    parser = parser or build_parser()
    config_parser = _Parser(prog=PROG, add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    config_args, remaining = config_parser.parse_known_args(argv)
    if config_args.config:
        parser.set_defaults(**_read_config(config_args.config, parser))
    args = parser.parse_args(remaining)
    args.config = config_args.config
    check_args(args, parser)
    return args


def read_flags_yaml(path, what: str) -> dict:
    """The mapping of flags in a YAML file (a run's ``args.yaml``, a ``--config``): empty for an empty
    file. :class:`~encouraging_loss.tools.files.FileProblem` with one line starting with ``what`` when it
    cannot be read or is not a mapping (not UTF-8, NUL bytes, broken or absurdly nested YAML, a list)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise FileProblem(f'{what}: {err.strerror or _one_line(err)}') from None
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as err:
        raise FileProblem(f'{what}: not UTF-8 text (byte {err.start}); not a YAML file of flags') from None
    if '\x00' in text:
        raise FileProblem(f'{what}: holds NUL bytes (a damaged or partly written file)')
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f' at line {mark.line + 1} column {mark.column + 1}' if mark is not None else ''
        problem = getattr(err, 'problem', None) or _one_line(err)
        raise FileProblem(f'{what}: not valid YAML ({problem}{where}; truncated or damaged?)') from None
    except RecursionError:
        raise FileProblem(f'{what}: nested too deeply to be a file of flags') from None
    if cfg is None:  # an empty file
        return {}
    if not isinstance(cfg, dict):
        kind = {list: 'list', str: 'string', int: 'number', float: 'number', bool: 'boolean'}.get(
            type(cfg), type(cfg).__name__)
        raise FileProblem(f'{what}: holds a YAML {kind}, expected a mapping of timm-el-train flags '
                          f'(flag: value lines, like a run\'s args.yaml)')
    return cfg


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The defaults in a ``--config`` YAML file (``UsageError`` if unreadable or naming unknown options)."""
    try:
        cfg = read_flags_yaml(path, f'--config {path!r}')
    except FileProblem as err:
        raise UsageError(str(err)) from None
    known = {a.dest for a in parser._actions if a.dest != 'help'}
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        raise UsageError(f'--config {path!r}: unknown option(s) {", ".join(unknown)}')
    return cfg


def _check_numbers(args) -> None:
    """Ranges of the numeric flags (``UsageError`` naming the flag and the value)."""
    ge0, ge1, gt0 = (lambda v: v >= 0), (lambda v: v >= 1), (lambda v: v > 0)
    in01 = lambda v: 0 <= v <= 1  # noqa: E731
    # dest, integer?, test, what, None allowed?
    rules = (
        ('epochs', True, ge1, 'an integer >= 1', False),
        ('batch_size', True, ge1, 'an integer >= 1', False),
        ('validation_batch_size', True, ge1, 'an integer >= 1', True),
        ('workers', True, ge0, 'an integer >= 0', False),
        ('log_interval', True, ge1, 'an integer >= 1', False),
        ('checkpoint_hist', True, ge1, 'an integer >= 1', False),
        ('seed', True, ge0, 'an integer >= 0', False),
        ('num_classes', True, lambda v: v >= 2, 'an integer >= 2 (a classifier needs two classes)', True),
        ('img_size', True, ge1, 'an integer >= 1', True),
        ('in_chans', True, ge1, 'an integer >= 1', True),
        ('recount', True, ge1, 'an integer >= 1', False),
        ('warmup_epochs', True, ge0, 'an integer >= 0', False),
        ('cooldown_epochs', True, ge0, 'an integer >= 0', False),
        ('patience_epochs', True, ge0, 'an integer >= 0', False),
        ('mixup_off_epoch', True, ge0, 'an integer >= 0', False),
        ('lr_base_size', True, ge1, 'an integer >= 1', False),
        ('lr', False, gt0, 'a number > 0', True),
        ('lr_base', False, gt0, 'a number > 0', False),
        ('warmup_lr', False, ge0, 'a number >= 0', False),
        ('min_lr', False, ge0, 'a number >= 0', False),
        ('momentum', False, ge0, 'a number >= 0', False),
        ('weight_decay', False, ge0, 'a number >= 0', False),
        ('opt_eps', False, gt0, 'a number > 0', True),
        ('clip_grad', False, gt0, 'a number > 0', True),
        ('decay_epochs', False, gt0, 'a number > 0', False),
        ('decay_rate', False, gt0, 'a number > 0', False),
        ('crop_pct', False, gt0, 'a number > 0', True),
        ('mixup', False, ge0, 'a number >= 0', False),
        ('cutmix', False, ge0, 'a number >= 0', False),
        ('mixup_prob', False, in01, 'in [0, 1]', False),
        ('mixup_switch_prob', False, in01, 'in [0, 1]', False),
        ('reprob', False, in01, 'in [0, 1]', False),
        ('hflip', False, in01, 'in [0, 1]', False),
        ('vflip', False, in01, 'in [0, 1]', False),
        ('color_jitter', False, ge0, 'a number >= 0', False),
        ('model_ema_decay', False, in01, 'in [0, 1]', False),
    )
    for dest, integer, ok, what, allow_none in rules:
        value = getattr(args, dest)
        if value is None and allow_none:
            continue
        number = as_integer(value) if integer else as_real(value)
        if number is None or not math.isfinite(number) or not ok(number):
            raise UsageError(f'{_flag(dest)} must be {what}, got {value!r}')
    for dest, allow_none in (('smoothing', False), ('drop', False), ('drop_path', True), ('drop_block', True)):
        check_probability(getattr(args, dest), _flag(dest), allow_none=allow_none)
    # lists: the values and how many
    lists = (
        ('input_size', True, 3, ge1, 'three integers >= 1 (C H W)'),
        ('decay_milestones', True, None, ge0, 'one or more integers >= 0'),
        ('scale', False, 2, ge0, 'two numbers MIN MAX, 0 <= MIN <= MAX'),
        ('ratio', False, 2, gt0, 'two numbers MIN MAX, 0 < MIN <= MAX'),
        ('cutmix_minmax', False, 2, in01, 'two numbers MIN MAX in [0, 1], MIN <= MAX'),
        ('mean', False, None, lambda v: True, 'one number per input channel'),
        ('std', False, None, gt0, 'one number > 0 per input channel'),
        ('opt_betas', False, None, in01, 'numbers in [0, 1]'),
    )
    for dest, integer, count, ok, what in lists:
        values = getattr(args, dest)
        if values is None:
            continue
        numbers = [as_integer(v) if integer else as_real(v) for v in values] \
            if isinstance(values, (list, tuple)) else [None]
        bad = (not numbers or (count is not None and len(numbers) != count)
               or any(n is None or not math.isfinite(n) or not ok(n) for n in numbers)
               or (count == 2 and dest != 'input_size' and numbers[0] > numbers[1]))
        if bad:
            raise UsageError(f'{_flag(dest)} must be {what}, got {values!r}')


def _check_el(args) -> None:
    """The Encouraging Loss flags: refused with ``--loss ce``; with ``--loss encouraging`` the
    unset ones get their defaults and all are checked with the core's checks."""
    given = [_flag(dest) for dest in EL_DEFAULTS if getattr(args, dest) is not None]
    if args.loss != 'encouraging':
        if given:
            raise UsageError(f'{given[0]} applies to --loss encouraging only, not --loss {args.loss}')
        return
    for dest, default in EL_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    cfg = BonusConfig(kind=args.bonus, log_end=args.log_end, bonus_start=args.bonus_start,
                      gamma=args.bonus_gamma, rho=args.bonus_rho).validate(CORE_NAMES)
    args.log_end, args.bonus_start, args.bonus_gamma, args.bonus_rho = cfg.log_end, cfg.bonus_start, cfg.gamma, cfg.rho
    args.bonus_smoothing = check_probability(args.bonus_smoothing, 'bonus_smoothing', CORE_NAMES, allow_none=True)
    args.defer_start, args.bonus_schedule, _, args.bonus_schedule_rate = check_schedule(
        args.defer_start, args.bonus_schedule, args.epochs, args.bonus_schedule_rate, CORE_NAMES)


def _check_companion(args) -> None:
    """The companion losses' flags: each refused with a --loss it does not apply to; with its
    loss the unset ones get their defaults and all are checked with the core's checks."""
    for dest, losses in COMPANION_FLAGS.items():
        if getattr(args, dest) is not None and args.loss not in losses:
            raise UsageError(f'{_flag(dest)} applies to --loss {" or ".join(losses)} only, not --loss {args.loss}')
    if args.loss not in COMPANION_KWARGS:
        return
    for dest, default in COMPANION_KWARGS[args.loss].items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.loss in ('focal', 'halted_focal'):
        cfg = FocalConfig(gamma=args.focal_gamma, halt=args.halt_point).validate(COMPANION_NAMES)
        args.focal_gamma, args.halt_point = cfg.gamma, cfg.halt
    else:
        cfg = MirrorMSEConfig(mirror_rho=args.mirror_rho, mirror_gamma=args.mirror_gamma).validate(COMPANION_NAMES)
        args.mirror_rho, args.mirror_gamma = cfg.mirror_rho, cfg.mirror_gamma


def _dataset_prefix(dataset: str) -> str:
    """The ``<type>`` of ``--dataset <type>/<name>`` ('' for an ImageFolder)."""
    prefix, sep, _ = (dataset or '').partition('/')
    return prefix.lower() if sep else ''


def check_args(args, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Check every flag before any work; normalise a few (``data_dir``, EL defaults).

    Raises :class:`UsageError` with one line naming the flag and the value.
    """
    if parser is not None:  # values from --config skip argparse's choices
        for action in parser._actions:
            value = getattr(args, action.dest, None)
            if action.choices is not None and value is not None and value not in action.choices:
                raise UsageError(f'{action.option_strings[-1]} must be one of '
                                 f'{", ".join(repr(c) for c in action.choices)}, got {value!r}')
    try:
        _check_numbers(args)
        _check_el(args)
        _check_companion(args)
    except UsageError:
        raise
    except ValueError as err:  # the core's checks name the flag already
        raise UsageError(str(err)) from None

    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UsageError('the dataset directory is required (DIR or --data-dir)')
    prefix = _dataset_prefix(args.dataset)
    if prefix in _LOCAL_DATASETS and not os.path.isdir(args.data_dir) \
            and not (prefix == 'torch' and args.dataset_download):
        raise UsageError(f'--data-dir: directory not found: {args.data_dir!r}')
    if not args.val_split:
        raise UsageError('--val-split must name the validation split (the run reports validation top-1/top-5)')

    name = args.model
    if not isinstance(name, str) or not (timm.is_model(name) or name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:'))):
        raise UsageError(f'--model: unknown model {name!r} (see timm.list_models())')
    opt = str(args.opt).lower()
    if opt.split('_')[-1] not in list_optimizers():
        raise UsageError(f'--opt: unknown optimizer {args.opt!r} (see timm.optim.list_optimizers())')
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f'--device: not a device: {args.device!r}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device}: CUDA is not available (use --device cpu)')
    for dest in ('initial_checkpoint', 'resume'):
        path = getattr(args, dest)
        if path and not os.path.isfile(path):
            raise UsageError(f'{_flag(dest)}: checkpoint not found: {path!r}')
    if args.initial_checkpoint and not _foreign_weights(args.initial_checkpoint):
        _read_checkpoint(args.initial_checkpoint, '--initial-checkpoint')  # refuses unsafe files before timm reads it
    if args.resume:
        _check_resume(args)


def _foreign_weights(path: str) -> bool:
    """Weights that are not a pickle (timm loads them without unpickling): safetensors, NumPy."""
    return os.path.splitext(path)[-1].lower() in ('.safetensors', '.npz', '.npy')


def _read_checkpoint(path: str, flag: str) -> dict:
    """A PyTorch checkpoint read with ``weights_only=True`` passed explicitly (tensors on the CPU,
    memory-mapped where possible): a file whose unpickling would run code, a truncated or
    unreadable file are a :class:`UsageError` naming ``flag`` and the file."""
    try:
        return load_checkpoint_safely(path, flag, allowed=[argparse.Namespace])
    except FileProblem as err:
        raise UsageError(str(err)) from None


def _load_checkpoint_meta(path: str) -> dict:
    """A training checkpoint (tensors on the CPU), read with ``weights_only=True``
    (``encouraging_loss.tools.files.load_checkpoint_safely``; ``FileProblem`` when it cannot be)."""
    return load_checkpoint_safely(path, 'checkpoint', allowed=[argparse.Namespace])


def _check_resume(args) -> None:
    """``--resume`` must be a training checkpoint of the same model and loss."""
    checkpoint = _read_checkpoint(args.resume, '--resume')
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
        raise UsageError(f'--resume {args.resume!r}: not a training checkpoint (no state_dict and epoch)')
    epoch = as_integer(checkpoint['epoch'])
    if epoch is None or epoch < 0:
        raise UsageError(f'--resume {args.resume!r}: its epoch is not a number >= 0 ({checkpoint["epoch"]!r})')
    saved = checkpoint.get('args')
    for dest in ('model', 'loss'):
        before = getattr(saved, dest, None)
        if before is not None and before != getattr(args, dest):
            raise UsageError(f'--resume {args.resume!r} was trained with --{dest} {before}, '
                             f'not --{dest} {getattr(args, dest)}')


def _yaml_safe(value):
    """``value`` with tuples turned into lists, for ``yaml.safe_dump``."""
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    return value


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
    """
    kwargs = dict(smoothing=args.smoothing, soft_targets=mixup_active)
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


def _create_datasets(args, in_chans: int):
    """The training and validation datasets (``UsageError`` naming the flags when one cannot be made)."""
    img_mode = args.input_img_mode or ('RGB' if in_chans == 3 else 'L' if in_chans == 1 else None)
    datasets = []
    for split, is_training in ((args.train_split, True), (args.val_split, False)):
        try:
            datasets.append(create_dataset(
                args.dataset, root=args.data_dir, split=split, is_training=is_training,
                class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size,
                seed=args.seed, input_img_mode=img_mode))
        except Exception as err:  # noqa: BLE001 -- timm and torchvision raise many kinds
            what = f'--dataset {args.dataset}' if args.dataset else 'ImageFolder'
            raise UsageError(f'{what} in {args.data_dir!r}, split {split!r}: {_one_line(err)}') from None
    train, val = datasets
    train_root, val_root = (getattr(getattr(ds, 'reader', None), 'root', None) for ds in datasets)
    if train_root and val_root:  # timm falls back to DIR itself when a split folder is missing
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
) -> Tuple[Dict[str, float], int]:
    """One epoch of training with ``loss_fn``: forward, loss, backward, optimizer step, EMA update,
    per-update schedule step. Logs progress every ``--log-interval`` batches (loss, images/s, ETA).

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
             log_suffix: str = '') -> Dict[str, float]:
    """Plain cross-entropy loss, top-1 and top-5 accuracy (%) of ``model`` on the validation
    loader, averaged over the processes (never the Encouraging Loss)."""
    loss_fn = nn.CrossEntropyLoss().to(device)
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
    return OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])


# ----------------------------------------------------------------------------- run directory and records


def _run_dir(args, data_config) -> str:
    """The run directory: the resumed checkpoint's, else a fresh ``--output/--experiment``
    (timm's ``get_outdir`` adds ``-1``, ``-2``, ... rather than reuse an existing one)."""
    if args.resume:
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        if args.experiment and os.path.basename(run_dir) != args.experiment:
            _logger.warning(f'--resume continues in {run_dir}; --experiment {args.experiment} is not used.')
        return run_dir
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    output = args.output or './output/train'
    try:
        run_dir = utils.get_outdir(output, name, inc=True)
    except OSError as err:
        raise FileProblem(os_error_line(err, os.path.join(output, name), 'cannot make')) from None
    if os.path.basename(run_dir) != name:
        _logger.warning(f'{os.path.join(output, name)} exists; this run writes to {run_dir}.')
    return run_dir


def _setup_logging() -> None:
    """timm's console logging, set up once per process."""
    global _logging_ready
    if not _logging_ready:
        utils.setup_default_logging()
        _logging_ready = True


class _LogFile(logging.FileHandler):
    """``log.txt``: when it cannot be written (a full disk), one warning on the console and the
    log goes on there only (instead of a logging traceback for every line)."""

    failed = False

    def handleError(self, record):
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        reason = os_error_line(err, self.baseFilename) if isinstance(err, OSError) else \
            f'cannot write {self.baseFilename}: {_one_line(err)}'
        sys.stderr.write(f'{PROG}: warning: {reason}; the log continues on the console only\n')

    def emit(self, record):
        if not self.failed:
            super().emit(record)


def _add_log_file(run_dir: str) -> logging.Handler:
    """Copy the log into ``run_dir/log.txt`` (appended to when resuming); returns the handler."""
    path = os.path.join(run_dir, 'log.txt')
    try:
        handler = _LogFile(path)
    except OSError as err:
        raise FileProblem(os_error_line(err, path)) from None
    handler.setFormatter(logging.Formatter('%(asctime)s %(name)s [%(levelname)s] %(message)s'))
    logging.getLogger().addHandler(handler)
    return handler


def _write_text(path: str, text: str) -> None:
    """``text`` into ``path`` atomically (a whole new file or the old one); ``FileProblem`` if it cannot be."""
    try:
        with atomic_write(path, newline='') as f:
            f.write(text)
    except OSError as err:
        raise FileProblem(os_error_line(err, path)) from None


def _read_text(path: str) -> Optional[str]:
    """The text of ``path``, None when there is none."""
    try:
        with open(path, newline='', encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise FileProblem(f'cannot read {path}: {_one_line(err)}') from None


def _restore_text(path: str, text: Optional[str]) -> None:
    """Best effort: put ``path`` back as it was (``text``; None: no file)."""
    try:
        if text is None:
            if os.path.lexists(path):
                os.remove(path)
        else:
            with atomic_write(path, newline='') as f:
                f.write(text)
    except OSError:
        pass


def read_summary(path: str) -> List[Dict[str, str]]:
    """The rows of a ``summary.csv`` (``[]`` when there is none); ``FileProblem`` when it is not one."""
    text = _read_text(path)
    if text is None:
        return []
    try:
        rows = [row for row in csv.DictReader(io.StringIO(text, newline=''))
                if row.get('epoch') not in (None, '', 'epoch')]
        for row in rows:
            epoch = float(row['epoch'])
            if not math.isfinite(epoch) or epoch < 0 or epoch != int(epoch):
                raise ValueError(f'epoch {row["epoch"]!r}')
    except (csv.Error, ValueError, TypeError) as err:
        raise FileProblem(f'{path}: not a summary of epochs ({_one_line(err)})') from None
    return rows


def _csv_text(rows: List[Dict[str, object]]) -> str:
    """Rows as CSV text, the columns in their first appearance's order."""
    fieldnames = []
    for row in rows:
        fieldnames.extend(k for k in row if k not in fieldnames)
    out = io.StringIO(newline='')
    writer = csv.DictWriter(out, fieldnames=fieldnames, restval='')
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _append_summary(path: str, epoch: int, train_metrics, eval_metrics, lr: float) -> Optional[str]:
    """Add the epoch's row to ``summary.csv`` (rewritten atomically, as timm's ``update_summary``
    names the columns); returns the file's text before (None: there was none)."""
    before = _read_text(path)
    row = OrderedDict(epoch=epoch)
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in eval_metrics.items())
    row['lr'] = lr
    _write_text(path, _csv_text(read_summary(path) + [row]))
    return before


def _trim_summary(path: str, start_epoch: int) -> None:
    """Drop the rows of epochs >= ``start_epoch`` (a resumed run writes them again)."""
    rows = read_summary(path)
    keep = [row for row in rows if int(float(row['epoch'])) < start_epoch]
    if len(keep) == len(rows):
        return
    _write_text(path, _csv_text(keep) if keep else '')


def _task_name(args) -> str:
    """``--task-name``, else ``<dataset>_<model>`` (``imagefolder`` without ``--dataset``)."""
    if args.task_name:
        return args.task_name
    dataset = args.dataset.partition('/')[2] if '/' in args.dataset else (args.dataset or 'imagefolder')
    return f'{dataset.replace("/", "_").lower()}_{safe_model_name(args.model)}'


def write_result_records(run_dir: str, args, extra_info: Optional[dict] = None) -> List[str]:
    """Write the run's ``el-result/1`` records (``encouraging_loss.tools.results``) from its ``summary.csv``.

    ``eval/last.json`` (the last epoch) and ``eval/best.json`` (the best epoch
    by ``--eval-metric``, the first on ties, as ``model_best.pth.tar``), and with
    EMA columns ``eval/last_ema.json`` / ``eval/best_ema.json`` for the EMA
    weights. Metrics: validation ``top1`` and ``top5`` (%). ``info`` holds
    the epoch (numbered as in ``summary.csv``), the model and the checkpoint
    file with those weights (relative to the record, like ``curve``; None when
    not kept), and ``extra_info`` (the run's ``skipped_train_images`` and
    ``unreadable_train_images``). Each file is written atomically. Returns the paths written.
    """
    rows = read_summary(os.path.join(run_dir, 'summary.csv'))
    if not rows:
        return []
    decreasing = args.eval_metric == 'loss'
    eval_dir = os.path.join(run_dir, 'eval')
    try:
        os.makedirs(eval_dir, exist_ok=True)
    except OSError as err:
        raise FileProblem(os_error_line(err, eval_dir, 'cannot make')) from None
    written = []
    for suffix, prefix, weights in (('', 'eval_', 'state_dict'), ('_ema', 'eval_ema_', 'state_dict_ema')):
        scored = [row for row in rows if row.get(prefix + 'top1') not in (None, '')]
        if not scored:
            continue
        best = scored[0]
        for row in scored[1:]:
            value, best_value = float(row[prefix + args.eval_metric]), float(best[prefix + args.eval_metric])
            if (value < best_value) if decreasing else (value > best_value):
                best = row
        for name, row in (('last', scored[-1]), ('best', best)):
            epoch = int(float(row['epoch']))
            if name == 'last':
                checkpoint = 'last.pth.tar'
            elif not suffix:
                checkpoint = 'model_best.pth.tar'
            else:
                checkpoint = f'checkpoint-{epoch}.pth.tar'
            info = {
                'epoch': epoch, 'epochs': args.epochs, 'model': args.model,
                'checkpoint_path': os.path.join('..', checkpoint)
                if os.path.exists(os.path.join(run_dir, checkpoint)) else None,
                'weights': weights, 'dataset': args.dataset or 'imagefolder', 'eval_metric': args.eval_metric,
                'smoothing': args.smoothing, **(extra_info or {}),
            }
            if args.loss == 'encouraging':
                info['el'] = {dest: getattr(args, dest) for dest in EL_DEFAULTS}
            elif args.loss in COMPANION_KWARGS:
                info['companion'] = {dest: getattr(args, dest) for dest in COMPANION_KWARGS[args.loss]}
            record = {
                'schema': SCHEMA, 'task': _task_name(args), 'loss': RECORD_LOSS[args.loss], 'seed': args.seed,
                'run': os.path.basename(os.path.normpath(run_dir)), 'checkpoint': name + suffix,
                'metrics': {'top1': float(row[prefix + 'top1']), 'top5': float(row[prefix + 'top5'])},
                'info': info, 'curve': os.path.join('..', 'summary.csv'),
            }
            path = os.path.join(eval_dir, f'{name}{suffix}.json')
            try:
                write_json(path, record)
            except OSError as err:
                raise FileProblem(os_error_line(err, path)) from None
            written.append(path)
    return written


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)};'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_digest(args, model, model_ema) -> None:
    """Write this rank's state digest into ``$TIMM_EL_STATE_DIGEST_DIR`` when it is set."""
    folder = os.environ.get(DIGEST_ENV)
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise FileProblem(os_error_line(err, folder, 'cannot make')) from None
    lines = [f'model {state_digest(utils.unwrap_model(model))}']
    if model_ema is not None:
        lines.append(f'ema {state_digest(model_ema.module)}')
    _write_text(os.path.join(folder, f'rank{args.rank}.sha256'), '\n'.join(lines) + '\n')


# ----------------------------------------------------------------------------- checkpoints and exact resume


_CHECKPOINT_EXT = '.pth.tar'
_HISTORY_NAME = re.compile(r'checkpoint-(\d+)\.pth\.tar')
#: the temporary files of our own atomic writes (``.<name>.<random>.tmp``) that a killed run leaves behind
_OUR_TEMPORARY = re.compile(
    r'\.(?:last\.pth\.tar|model_best\.pth\.tar|checkpoint-\d+\.pth\.tar|summary\.csv|args\.yaml)\.\w+\.tmp')


def _kill_point(epoch: int, where) -> None:
    """Tests only: SIGKILL this process at ``$TIMM_EL_TEST_SIGKILL_AT`` (``epoch:batch`` or ``epoch:save``)."""
    at = os.environ.get(KILL_ENV)
    if at and at == f'{epoch}:{where}':
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_stale_temporaries(run_dir: str) -> None:
    """Remove the temporary files of our own atomic writes that a killed run left in ``run_dir``
    (only names this program makes, only plain files directly in the run directory)."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if _OUR_TEMPORARY.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
                _logger.info(f'Removed {name}, left by an interrupted write.')
            except OSError:
                pass


class _KeepWriteError:
    """A binary file for ``torch.save`` that remembers the first ``OSError`` of a write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.f.flush()


class _RunSaver:
    """The training checkpoints of one run directory: ``last.pth.tar`` every epoch,
    ``model_best.pth.tar`` (the best epoch by the metric) and ``checkpoint-E.pth.tar`` for the
    ``max_history`` best epochs (ties: the earlier epoch), the names and contents of timm's
    ``CheckpointSaver``.

    It only ever writes or deletes files whose names it makes itself (from an epoch number) in
    its own directory: the history of a resumed run is rebuilt from the directory's own
    ``checkpoint-E.pth.tar`` files, never taken from a checkpoint. Every file is written
    atomically (a temporary file renamed into place, a hard link or a copy for the duplicates), so
    a kill or a full disk during a save leaves the previous checkpoint whole.
    """

    def __init__(self, run_dir: str, *, model, optimizer, args, model_ema=None, amp_scaler=None,
                 decreasing: bool = False, max_history: int = 10):
        self.run_dir = os.path.abspath(run_dir)
        self.model, self.optimizer, self.args = model, optimizer, args
        self.model_ema, self.amp_scaler = model_ema, amp_scaler
        self.decreasing = decreasing
        self.max_history = max(1, int(max_history))
        self.history: List[Tuple[int, float]] = []  # (epoch, metric), best first
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name + _CHECKPOINT_EXT)

    def _epoch_path(self, epoch: int) -> str:
        return self._path(f'checkpoint-{int(epoch)}')

    def _better(self, metric: float, other: Optional[float]) -> bool:
        """``metric`` is strictly better than ``other`` (anything is better than nothing; NaN is
        better than nothing only, any number better than NaN)."""
        if other is None:
            return True
        if math.isnan(metric) or math.isnan(other):
            return not math.isnan(metric)
        return metric < other if self.decreasing else metric > other

    def _rank(self, entry: Tuple[int, float]) -> float:
        metric = entry[1]
        if math.isnan(metric):
            return math.inf
        return metric if self.decreasing else -metric

    def _sort(self) -> None:
        self.history.sort(key=lambda e: (self._rank(e), e[0]))

    def restore(self, start_epoch: int) -> None:
        """Rebuild the history from this directory's ``checkpoint-E.pth.tar`` files of the epochs
        before ``start_epoch`` (their own stored metric); the best is the first of them."""
        self.history = []
        later = []
        for name in sorted(os.listdir(self.run_dir)):
            found = _HISTORY_NAME.fullmatch(name)
            if not found:
                continue
            epoch, path = int(found.group(1)), os.path.join(self.run_dir, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if epoch >= start_epoch:
                later.append(name)
                continue
            try:
                saved = _load_checkpoint_meta(path)
            except FileProblem as err:
                _logger.warning(f'{err}; it is left out of the checkpoint history (and left as it is).')
                continue
            metric = saved.get('metric') if isinstance(saved, dict) else None
            if isinstance(metric, torch.Tensor) and metric.numel() == 1:
                metric = metric.item()
            if as_integer(saved.get('epoch') if isinstance(saved, dict) else None) != epoch \
                    or as_real(metric) is None:
                _logger.warning(f'{path}: not a checkpoint of epoch {epoch} with a metric; it is left out of the '
                                f'checkpoint history (and left as it is).')
                continue
            self.history.append((epoch, float(metric)))
        self._sort()
        if self.history:
            self.best_epoch, self.best_metric = self.history[0]
            self._duplicate(self._epoch_path(self.best_epoch), self._path('model_best'))
        if later:
            _logger.warning(f'{", ".join(later)} in {self.run_dir} are of epochs from {start_epoch} on, after the '
                            f'resumed checkpoint; they are not in the checkpoint history, and are replaced only when '
                            f'this run saves those epochs again.')
        _logger.info(f'Checkpoint history rebuilt from {self.run_dir}: {len(self.history)} file(s), best '
                     f'{self.best_metric} (epoch {self.best_epoch}).')

    def _state(self, epoch: int, metric: Optional[float], extra: Optional[dict]) -> dict:
        state = {
            'epoch': epoch, 'arch': self.args.model, 'optimizer': self.optimizer.state_dict(), 'version': 2,
            'args': self.args, 'state_dict': utils.get_state_dict(self.model, utils.unwrap_model),
        }
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = utils.get_state_dict(self.model_ema, utils.unwrap_model)
        if metric is not None:
            state['metric'] = metric
        state.update(extra or {})
        return state

    def _write(self, path: str, state: dict, epoch: int) -> None:
        out = None
        try:
            with atomic_write(path, 'wb') as f:
                out = _KeepWriteError(f)
                torch.save(state, out)
                f.flush()
                _kill_point(epoch, 'save')
        except (OSError, RuntimeError) as err:
            # torch's zip writer may turn a failed write (a full disk) into its own RuntimeError: report the OSError
            err = out.error if out is not None and out.error is not None else err
            if isinstance(err, OSError):
                raise FileProblem(os_error_line(err, path)) from None
            raise FileProblem(f'cannot write {path}: {_one_line(err)}') from None

    def _duplicate(self, src: str, dst: str) -> None:
        """``dst`` becomes a hard link to (else a copy of) ``src``, atomically."""
        try:
            if os.path.isfile(dst) and os.path.samefile(src, dst):
                return  # already (rename would leave the temporary link: both names are the same file)
            with atomic_path(dst) as tmp:
                os.unlink(tmp)
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
        except OSError as err:
            raise FileProblem(os_error_line(err, dst)) from None

    def _remove(self, epoch: int) -> None:
        path = self._epoch_path(epoch)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            _logger.warning(f'{os_error_line(err, path, "cannot remove")}; it stays.')

    def save_checkpoint(self, epoch: int, metric: Optional[float] = None, extra: Optional[dict] = None):
        """Save the state as ``last``, and as ``checkpoint-<epoch>`` (and ``model_best``) when it
        earns a place; returns ``(best_metric, best_epoch)``."""
        epoch = int(epoch)
        last = self._path('last')
        self._write(last, self._state(epoch, metric, extra), epoch)
        if metric is None:
            return self.best_metric, self.best_epoch
        metric = float(metric)
        full = len(self.history) >= self.max_history
        if not full or self._better(metric, self.history[self.max_history - 1][1]):
            for old_epoch, _ in self.history[self.max_history - 1:] if full else ():
                self._remove(old_epoch)
            if full:
                self.history = self.history[:self.max_history - 1]
            self.history = [e for e in self.history if e[0] != epoch]
            self._duplicate(last, self._epoch_path(epoch))
            self.history.append((epoch, metric))
            self._sort()
            if self.best_metric is None or self._better(metric, self.best_metric):
                self.best_epoch, self.best_metric = epoch, metric
                self._duplicate(last, self._path('model_best'))
            _logger.info('Checkpoint history: ' + ', '.join(f'{e} ({m:g})' for e, m in self.history))
        return self.best_metric, self.best_epoch


def _resume_state(path: str) -> dict:
    """What --resume restores besides timm's states, as plain data: the random number generators
    ('rng', one entry per process), the plateau schedule's state, the per-epoch counts of skipped
    training images and the unreadable files."""
    saved = _read_checkpoint(path, '--resume')
    state = {}
    rng = saved.get('rng')
    if isinstance(rng, dict):  # one process
        rng = [rng]
    if isinstance(rng, (list, tuple)):
        state['rng'] = [_clone_tensors(entry) for entry in rng]
    if isinstance(saved.get('lr_scheduler'), dict):
        state['lr_scheduler'] = _clone_tensors(saved['lr_scheduler'])
    skipped = saved.get('skipped_train_images')
    if isinstance(skipped, (list, tuple)) and all(as_integer(n) is not None for n in skipped):
        state['skipped'] = [int(n) for n in skipped]
    names = saved.get('unreadable_train_images')
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        state['unreadable'] = list(names)
    return state


def _clone_tensors(value):
    """``value`` with its tensors copied out of the (memory-mapped) checkpoint."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


def _rng_state() -> dict:
    """This process's random number generators (python, numpy, torch, the CUDA devices in use), as plain data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': (int(version), tuple(int(v) for v in internal), gauss),
        'numpy': {'name': str(name), 'keys': torch.from_numpy(np.asarray(keys, dtype=np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _rng_states(args) -> List[dict]:
    """The random number generators of every process (gathered from all ranks under DDP)."""
    state = _rng_state()
    if not args.distributed:
        return [state]
    states = [None] * args.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state['python']
    random.setstate((int(version), tuple(int(v) for v in internal), None if gauss is None else float(gauss)))
    numpy_state = state['numpy']
    np.random.set_state((str(numpy_state['name']), numpy_state['keys'].numpy().astype(np.uint32),
                         int(numpy_state['pos']), int(numpy_state['has_gauss']),
                         float(numpy_state['cached_gaussian'])))
    torch.set_rng_state(state['torch'].to(torch.uint8).cpu().clone())
    if 'cuda' in state and torch.cuda.is_available():
        cuda = list(state['cuda'])
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f'{len(cuda)} CUDA generator state(s) for {torch.cuda.device_count()} device(s)')
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu().clone() for t in cuda])


def _restore_rng(args, states) -> None:
    """Put back this process's random number generators from a checkpoint (a warning when it cannot:
    the resumed run then trains on, but does not repeat an uninterrupted one exactly)."""
    problem = None
    if not isinstance(states, list) or not states:
        problem = 'the checkpoint holds no random number generator state (made by an older timm-el-train?)'
    elif len(states) != args.world_size:
        problem = f'the checkpoint holds the generators of {len(states)} process(es), this run has {args.world_size}'
    else:
        try:
            _set_rng_state(states[args.rank])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as err:
            problem = f'its random number generator state cannot be used ({_one_line(err)})'
    if problem:
        _logger.warning(f'--resume: {problem}; this run continues, but does not repeat an uninterrupted run exactly.')
    elif utils.is_primary(args):
        _logger.info('Random number generators restored from the checkpoint.')


#: the changing state of timm's plateau schedule (torch's ReduceLROnPlateau inside it); the other
#: schedules are functions of the epoch or update count, with no state to save.
_PLATEAU_STATE = ('best', 'num_bad_epochs', 'cooldown_counter', 'last_epoch', '_last_lr')


def _scheduler_state(lr_scheduler) -> Optional[dict]:
    """The changing state of the learning-rate schedule, as plain data (None: it has none)."""
    inner = getattr(lr_scheduler, 'lr_scheduler', None)
    if inner is None:
        return None
    state = {key: getattr(inner, key) for key in _PLATEAU_STATE if hasattr(inner, key)}
    state['restore_lr'] = getattr(lr_scheduler, 'restore_lr', None)
    state['lr'] = [float(group['lr']) for group in lr_scheduler.optimizer.param_groups]
    return state


def _restore_scheduler(lr_scheduler, state) -> bool:
    """Put back the plateau schedule's state; False when there is none to put back."""
    inner = getattr(lr_scheduler, 'lr_scheduler', None)
    groups = lr_scheduler.optimizer.param_groups
    lrs = state.get('lr') if isinstance(state, dict) else None
    if inner is None or not isinstance(lrs, list) or len(lrs) != len(groups) \
            or any(as_real(lr) is None for lr in lrs):
        return False
    for key in _PLATEAU_STATE:
        if key in state:
            setattr(inner, key, state[key])
    if hasattr(lr_scheduler, 'restore_lr'):
        lr_scheduler.restore_lr = state.get('restore_lr')
    for group, lr in zip(groups, lrs):  # creating the schedule set the groups' rates anew (its warmup start)
        group['lr'] = float(lr)
    return True


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
            _logger.warning('--amp with float16 on the CPU is slow; --amp-dtype bfloat16 is the CPU\'s mixed precision.')

    loader_train, loader_eval, mixup_fn = _create_loaders(
        args, dataset_train, dataset_eval, data_config, num_classes, device)
    train_loss_fn = create_train_loss(args, args.mixup_active).to(device)
    if primary:
        _logger.info(f'Training loss (--loss {args.loss}): {train_loss_fn}; validation loss: CrossEntropyLoss.')

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
        unreadable=list(resume_state.get('unreadable', [])))


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

        skips_before = _skips_so_far(run)
        train_metrics, num_updates = train_one_epoch(
            epoch, run.model, run.loader_train, run.optimizer, run.train_loss_fn, args, run.device,
            lr_scheduler=run.lr_scheduler, model_ema=run.model_ema, amp_autocast=run.amp_autocast,
            loss_scaler=run.loss_scaler, mixup_fn=run.mixup_fn, num_updates=num_updates)
        _note_skips(args, run, epoch, skips_before)
        if distribute_bn:
            utils.distribute_bn(run.model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = validate(run.model, run.loader_eval, args, run.device, run.amp_autocast)
        if validate_ema:
            if distribute_bn:
                utils.distribute_bn(run.model_ema, args.world_size, args.dist_bn == 'reduce')
            ema_metrics = validate(run.model_ema.module, run.loader_eval, args, run.device, run.amp_autocast,
                                   log_suffix=' (EMA)')
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
                f'top-5 {eval_metrics["top5"]:.3f}{ema_text}')


def _check_writable(folder: str, flag: str) -> None:
    """``UsageError`` naming ``flag`` unless files can be made in ``folder`` (or, while it does not
    exist yet, in the nearest folder above it: nothing is made before the run starts)."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        if probe == os.path.abspath(folder):
            check_writable_dir(folder, flag)
        elif not os.path.isdir(probe):
            raise FileProblem(f'{flag} {folder}: {probe} is not a folder')
        else:
            try:
                check_writable_dir(probe)
            except FileProblem as err:
                raise FileProblem(f'{flag} {folder}: {err}') from None
    except FileProblem as err:
        raise UsageError(str(err)) from None


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
