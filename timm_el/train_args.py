"""The flags of ``timm-el-train`` (:mod:`timm_el.train`): the command-line parser (one function per
flag group), ``--config`` YAML defaults, the checks every flag gets before any work (:class:`UsageError`),
and the constants about the losses and their flags."""
import argparse
import math
import os
from typing import Optional, Sequence

import timm
import torch
import yaml
from timm import utils
from timm.optim import list_optimizers

from encouraging_loss.bonus import BonusConfig, as_integer, as_real, check_schedule
from encouraging_loss.checks import check_probability
from encouraging_loss.companion import FocalConfig, MirrorMSEConfig
from encouraging_loss.tools.files import FileProblem, load_checkpoint_safely

from .attacks import ATTACKS, TRAIN_DEFAULTS, require_torchattacks
from .factory import COMPANION_KWARGS, EL_KWARGS
from .rebalance import CRT_CHECKPOINT, resolve_crt_source

PROG = 'timm-el-train'

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


# ----------------------------------------------------------------------------- the parser


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
    _add_dataset_flags(parser)
    _add_longtail_flags(parser)
    _add_model_flags(parser)
    _add_device_flags(parser)
    _add_optimizer_flags(parser)
    _add_schedule_flags(parser)
    _add_augmentation_flags(parser)
    _add_ema_flags(parser)
    _add_loss_flags(parser)
    _add_adversarial_flags(parser)
    _add_rebalance_flags(parser)
    _add_misc_flags(parser)
    return parser


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """Where the data is: the dataset, its splits and image mode."""
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', help='path to the dataset root')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset "<type>/<name>" as timm\'s create_dataset takes it, e.g. torch/cifar10, '
                            'torch/mnist, torch/fashion_mnist; inat2018 (DIR holds train2018.json, val2018.json '
                            'and the images) or imagenet_lt (DIR holds ImageNet_LT_{train,val,test}.txt and the '
                            'images); empty: an ImageFolder (or image tar) in DIR')
    group.add_argument('--train-split', metavar='NAME', default='train', help='training split (sub-folder)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='validation split (sub-folder; validation, val, valid, eval are searched)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow torch/ datasets to download')
    group.add_argument('--class-map', default='', metavar='FILENAME', help='class to index mapping file')
    group.add_argument('--input-img-mode', default=None, metavar='MODE',
                       help='image mode the images are converted to (default: RGB for 3 input channels, L for 1)')


#: the long-tailed data flags (dests) a resumed run must keep.
LONGTAIL_FLAGS = ('long_tail_ratio', 'long_tail_max', 'long_tail_seed')


def _add_longtail_flags(parser: argparse.ArgumentParser) -> None:
    """``--long-tail-ratio`` and its flags (:func:`timm_el.longtail.long_tail_subset`; None: not given)."""
    group = parser.add_argument_group(
        'Long-tailed data (EL_SPEC 6): the exponential profile of Cao et al. 2019 on the training split')
    group.add_argument('--long-tail-ratio', type=float, default=None, metavar='R',
                       help='keep n_c = int(n_max * R^(-c / (C - 1))) training images of class c (class-index '
                            'order; a seeded random choice within each class; classes with fewer keep all theirs), '
                            'R >= 1 the imbalance ratio n_max / n_min; the validation split is unchanged '
                            '(default: the training split as it is)')
    group.add_argument('--long-tail-max', type=int, default=None, metavar='N',
                       help='n_max, the images kept of class 0, at most the largest class\'s '
                            '(default: the largest class\'s count)')
    group.add_argument('--long-tail-seed', type=int, default=None, metavar='S',
                       help='seed of the choice within each class, >= 0; independent of --seed, so every training '
                            'seed sees the same subset (default: 0)')


def _check_longtail(args) -> None:
    """``--long-tail-ratio`` a number >= 1, ``--long-tail-max`` an integer >= 1, ``--long-tail-seed`` an integer
    >= 0 (these two with ``--long-tail-ratio`` only; the seed then defaults to 0); ``--class-map`` not with
    ``--dataset inat2018`` / ``imagenet_lt`` (their files give the classes)."""
    from .longtail import is_longtail_dataset

    if is_longtail_dataset(args.dataset) and args.class_map:
        raise UsageError(f'--class-map cannot be used with --dataset {args.dataset}: its annotation files give the '
                         f'class of every image, got --class-map {args.class_map!r}')
    if args.long_tail_ratio is None:
        for dest in LONGTAIL_FLAGS[1:]:
            if getattr(args, dest) is not None:
                raise UsageError(f'{_flag(dest)} applies with --long-tail-ratio only, got {_flag(dest)} '
                                 f'{getattr(args, dest)!r}')
        return
    ratio = as_real(args.long_tail_ratio)
    if ratio is None or not math.isfinite(ratio) or ratio < 1:
        raise UsageError(f'--long-tail-ratio must be a number >= 1 (n_max / n_min), got {args.long_tail_ratio!r}')
    args.long_tail_ratio = ratio
    if args.long_tail_max is not None:
        n_max = as_integer(args.long_tail_max)
        if n_max is None or n_max < 1:
            raise UsageError(f'--long-tail-max must be an integer >= 1, got {args.long_tail_max!r}')
        args.long_tail_max = n_max
    seed = 0 if args.long_tail_seed is None else as_integer(args.long_tail_seed)
    if seed is None or seed < 0:
        raise UsageError(f'--long-tail-seed must be an integer >= 0, got {args.long_tail_seed!r}')
    args.long_tail_seed = seed


def _check_resume_longtail(args, saved) -> None:
    """A resumed run keeps the long-tailed subset it was started with (a run of a version without these
    flags trained on the whole split)."""
    _check_resume_same(args, saved, LONGTAIL_FLAGS)


def _check_resume_same(args, saved, dests) -> None:
    """``--resume`` refuses a run whose saved flags ``dests`` differ from these (unset and empty alike)."""
    for dest in dests:
        before, now = getattr(saved, dest, None), getattr(args, dest)
        if before in ('', None) and now in ('', None):
            continue
        if before != now:
            was = f'with {_flag(dest)} {before}' if before not in ('', None) else f'without {_flag(dest)}'
            now_text = f'{_flag(dest)} {now}' if now not in ('', None) else f'without {_flag(dest)}'
            raise UsageError(f'--resume {args.resume!r} was trained {was}, not {now_text}')


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, its weights (pretrained, initial, resumed), input size and batch sizes."""
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


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Device, mixed precision and the BatchNorm of several processes."""
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


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
    """timm's optimizer and gradient clipping."""
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


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    """The learning rate and its schedule over the epochs."""
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


def _add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    """Augmentation, Mixup/CutMix, label smoothing and dropout."""
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


def _add_ema_flags(parser: argparse.ArgumentParser) -> None:
    """The exponential moving average of the weights."""
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep and validate an exponential moving average of the weights (ModelEmaV3)')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU (then it is not validated)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    group.add_argument('--model-ema-warmup', action='store_true', default=False, help='EMA decay warmup')


def _add_loss_flags(parser: argparse.ArgumentParser) -> None:
    """``--loss`` and the flags of each loss (the EL flags, then the companion losses')."""
    group = parser.add_argument_group('Loss parameters (each loss\'s flags apply to that --loss only)')
    group.add_argument('--loss', default='ce', choices=LOSSES,
                       help='ce: timm\'s cross-entropy (label smoothing / soft targets as timm chooses); '
                            'encouraging: the Encouraging Loss through timm\'s create_classification_loss; '
                            'the paper\'s companion losses: focal, halted_focal (Eq. 12), mse, mse_sigmoid '
                            '(MSE with the mirror bonus, Table 5)')
    _add_el_flags(group)
    _add_companion_flags(group)


def _add_el_flags(group) -> None:
    """The Encouraging Loss flags (None: not given; their defaults come with ``--loss encouraging``)."""
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


def _add_companion_flags(group) -> None:
    """The companion losses' flags (None: not given; their defaults come with their ``--loss``)."""
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


def _add_adversarial_flags(parser: argparse.ArgumentParser) -> None:
    """Adversarial training (the paper's Table 7, EL_SPEC 6): attack every training batch with torchattacks
    (None: not given; the defaults come with --adv-train, :data:`timm_el.attacks.TRAIN_DEFAULTS`)."""
    group = parser.add_argument_group(
        'Adversarial training (EL_SPEC 6, Table 7): the loss is computed on attacked batches only, as '
        'TorchAttacks\' MNIST adversarial-training demo')
    defaults = ', '.join(f'{name} {eps:g}' for name, (eps, _, _) in TRAIN_DEFAULTS.items())
    iterative = [name for name, (_, steps, _) in TRAIN_DEFAULTS.items() if steps is not None]
    group.add_argument('--adv-train', default=None, choices=tuple(TRAIN_DEFAULTS), metavar='ATTACK',
                       help='train on each batch attacked with torchattacks, '
                            + '; '.join(f'{name}: {ATTACKS[name].about}' for name in TRAIN_DEFAULTS)
                            + '. The batch is un-normalised to [0, 1] with the data mean/std, attacked with the '
                              'model in eval mode, normalised again; not with --mixup/--cutmix '
                              '(default: clean training)')
    group.add_argument('--adv-eps', type=float, default=None, metavar='EPS',
                       help=f'attack radius in [0, 1] pixel units, > 0 (L-infinity for fgsm and pgd, at most 1; '
                            f'L2 for pgd_l2) (default: {defaults})')
    group.add_argument('--adv-steps', type=int, default=None, metavar='N',
                       help='steps of the iterative attacks ' + ', '.join(iterative) + ', >= 1 (default: '
                            + ', '.join(f'{name} {TRAIN_DEFAULTS[name][1]}' for name in iterative) + ')')
    group.add_argument('--adv-alpha', type=float, default=None, metavar='ALPHA',
                       help='step size of the iterative attacks, > 0 (default: '
                            + ', '.join(f'{name} {TRAIN_DEFAULTS[name][2]:g}' for name in iterative) + ')')


#: DRW's default beta (Cao et al. 2019, their code) and the shot-group thresholds of Kang et al. 2020.
DRW_BETA = 0.9999
SHOT_THRESHOLDS = (100, 20)
#: the long-tailed training flags (dests) a resumed run must keep.
REBALANCE_FLAGS = ('drw_epoch', 'drw_beta', 'crt_from')


def _add_rebalance_flags(parser: argparse.ArgumentParser) -> None:
    """Long-tailed training (EL_SPEC 6, Table 3 / 9; :mod:`timm_el.rebalance`): DRW, cRT and the
    many / medium / few-shot accuracies (None: not given)."""
    group = parser.add_argument_group(
        'Long-tailed training (EL_SPEC 6, Table 3/9): deferred re-weighting (DRW, Cao et al. 2019), classifier '
        're-training (cRT, Kang et al. 2020), many/medium/few-shot accuracy')
    group.add_argument('--drw-epoch', type=int, default=None, metavar='E',
                       help='from epoch E on (0-based, as the epochs of summary.csv) weigh the training loss by '
                            'class-balanced weights (1 - B) / (1 - B^n_c) of the training counts n_c, normalised '
                            'to sum to the number of classes; any --loss (default: no re-weighting)')
    group.add_argument('--drw-beta', type=float, default=None, metavar='B',
                       help=f'beta of the effective number of samples, in [0, 1); 0 = no re-weighting, near 1 = '
                            f'inverse class frequency (default: {DRW_BETA})')
    group.add_argument('--crt-from', default='', metavar='PATH',
                       help=f'classifier re-training: start from this finished run directory (its '
                            f'{CRT_CHECKPOINT}) or checkpoint file, re-initialise the classifier, freeze everything '
                            f'else (BatchNorm statistics too), train the classifier alone on class-balanced '
                            f'batches with this run\'s --epochs, --lr, --sched and --loss, into a new run directory '
                            f'(default --experiment: <source run>-crt)')
    group.add_argument('--shot-groups', action='store_true', default=False,
                       help='also report many/medium/few-shot accuracy (on by itself with a long-tailed '
                            'training set: --long-tail-ratio, --dataset inat2018 / imagenet_lt, --crt-from)')
    group.add_argument('--shot-thresholds', type=int, nargs=2, default=None, metavar=('MANY', 'FEW'),
                       help=f'with the shot groups: many-shot = more than MANY training images, few-shot = '
                            f'fewer than FEW, medium = the rest '
                            f'(default: {SHOT_THRESHOLDS[0]} {SHOT_THRESHOLDS[1]}, Kang et al. 2020)')


def _add_misc_flags(parser: argparse.ArgumentParser) -> None:
    """Seed, logging, checkpoints, loader workers, the run directory and records."""
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


# ----------------------------------------------------------------------------- parsing and checks


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


#: the adversarial-training flags (dests), in the order of :data:`timm_el.attacks.TRAIN_DEFAULTS`' tuples.
ADV_FLAGS = ('adv_train', 'adv_eps', 'adv_steps', 'adv_alpha')


def _check_adversarial(args) -> None:
    """The adversarial-training flags (EL_SPEC 6, Table 7): ``--adv-eps/--adv-steps/--adv-alpha`` need
    ``--adv-train`` (steps and alpha an iterative attack), the unset ones get the attack's
    :data:`~timm_el.attacks.TRAIN_DEFAULTS`; refused with Mixup/CutMix (soft targets cannot be attacked)."""
    name = args.adv_train
    if name is None:
        for dest in ADV_FLAGS[1:]:
            if getattr(args, dest) is not None:
                raise UsageError(f'{_flag(dest)} applies with --adv-train only (adversarial training)')
        return
    eps, steps, alpha = TRAIN_DEFAULTS[name]
    if steps is None:  # FGSM: one step of size eps
        for dest in ('adv_steps', 'adv_alpha'):
            if getattr(args, dest) is not None:
                iterative = ' or '.join(n for n, d in TRAIN_DEFAULTS.items() if d[1] is not None)
                raise UsageError(f'{_flag(dest)} applies to --adv-train {iterative} only, not --adv-train {name} '
                                 f'(one step of size --adv-eps)')
    for dest, default in zip(ADV_FLAGS[1:], (eps, steps, alpha)):
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    linf = ATTACKS[name].norm == 'Linf'
    value = as_real(args.adv_eps)
    if value is None or not math.isfinite(value) or value <= 0 or (linf and value > 1):
        what = 'in (0, 1] (L-infinity, pixel values in [0, 1])' if linf else 'a number > 0 (L2, pixel units)'
        raise UsageError(f'--adv-eps must be {what}, got {args.adv_eps!r}')
    args.adv_eps = value
    if args.adv_steps is not None:
        value = as_integer(args.adv_steps)
        if value is None or value < 1:
            raise UsageError(f'--adv-steps must be an integer >= 1, got {args.adv_steps!r}')
        args.adv_steps = value
    if args.adv_alpha is not None:
        value = as_real(args.adv_alpha)
        if value is None or not math.isfinite(value) or value <= 0:
            raise UsageError(f'--adv-alpha must be a number > 0, got {args.adv_alpha!r}')
        args.adv_alpha = value
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        flag = '--mixup' if args.mixup > 0 else '--cutmix' if args.cutmix > 0 else '--cutmix-minmax'
        raise UsageError(f'--adv-train {name} cannot be used with {flag}: torchattacks attacks hard labels, '
                         f'not the soft targets of Mixup/CutMix')
    try:
        require_torchattacks()
    except ImportError as err:
        raise UsageError(f'--adv-train {name}: {_one_line(err)}') from None


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
        _check_adversarial(args)
        _check_rebalance_numbers(args)
        _check_longtail(args)
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
    _check_crt(args)
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
    if saved is not None:  # DRW and cRT as they were (a run of a version without them had neither)
        _check_resume_rebalance(args, saved)
    if saved is not None:  # the attack settings (a run of a version without them trained on clean batches)
        _check_resume_attack(args, saved)
    if saved is not None:  # the same long-tailed training subset
        _check_resume_longtail(args, saved)


def _check_resume_attack(args, saved) -> None:
    """A resumed run goes on with the adversarial training it was started with (``--adv-*`` as resolved)."""
    before_name, name = getattr(saved, 'adv_train', None), args.adv_train
    if before_name != name:
        was = f'with --adv-train {before_name}' if before_name else 'without --adv-train (clean batches)'
        now = f'--adv-train {name}' if name else 'without --adv-train'
        raise UsageError(f'--resume {args.resume!r} was trained {was}, not {now}')
    if name is None:
        return
    for dest in ADV_FLAGS[1:]:
        before, now = getattr(saved, dest, None), getattr(args, dest)
        if before != now:
            raise UsageError(f'--resume {args.resume!r} was trained with --adv-train {name} {_flag(dest)} {before}, '
                             f'not {_flag(dest)} {now}')


def _check_rebalance_numbers(args) -> None:
    """The DRW and shot-group flags: ``--drw-epoch`` an integer >= 0 before ``--epochs``, ``--drw-beta``
    (with ``--drw-epoch`` only) in [0, 1), ``--shot-thresholds MANY FEW`` integers with 0 <= FEW <= MANY;
    the unset ones get their defaults."""
    if args.drw_epoch is None:
        if args.drw_beta is not None:
            raise UsageError(f'--drw-beta applies with --drw-epoch only (deferred re-weighting), got '
                             f'--drw-beta {args.drw_beta!r}')
    else:
        epoch = as_integer(args.drw_epoch)
        if epoch is None or epoch < 0:
            raise UsageError(f'--drw-epoch must be an integer >= 0, got {args.drw_epoch!r}')
        if epoch >= as_integer(args.epochs):
            raise UsageError(f'--drw-epoch {epoch} is not before --epochs {args.epochs}: the re-weighting would '
                             f'never start')
        args.drw_epoch = epoch
        beta = DRW_BETA if args.drw_beta is None else as_real(args.drw_beta)
        if beta is None or not math.isfinite(beta) or not 0 <= beta < 1:
            raise UsageError(f'--drw-beta must be in [0, 1), got {args.drw_beta!r}')
        args.drw_beta = beta
    if args.shot_thresholds is None:
        args.shot_thresholds = list(SHOT_THRESHOLDS)
    else:
        values = args.shot_thresholds
        numbers = [as_integer(v) for v in values] if isinstance(values, (list, tuple)) else [None]
        if len(numbers) != 2 or any(n is None or n < 0 for n in numbers) or numbers[1] > numbers[0]:
            raise UsageError(f'--shot-thresholds must be two integers MANY FEW with 0 <= FEW <= MANY, got {values!r}')
        args.shot_thresholds = numbers


def _check_crt(args) -> None:
    """``--crt-from``: a finished run directory (its ``last.pth.tar``) or a checkpoint of the same ``--model``,
    read with ``weights_only=True``; normalised to the checkpoint file's absolute path. Refused with
    ``--drw-epoch`` (cRT balances by sampling: weights too would count the balance twice), ``--adv-train``,
    ``--initial-checkpoint`` and ``--pretrained`` (the weights come from the source run). With ``--resume``
    the source is not read again (the resumed checkpoint holds every weight)."""
    path = args.crt_from
    if not path:
        return
    for flag, given in (('--drw-epoch', args.drw_epoch is not None), ('--adv-train', args.adv_train is not None),
                        ('--initial-checkpoint', bool(args.initial_checkpoint)), ('--pretrained', args.pretrained)):
        if given:
            why = {'--drw-epoch': 'cRT balances the classes by sampling; re-weighting too would count the balance '
                                  'twice',
                   '--adv-train': 'cRT re-trains the classifier on clean, class-balanced batches'}.get(
                flag, 'the weights come from the --crt-from run')
            raise UsageError(f'--crt-from cannot be used with {flag}: {why}')
    if args.resume and not os.path.exists(path):
        args.crt_from = os.path.abspath(path)
        return
    try:
        source = resolve_crt_source(path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    args.crt_from = os.path.abspath(source)
    if args.resume:
        return
    checkpoint = _read_checkpoint(source, '--crt-from')
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise UsageError(f'--crt-from {path!r}: not a checkpoint with model weights (no state_dict)')
    saved = checkpoint.get('args')
    before = getattr(saved, 'model', None) or checkpoint.get('arch')
    if before is not None and before != args.model:
        raise UsageError(f'--crt-from {path!r} was trained with --model {before}, not --model {args.model}')
    if not args.experiment:
        run = os.path.basename(os.path.dirname(args.crt_from))
        args.experiment = f'{run}-crt' if run else ''


def _check_resume_rebalance(args, saved) -> None:
    """A resumed run keeps its DRW settings and its cRT source."""
    before, now = getattr(saved, 'crt_from', None), args.crt_from
    if before and now and before == os.path.join(now, CRT_CHECKPOINT):  # the run directory given, its file saved
        args.crt_from = before
    _check_resume_same(args, saved, REBALANCE_FLAGS)


def _yaml_safe(value):
    """``value`` with tuples turned into lists, for ``yaml.safe_dump``."""
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    return value
