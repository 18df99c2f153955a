""" One run of an image recipe: the paper's flags, ``timm-el-train``, skip / resume

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022: the image rows of EL_SPEC section 4,
as presets of the project's training CLI (:mod:`timm_el.train`). The recipe
scripts (``scripts/imagenet_efficientnet_b0.sh``, ``imagenet_resnet50.sh``,
``cifar.sh``, ``mnist.sh``, sharing ``scripts/lib/image_recipe.sh``) sequence
the runs; every decision is made here::

    python -m timm_el.recipe check PRESET --work WORK --losses ce el --seeds 1 2 [options] [-- CLI flags]
    python -m timm_el.recipe train PRESET --work WORK --loss el --seed 1 [options] [-- CLI flags]

``check`` validates every option and the final training command of each
loss (with :func:`timm_el.train.parse_args`, so a bad value in the flags after
``--`` is refused too) and creates nothing. ``train`` runs one training run
in ``WORK/runs/<loss>-seed<seed>/`` (``--output WORK/runs --experiment
<loss>-seed<seed>``):

* **finished** (``eval/last.json`` holds an ``el-result/1`` record): skipped;
* **interrupted** (``last.pth.tar`` exists): continued with ``--resume
  WORK/runs/<run>/last.pth.tar`` (the CLI checks that it is the same model and loss);
  a damaged ``eval/last.json`` (cut off by a crash or a full disk) does not count as finished:
  the run is resumed, which writes its records again;
* a directory left without a checkpoint (stopped in its first epoch) is moved
  aside to ``<run>.incomplete[-N]`` and the run starts again: the CLI never
  writes into an existing directory unless resuming;
* otherwise a new run.

**Batch.** Each preset fixes the paper's *global* batch; the per-process
``-b`` is that divided by ``--gpus x --nodes`` (refused when it does not
divide). ``-b`` after ``--`` sets the per-process batch yourself.

**Several GPUs / machines** (``--gpus N``, ``--nodes M``): the command goes
through ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N
--nnodes M --node_rank R --master_addr HOST --master_port PORT -m
timm_el.train ...``); with several machines run the recipe on each, WORK on
storage they share.

**Extra flags** after ``--`` go to ``timm-el-train`` and replace the preset's
flag of the same option (``-b`` and ``--batch-size`` are one option, as are
``--drop-connect`` and ``--drop-path``); Encouraging Loss flags among them
(``--bonus-rho``, ``--defer-start``, ...) go to the EL runs only. The options
the recipe sets itself (``--data-dir``, ``--dataset``, ``--loss``, ``--seed``,
``--output``, ``--experiment``, ``--resume``, ``--task-name``) are refused there.
"""
import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from encouraging_loss.tools import cli
from encouraging_loss.tools.cli import Parser, split_extra
from encouraging_loss.tools.files import FileProblem, check_writable_dir, read_json

__all__ = [
    'PRESETS', 'LOSSES', 'Preset', 'RecipeError', 'flag_groups', 'merge_flags', 'record_problem', 'run_state',
    'per_process_batch',
    'train_arguments', 'launch_command', 'check', 'train', 'build_parser', 'main',
]

PROG = 'timm_el.recipe'
#: recipe loss label -> ``timm-el-train --loss``
LOSSES = {'ce': 'ce', 'el': 'encouraging'}
#: options of ``timm-el-train`` that the recipe sets (refused after ``--``), by argparse dest.
RESERVED = {
    'data': '--data', 'data_dir': '--data', 'dataset': '--dataset', 'loss': '--losses', 'seed': '--seeds',
    'output': '--work', 'experiment': '--work', 'resume': None, 'task_name': None, 'config': None,
}
#: Encouraging Loss options of ``timm-el-train`` (given to the EL runs only).
EL_DESTS = ('log_end', 'bonus', 'bonus_start', 'bonus_gamma', 'bonus_rho', 'bonus_smoothing', 'defer_start',
            'bonus_schedule', 'bonus_schedule_rate')


class RecipeError(ValueError):
    """A bad option of the recipe (reported as one line, exit status 2)."""


@dataclass(frozen=True)
class Preset:
    """The paper's setting of one image recipe (EL_SPEC 4).

    Attributes:
        flags: ``timm-el-train`` flags, without ``-b``, the data and the run's own options.
        global_batch: the batch of one optimizer step over all processes.
        dataset: the default ``--dataset`` ('' is an ImageFolder).
        datasets: the ``--dataset`` values allowed (empty: any of timm's forms).
        models: the ``--model`` values the recipe offers (empty: the preset's only).
        num_classes: ``--num-classes`` by dataset (omitted when absent).
        task_prefix: the result records' task before the model name (default: from the dataset).
        smoke: ``--smoke``: flags merged over ``flags`` (under the ones after ``--``) for a short CPU run that
            learns something visible, not a result: few epochs, a small batch (``-b``, per process), no warmup,
            and for the large models a small image size. Its records name the task ``<task>_smoke``.
    """
    flags: Tuple[str, ...]
    global_batch: int
    dataset: str = ''
    datasets: Tuple[str, ...] = ()
    models: Tuple[str, ...] = ()
    num_classes: Dict[str, int] = field(default_factory=dict)
    task_prefix: str = ''
    smoke: Tuple[str, ...] = ()

    @property
    def model(self) -> str:
        flags = list(self.flags)
        return flags[flags.index('--model') + 1]

    def task(self, dataset: str, model: str) -> str:
        """The ``task`` of the run's result records: ``imagenet_resnet50``, ``cifar100_efficientnet_b0``, ``mnist``."""
        prefix = self.task_prefix or dataset.rpartition('/')[2].lower()
        return prefix if model == 'mnist_cnn' and prefix == 'mnist' else f'{prefix}_{model}'

    def smoke_task(self, dataset: str, model: str) -> str:
        """The task of a ``--smoke`` run's records: ``mnist_smoke``, ``imagenet_resnet50_smoke``."""
        return self.task(dataset, model) + '_smoke'


_EFFNET_B0 = (
    # the release's command (imagenet-efficientnetb0/readme.sh, timm's efficientnet_b0 recipe), 2 GPUs x 384
    '--model', 'efficientnet_b0', '--sched', 'step', '--epochs', '450', '--decay-epochs', '2.4',
    '--decay-rate', '.97', '--opt', 'rmsproptf', '--opt-eps', '.001', '-j', '8', '--warmup-lr', '1e-6',
    '--weight-decay', '1e-5', '--drop', '0.2', '--drop-connect', '0.2', '--model-ema', '--model-ema-decay', '0.9999',
    '--aa', 'rand-m9-mstd0.5', '--remode', 'pixel', '--reprob', '0.2', '--amp', '--lr', '.048',
    # the defaults of the timm train.py it ran (0.4.x) where today's differ
    '--warmup-epochs', '3', '--cooldown-epochs', '10', '--min-lr', '1e-5', '--smoothing', '0.1',
)
_TORCHVISION_EVAL = ('--crop-pct', '0.875', '--interpolation', 'bilinear', '--train-interpolation', 'bilinear')

PRESETS: Dict[str, Preset] = {
    'imagenet_efficientnet_b0': Preset(flags=_EFFNET_B0, global_batch=768, task_prefix='imagenet', smoke=(
        '--epochs', '1', '--img-size', '64', '-b', '64', '--lr', '.004', '--warmup-epochs', '0',
        '--cooldown-epochs', '0')),
    # torchvision's ImageNet example (the release's imagenet-resnet50/main.py): SGD 0.1, momentum 0.9,
    # wd 1e-4, 256 images a step, x0.1 every 30 epochs, random-resized crop and flip only
    'imagenet_resnet50': Preset(flags=(
        '--model', 'resnet50', '--epochs', '90', '--sched', 'step', '--decay-epochs', '30', '--decay-rate', '0.1',
        '--opt', 'momentum', '--momentum', '0.9', '--weight-decay', '1e-4', '--lr', '0.1', '--warmup-epochs', '0',
        '--smoothing', '0', '--color-jitter', '0', '-j', '8', *_TORCHVISION_EVAL,
    ), global_batch=256, task_prefix='imagenet',
        smoke=('--epochs', '1', '--img-size', '64', '-b', '64', '--lr', '0.025')),
    # the release's cifar/configs/cifar{10,100}.yaml: 224 px, SGD 0.0125 nesterov, wd 1e-4, batch 32,
    # 90 epochs, x0.1 at 30/60/80; RandomResizedCrop(224) and flip, Resize(256) + CenterCrop(224), CIFAR mean/std
    'cifar': Preset(flags=(
        '--model', 'resnet50', '--img-size', '224', '--epochs', '90', '--sched', 'multistep',
        '--decay-milestones', '30', '60', '80', '--decay-rate', '0.1', '--opt', 'nesterov', '--momentum', '0.9',
        '--weight-decay', '1e-4', '--lr', '0.0125', '--warmup-epochs', '0', '--smoothing', '0',
        '--color-jitter', '0', '--mean', '0.4914', '0.4822', '0.4465', '--std', '0.2470', '0.2435', '0.2616',
        *_TORCHVISION_EVAL,
    ), global_batch=32, dataset='torch/cifar10', datasets=('torch/cifar10', 'torch/cifar100'),
        models=('resnet50', 'efficientnet_b0'), num_classes={'torch/cifar10': 10, 'torch/cifar100': 100},
        smoke=('--epochs', '1', '--img-size', '32', '-b', '64', '--lr', '0.025')),
    # the release's train_mnist.py: SGD 0.1, momentum 0.9, batch 256, 100 epochs, x0.1 at epochs 51 and 65
    # (counted from 1; iterations 12k and 15k of Liu et al. 2016), no augmentation; wd 5e-4 as EL_SPEC 4
    'mnist': Preset(flags=(
        '--model', 'mnist_cnn', '--epochs', '100', '--opt', 'momentum', '--momentum', '0.9', '--weight-decay', '5e-4',
        '--lr', '0.1', '--sched', 'multistep', '--decay-milestones', '50', '64', '--decay-rate', '0.1',
        '--warmup-epochs', '0', '--smoothing', '0', '--no-aug',
    ), global_batch=256, task_prefix='mnist', smoke=(
        '--epochs', '1', '-b', '64', '--lr', '0.05', '--model-kwargs', 'stem_width=16', 'widths=(16,32,32)',
        'depths=(1,1,1)', 'feature_dim=64')),
    # the robustness experiments (EL_SPEC 6): TorchAttacks' MNIST demos, their CNN (mnist_ta_cnn, inputs in
    # [0, 1] not normalised), Adam lr 1e-3, batch 128, 5 epochs, no augmentation, constant learning rate;
    # adversarial training adds --adv-train (timm_el.robustness sets it per column)
    'mnist_robustness': Preset(flags=(
        '--model', 'mnist_ta_cnn', '--epochs', '5', '--opt', 'adam', '--lr', '1e-3', '--weight-decay', '0',
        '--sched', 'none', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--smoothing', '0', '--no-aug',
    ), global_batch=128, task_prefix='mnist_robustness', smoke=('--epochs', '1')),
    # imbalanced classification (EL_SPEC 6, Table 3; timm_el.longtail_recipe, scripts/inat2018.sh): Kang et al.
    # 2020's iNaturalist18 representation stage (classifier-balancing's feat_uniform.yaml and dataloader):
    # ResNet-50 from scratch, SGD lr 0.2 momentum 0.9 wd 1e-4, batch 512, cosine to 0, RandomResizedCrop(224) and
    # flip only, Resize(256) + CenterCrop(224), their iNaturalist mean/std; 200 epochs (the EL release's runs)
    'inat2018': Preset(flags=(
        '--model', 'resnet50', '--epochs', '200', '--sched', 'cosine', '--min-lr', '0', '--opt', 'momentum',
        '--momentum', '0.9', '--weight-decay', '1e-4', '--lr', '0.2', '--warmup-epochs', '0', '--cooldown-epochs',
        '0', '--smoothing', '0', '--color-jitter', '0', '--mean', '0.466', '0.471', '0.380', '--std', '0.195',
        '0.194', '0.192', '-j', '16', *_TORCHVISION_EVAL,
    ), global_batch=512, dataset='inat2018', datasets=('inat2018',), task_prefix='inat2018', smoke=(
        '--epochs', '2', '--img-size', '64', '-b', '16', '--lr', '0.02', '-j', '2')),
    # the CPU-sized long-tailed recipe (timm_el.longtail_recipe, scripts/longtail_small.sh): Fashion-MNIST at
    # ratio 100 (1000 ... 10 training images a class), a narrow mnist_cnn (BatchNorm: the normal bonus at lr 0.1
    # killed the BatchNorm-free mnist_ta_cnn in its first epoch), SGD with a cosine schedule, 16 epochs (sized so
    # that the table's 3 x 10 runs fit well under an hour on 2 CPU cores; each epoch also evaluates the full
    # balanced test set, the validation set)
    'longtail_small': Preset(flags=(
        '--model', 'mnist_cnn', '--model-kwargs', 'stem_width=16', 'widths=(16,32,32)', 'depths=(1,1,1)',
        'feature_dim=64', '--epochs', '16', '--opt', 'momentum', '--momentum', '0.9', '--weight-decay', '5e-4',
        '--lr', '0.1', '--sched', 'cosine', '--min-lr', '0', '--warmup-epochs', '0', '--cooldown-epochs', '0',
        '--smoothing', '0', '--no-aug', '-j', '0', '-vb', '500', '--log-interval', '100',
        '--long-tail-ratio', '100', '--long-tail-max', '1000',
    ), global_batch=64, dataset='torch/fashion_mnist', datasets=('torch/fashion_mnist', 'torch/mnist'),
        task_prefix='longtail', smoke=('--epochs', '2', '--long-tail-max', '150')),
}


# ----------------------------------------------------------------------------- flags


def _cli_parser():
    from timm_el.train import build_parser
    return build_parser()


#: what a stray value in timm-el-train flags most likely is
_STRAY = " (the data directory is the recipe's --data)"


def flag_groups(tokens: Sequence[str], parser: argparse.ArgumentParser, where: str = '') -> List[Tuple[str, List[str]]]:
    """Split ``timm-el-train`` flags into ``(dest, tokens)`` groups using its own parser
    (:func:`encouraging_loss.tools.cli.flag_groups`); :class:`RecipeError` on an unknown option or a stray value."""
    return cli.flag_groups(tokens, parser, program='timm-el-train', where=where, stray_hint=_STRAY, error=RecipeError)


def merge_flags(base: Sequence[str], extra: Sequence[str], parser: argparse.ArgumentParser) -> List[str]:
    """``base`` with each option of ``extra`` replacing the same option in it (else appended)."""
    return cli.merge_flags(base, extra, parser, program='timm-el-train', stray_hint=_STRAY, error=RecipeError)


def per_process_batch(global_batch: int, world: int) -> int:
    """The per-process ``-b`` that keeps the paper's global batch (``RecipeError`` if it does not divide)."""
    if global_batch % world:
        raise RecipeError(f'the paper\'s batch of {global_batch} does not divide over {world} processes '
                          f'(--gpus x --nodes); set the per-process batch with -- -b N')
    return global_batch // world


# ----------------------------------------------------------------------------- runs


def record_problem(run_dir: Path) -> Optional[str]:
    """Why ``run_dir/eval/last.json`` is not a finished run's record (one line), or None when it is one.

    A file that is there but damaged (empty, truncated, NUL bytes, not an ``el-result/1`` object)
    is a problem, not a finished run: a crash or a full disk while it was written leaves one."""
    path = Path(run_dir) / 'eval' / 'last.json'
    if not path.is_file():
        return f'{path} was not written'
    try:
        record = read_json(path, 'result record')
    except FileProblem as err:
        return str(err)
    if record.get('schema') != 'el-result/1':
        return f'result record {path}: its schema is {record.get("schema")!r}, not \'el-result/1\''
    return None


def run_state(run_dir: Path) -> str:
    """``finished`` (eval/last.json holds a result record), ``resume`` (last.pth.tar), ``incomplete``
    (a directory without a checkpoint) or ``new``."""
    run_dir = Path(run_dir)
    if record_problem(run_dir) is None:
        return 'finished'
    if (run_dir / 'last.pth.tar').is_file():
        return 'resume'
    if run_dir.exists():
        return 'incomplete'
    return 'new'


def _aside(run_dir: Path, error=None) -> Path:
    """Move a run directory without a checkpoint aside (``<name>.incomplete[-k]``) so that it starts again;
    ``error`` (default :class:`RecipeError`) with one line when it cannot be moved."""
    target = run_dir.with_name(run_dir.name + '.incomplete')
    k = 1
    while target.exists():
        k += 1
        target = run_dir.with_name(f'{run_dir.name}.incomplete-{k}')
    try:
        run_dir.rename(target)
    except OSError as err:
        raise (error or RecipeError)(f'{run_dir} holds no checkpoint and cannot be moved aside to {target.name}: '
                          f'{err.strerror or err}') from None
    return target


def train_arguments(preset_name: str, *, work, loss: str, seed: int, data: Optional[str], dataset: Optional[str],
                    model: Optional[str], download: bool, log_end: Optional[float], world: int,
                    extra: Sequence[str] = (), resume: Optional[str] = None,
                    parser: Optional[argparse.ArgumentParser] = None, smoke: bool = False) -> List[str]:
    """The ``timm-el-train`` arguments of one run (:class:`RecipeError` on a bad option); ``smoke``: the
    preset's :attr:`Preset.smoke` flags over its own (the ones after ``--`` still win), task ``<task>_smoke``."""
    if preset_name not in PRESETS:
        raise RecipeError(f'unknown preset {preset_name!r} ({", ".join(PRESETS)})')
    if loss not in LOSSES:
        raise RecipeError(f'--loss: unknown loss {loss!r} ({", ".join(LOSSES)})')
    preset = PRESETS[preset_name]
    parser = parser or _cli_parser()
    dataset = preset.dataset if dataset is None else dataset
    if preset.datasets and dataset not in preset.datasets:
        raise RecipeError(f'--dataset: {dataset!r} is not one of {", ".join(preset.datasets)}')
    if model is not None and model not in (preset.models or (preset.model,)):
        raise RecipeError(f'--model: {model!r} is not one of {", ".join(preset.models or (preset.model,))} '
                          '(another timm model: -- --model NAME)')
    if not data:
        raise RecipeError('--data: the dataset directory is required')
    if log_end is not None and loss != 'el':
        log_end = None
    extra_groups = flag_groups(extra, parser, where='-- ')
    for dest, group in extra_groups:
        if dest in RESERVED:
            hint = f'; use the recipe\'s {RESERVED[dest]}' if RESERVED[dest] else ''
            raise RecipeError(f'-- {group[0].split("=")[0]}: set by the recipe{hint}')
    # EL flags after -- apply to the EL runs only
    extra = [tok for dest, group in extra_groups if loss == 'el' or dest not in EL_DESTS for tok in group]
    base = list(preset.flags)
    if smoke:
        base = merge_flags(base, preset.smoke, parser)
    if model is not None:
        base = merge_flags(base, ['--model', model], parser)
    if not any(dest == 'batch_size' for dest, _ in flag_groups(base, parser) + extra_groups):
        base += ['-b', str(per_process_batch(preset.global_batch, world))]
    if dataset in preset.num_classes:
        base += ['--num-classes', str(preset.num_classes[dataset])]
    if loss == 'el':
        base += ['--log-end', repr(float(log_end)) if log_end is not None else '0.75']
    flags = merge_flags(base, extra, parser)
    final_model = flags[flags.index('--model') + 1] if '--model' in flags else preset.model
    run = f'{loss}-seed{seed}'
    args = ['--data-dir', str(data)]
    if dataset:
        args += ['--dataset', dataset]
    if download:
        args += ['--dataset-download']
    args += flags + ['--loss', LOSSES[loss], '--seed', str(seed), '--output', str(Path(work) / 'runs'),
                     '--experiment', run,
                     '--task-name', (preset.smoke_task if smoke else preset.task)(dataset, final_model)]
    if resume:
        args += ['--resume', str(resume)]
    return args


def launch_command(args: Sequence[str], *, gpus: int = 1, nodes: int = 1, node_rank: int = 0,
                   master_addr: str = '127.0.0.1', master_port: int = 29500, python: str = sys.executable
                   ) -> List[str]:
    """``python -m timm_el.train ARGS``, or through torchrun with several processes."""
    if gpus * nodes == 1:
        return [python, '-m', 'timm_el.train', *args]
    return [python, '-m', 'torch.distributed.run', '--nproc_per_node', str(gpus), '--nnodes', str(nodes),
            '--node_rank', str(node_rank), '--master_addr', master_addr, '--master_port', str(master_port),
            '-m', 'timm_el.train', *args]


def _check_distributed(gpus, nodes, node_rank, master_port) -> int:
    if gpus < 1:
        raise RecipeError(f'--gpus must be an integer >= 1, got {gpus}')
    if nodes < 1:
        raise RecipeError(f'--nodes must be an integer >= 1, got {nodes}')
    if not 0 <= node_rank < nodes:
        raise RecipeError(f'--node-rank must be in [0, {nodes - 1}] with --nodes {nodes}, got {node_rank}')
    if not 1 <= master_port <= 65535:
        raise RecipeError(f'--master-port must be in [1, 65535], got {master_port}')
    return gpus * nodes


def _common(opts) -> dict:
    return dict(work=opts.work, data=opts.data, dataset=opts.dataset, model=opts.model, download=opts.download,
                log_end=opts.log_end, smoke=getattr(opts, 'smoke', False))


def check(opts, extra: Sequence[str]) -> None:
    """Every option and each loss's full training command, checked by the CLI's own parser; creates nothing."""
    from timm_el.train import UsageError, parse_args

    world = _check_distributed(opts.gpus, opts.nodes, opts.node_rank, opts.master_port)
    if opts.log_end is not None and 'el' not in opts.losses:
        raise RecipeError(f'--log-end applies to the el runs, but --losses is {" ".join(opts.losses)!r}')
    parser = _cli_parser()
    for loss in opts.losses:
        for seed in opts.seeds:
            args = train_arguments(opts.preset, loss=loss, seed=seed, world=world, extra=extra, parser=parser,
                                   **_common(opts))
            try:
                parse_args(args, _cli_parser())
            except UsageError as err:
                raise RecipeError(f'timm-el-train: {err}') from None
            except SystemExit:  # argparse has printed its one line (timm-el-train: error: ...)
                raise SystemExit(2) from None


def train(opts, extra: Sequence[str]) -> int:
    """One run: skip it if finished, resume it if interrupted, else start it. Returns the exit status."""
    world = _check_distributed(opts.gpus, opts.nodes, opts.node_rank, opts.master_port)
    run = f'{opts.loss}-seed{opts.seed}'
    run_dir = Path(opts.work) / 'runs' / run
    state = run_state(run_dir)
    if state == 'finished':
        _say(f'{run}: finished ({run_dir / "eval" / "last.json"} exists), skipping')
        return 0
    if not opts.dry_run:  # a read-only --work fails now, in one line
        try:
            check_writable_dir(Path(opts.work) / 'runs', '--work')
        except FileProblem as err:
            raise RecipeError(str(err)) from None
    damaged = (run_dir / 'eval' / 'last.json').is_file()
    resume = None
    if state == 'resume':
        resume = run_dir / 'last.pth.tar'
        if damaged:
            _say(f'{run}: {record_problem(run_dir)}; resuming from {resume} to write it again')
        else:
            _say(f'{run}: interrupted, resuming from {resume}')
    elif state == 'incomplete' and not opts.dry_run:
        if opts.node_rank == 0:
            _say(f'{run}: {run_dir} holds no checkpoint; moved aside to {_aside(run_dir)}, starting again')
    args = train_arguments(opts.preset, loss=opts.loss, seed=opts.seed, world=world, extra=extra, resume=resume,
                           **_common(opts))
    cmd = launch_command(args, gpus=opts.gpus, nodes=opts.nodes, node_rank=opts.node_rank,
                         master_addr=opts.master_addr, master_port=opts.master_port)
    _say(f'{run}: {shlex.join(cmd)}')
    if opts.dry_run:
        return 0
    code = subprocess.call(cmd)
    if code != 0:
        _say(f'{run}: training stopped with exit status {code}; run the recipe again to resume it')
        return code
    if opts.node_rank == 0 and run_state(run_dir) != 'finished':
        _say(f'{run}: training ended but {record_problem(run_dir)}')
        return 1
    return 0


def _say(line: str) -> None:
    sys.stderr.write(f'== {line}\n')
    sys.stderr.flush()


# ----------------------------------------------------------------------------- command line


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'{text!r} is negative')
    return value


def _list(kind):
    """Space- or comma-separated values (``"1 2,3"``)."""
    def parse(text: str):
        return [kind(v) for v in text.replace(',', ' ').split()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=(
        'One run of an image recipe of the Encouraging Loss paper (EL_SPEC 4) with timm-el-train: the '
        'paper\'s flags, skip a finished run, resume an interrupted one. Used by scripts/*.sh.'))
    sub = parser.add_subparsers(dest='command', required=True, parser_class=Parser)

    def common(p):
        p.add_argument('preset', choices=tuple(PRESETS), help='the recipe')
        p.add_argument('--work', required=True, help='runs go to WORK/runs/<loss>-seed<seed>/')
        p.add_argument('--data', default=None, help='the dataset directory (ImageFolder root, or the root of a '
                                                    'torch/ dataset)')
        p.add_argument('--dataset', default=None, help='timm --dataset form (default: the preset\'s)')
        p.add_argument('--model', default=None, help='the model, where the preset offers a choice')
        p.add_argument('--download', action='store_true', help='allow torch/ datasets to download')
        p.add_argument('--log-end', type=float, default=None, help='EL\'s log_end (default: 0.75)')
        p.add_argument('--gpus', type=int, default=1, help='processes (GPUs) per machine')
        p.add_argument('--nodes', type=int, default=1, help='machines')
        p.add_argument('--node-rank', type=int, default=0, help='this machine\'s rank')
        p.add_argument('--master-addr', default='127.0.0.1', help='the rank-0 machine')
        p.add_argument('--master-port', type=int, default=29500, help='its port')
        p.add_argument('--smoke', action='store_true',
                       help='a short CPU run that checks the recipe, not a result: the preset\'s smoke flags '
                            '(timm_el.recipe.PRESETS[...].smoke: few epochs, a small batch and model or image '
                            'size); the records name the task <task>_smoke')

    p = sub.add_parser('check', help='check the options and every run\'s command; create nothing')
    common(p)
    p.add_argument('--losses', type=_list(str), default=['ce', 'el'], help='losses (ce, el)')
    p.add_argument('--seeds', type=_list(_nonneg_int), default=[1], help='seeds')
    p = sub.add_parser('train', help='run (or skip, or resume) one run')
    common(p)
    p.add_argument('--loss', choices=tuple(LOSSES), required=True, help='ce or el')
    p.add_argument('--seed', type=_nonneg_int, required=True, help='the run\'s seed')
    p.add_argument('--dry-run', action='store_true', help='print the command only')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        if opts.command == 'check':
            for loss in opts.losses:
                if loss not in LOSSES:
                    raise RecipeError(f'--losses: unknown loss {loss!r} ({", ".join(LOSSES)})')
            check(opts, extra)
            return 0
        return train(opts, extra)
    except RecipeError as err:
        parser.error(str(err))


if __name__ == '__main__':
    sys.exit(main())
