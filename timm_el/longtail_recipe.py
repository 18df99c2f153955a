""" Imbalanced classification: the decisions of ``scripts/longtail_small.sh`` and ``scripts/inat2018.sh``

The long-tailed experiments of Zhao et al., AAAI 2022 (Table 3 / Table 9; EL_SPEC 6): one representation
run per row of the paper's table, a second classifier re-training stage (cRT, Kang et al. 2020) for two of
them, and the table of All / Many / Medium / Few accuracy beside the paper's numbers. Two recipes
(:data:`RECIPES`):

* ``inat2018``: the paper's setting. iNaturalist 2018 in its official layout (``--dataset inat2018``),
  ResNet-50 from scratch with Kang et al. 2020's schedule (their ``config/iNaturalist18/feat_uniform.yaml``:
  SGD momentum 0.9, lr 0.2, weight decay 1e-4, batch 512, cosine to 0; 200 epochs as the EL release's
  iNaturalist commands), cRT as their ``cls_crt.yaml`` (30 epochs, the same optimiser and schedule,
  class-balanced sampling, features frozen), DRW from epoch 180 of 200 (the release's command);
* ``longtail_small``: a CPU-sized version with the same table: Fashion-MNIST (or MNIST) subsampled to an
  exponential profile of ratio 100 (``--long-tail-ratio 100 --long-tail-max 1000``: 1000 ... 10 training
  images per class, so that the many (> 100), medium (20-100) and few (< 20) shot groups are all populated),
  a narrow version of the paper's MNIST CNN (``mnist_cnn`` with one convolution of 16 / 32 / 32 channels per
  stage and a 64-d feature layer, BatchNorm after each), SGD lr 0.1 with a cosine schedule over 16 epochs,
  evaluated on the full balanced test set.

The rows (:data:`ROWS`, Table 3's order): ``ce``; ``el_conservative`` (log_end 0.75, the image recipes'
conservative bonus; EL_SPEC 2.1), ``el_normal`` (log_end 1), ``el_aggressive`` (the normal bonus from
``p = 0.5`` on: ``--bonus-start 0.5``, the EL release's iNaturalist command); ``crt`` (cRT on the ``ce``
representation) and ``crt_el`` (cRT on the ``el_normal`` representation: EL enters the representation stage
only, the classifier is re-trained with CE); ``drw`` (CE with deferred class-balanced re-weighting, Cao et
al. 2019, ``--drw-epoch``) and ``drw_el`` (the same with the normal bonus); ``focal`` and ``halted_focal``
(gamma 2, halt point 0.5: the CLI's defaults, EL_SPEC 2.5).

``WORK`` holds ``data/`` (longtail_small: Fashion-MNIST and MNIST in torchvision's layout; inat2018 with
``--smoke``: a slice of the iNaturalist root), ``runs/<row>-seed<seed>/`` (one ``timm-el-train`` run each,
cRT rows included: their own run directory, ``--crt-from`` the source row's run) and ``results/``::

    python -m timm_el.longtail_recipe check   RECIPE --work WORK [--data DIR] [--rows LIST] [--seeds LIST] [-- FLAGS]
    python -m timm_el.longtail_recipe prepare RECIPE --work WORK [--data DIR] [--smoke]
    python -m timm_el.longtail_recipe train   RECIPE --work WORK [--data DIR] [--rows LIST] [--seeds LIST] [-- FLAGS]
    python -m timm_el.longtail_recipe crt     RECIPE --work WORK [--data DIR] [--rows LIST] [--seeds LIST] [-- FLAGS]
    python -m timm_el.longtail_recipe results RECIPE --work WORK [--rows LIST] [--seeds LIST] [--smoke]
    python -m timm_el.longtail_recipe published RECIPE --out CSV [--smoke]

``train`` runs the representation rows of ``--rows`` (and the source rows of its cRT rows), ``crt`` the cRT
rows; both skip a finished run (``eval/last.json`` holds a record) without starting a process, resume an
interrupted one from its ``last.pth.tar``, move a run directory without a checkpoint aside, and check every
command with the training CLI's own parser before training anything. ``results`` turns each run's
``eval/last.json`` into an ``el-result/1`` record (task the runs', loss the row, checkpoint ``last``, metrics
``all`` (top-1 %), ``many``, ``medium``, ``few``), writes the paper's numbers as a ``--published`` CSV and runs
``el-results`` on them, then ``longtail.md`` (the table in the paper's shape beside the paper's numbers, and
the direction of each comparison the paper makes, measured against published) and ``longtail.png``;
it is skipped when its inputs have not changed.
"""
import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import Parser, check_choice, list_of, seed_number, split_extra
from encouraging_loss.tools.files import FileProblem, atomic_path, atomic_write, read_json, write_json

__all__ = [
    'DIRECTION_PAIRS', 'LongTailError', 'METRICS', 'PAPER', 'RECIPES', 'ROWS', 'Recipe', 'Row', 'build_parser',
    'check', 'collect_stats', 'crt', 'default_drw_epoch', 'direction', 'main', 'plan_runs', 'plot', 'prepare',
    'published_rows', 'render_markdown', 'results', 'run_arguments', 'run_record', 'slice_inat', 'stage_plan', 'train',
    'write_published',
]

PROG = 'timm_el.longtail_recipe'
#: the table's metrics (Table 3's columns) and the run record's metric each comes from
METRICS = ('all', 'many', 'medium', 'few')
SOURCE_METRIC = {'all': 'top1', 'many': 'many', 'medium': 'medium', 'few': 'few'}
METRIC_LABELS = {'all': 'All', 'many': 'Many', 'medium': 'Medium', 'few': 'Few'}


@dataclass(frozen=True)
class Row:
    """One row of Table 3 (EL_SPEC 6).

    Attributes:
        name: the row's name in run directories, records and ``--rows``.
        label: the paper's name of the method.
        loss: ``timm-el-train --loss``.
        flags: the row's own loss flags.
        drw: deferred re-weighting (``--drw-epoch``, Cao et al. 2019).
        crt_from: for a cRT row (Kang et al. 2020), the row whose finished run is the representation.
    """
    name: str
    label: str
    loss: str
    flags: Tuple[str, ...] = ()
    drw: bool = False
    crt_from: Optional[str] = None


#: Table 3's rows in its order. The conservative bonus: log_end 0.75 (EL_SPEC 2.1's recommended value, the image
#: recipes'); the aggressive bonus: the normal bonus from p = 0.5 on (the EL release's iNaturalist command,
#: bonus_start=0.5); cRT and DRW "+ normal bonus" put EL (log_end 1) in the representation stage only.
ROWS: Tuple[Row, ...] = (
    Row('ce', 'CE', 'ce'),
    Row('el_conservative', '+ conservative bonus', 'encouraging', ('--log-end', '0.75')),
    Row('el_normal', '+ normal bonus', 'encouraging', ('--log-end', '1')),
    Row('el_aggressive', '+ aggressive bonus', 'encouraging', ('--log-end', '1', '--bonus-start', '0.5')),
    Row('crt', 'cRT', 'ce', crt_from='ce'),
    Row('crt_el', 'cRT + normal bonus', 'ce', crt_from='el_normal'),
    Row('drw', 'DRW', 'ce', drw=True),
    Row('drw_el', 'DRW + normal bonus', 'encouraging', ('--log-end', '1'), drw=True),
    Row('focal', 'focal loss', 'focal'),
    Row('halted_focal', 'halted focal loss', 'halted_focal'),
)
ROW = {r.name: r for r in ROWS}

#: the paper's top-1 accuracy (%) on iNaturalist 2018, All / Many / Medium / Few (Table 3 / Table 9, EL_SPEC 6)
PAPER: Dict[str, Tuple[float, float, float, float]] = {
    'ce': (64.3, 74.1, 65.9, 59.8),
    'el_conservative': (65.3, 74.3, 66.6, 61.2),
    'el_normal': (65.8, 74.4, 66.6, 62.4),
    'el_aggressive': (66.3, 75.1, 67.4, 62.6),
    'crt': (64.9, 71.4, 65.9, 61.9),
    'crt_el': (66.8, 71.7, 67.6, 64.6),
    'drw': (68.1, 71.0, 68.3, 67.1),
    'drw_el': (70.3, 69.0, 70.1, 70.9),
    'focal': (62.9, 72.9, 64.1, 58.8),
    'halted_focal': (63.6, 73.1, 64.6, 59.7),
}
#: the comparisons the paper draws from Table 3, (treatment, baseline): each bonus against CE, cRT against CE and
#: cRT + EL against cRT, DRW against CE and DRW + EL against DRW, focal against CE and halted focal against focal
DIRECTION_PAIRS: Tuple[Tuple[str, str], ...] = (
    ('el_conservative', 'ce'), ('el_normal', 'ce'), ('el_aggressive', 'ce'), ('crt', 'ce'), ('crt_el', 'crt'),
    ('drw', 'ce'), ('drw_el', 'drw'), ('focal', 'ce'), ('halted_focal', 'focal'),
)


@dataclass(frozen=True)
class Recipe:
    """One long-tailed recipe: a preset of :data:`timm_el.recipe.PRESETS` for the representation stage and the
    flags cRT changes over it.

    Attributes:
        name: the recipe (``longtail_small``, ``inat2018``).
        title: what it is, for the tables.
        crt_flags: the cRT stage's flags over the preset's (its own epochs, lr, ...).
        crt_smoke: the same for a ``--smoke`` run (over the preset's smoke flags).
        drw_epoch: the first re-weighted epoch (0-based) at the preset's epochs; other ``--epochs`` keep its
            fraction (:func:`default_drw_epoch`).
        seeds: the default seeds.
        paper_task: True when the recipe is the paper's setting: the published numbers are its own.
        prepared_data: the data is ``WORK/data`` (written by the prepare stage), not ``--data`` itself.
    """
    name: str
    title: str
    crt_flags: Tuple[str, ...]
    crt_smoke: Tuple[str, ...]
    drw_epoch: int
    seeds: Tuple[int, ...]
    paper_task: bool
    prepared_data: bool

    @property
    def preset(self):
        from .recipe import PRESETS

        return PRESETS[self.name]


RECIPES: Dict[str, Recipe] = {
    # Kang et al. 2020's cls_crt.yaml for iNaturalist18: 30 epochs, SGD 0.2, momentum 0.9, wd 1e-4, batch 512,
    # cosine to 0 (the representation's optimiser); the EL release's DRW command: 200 epochs, DRW from 180
    'inat2018': Recipe('inat2018', 'iNaturalist 2018, ResNet-50 (Kang et al. 2020\'s setting)',
                       crt_flags=('--epochs', '30'), crt_smoke=('--epochs', '1'), drw_epoch=180, seeds=(1,),
                       paper_task=True, prepared_data=False),
    # our own CPU-sized recipe: cRT 4 epochs at the representation's lr; DRW for the last quarter of the 16 epochs
    # (Cao et al. switch it on when the learning rate has decayed: 160 of 200 on CIFAR)
    'longtail_small': Recipe('longtail_small', 'Fashion-MNIST at ratio 100 (1000 ... 10 images a class), '
                                               'a narrow mnist_cnn', crt_flags=('--epochs', '4'),
                             crt_smoke=('--epochs', '1'), drw_epoch=12, seeds=(1, 2, 3), paper_task=False,
                             prepared_data=True),
}
#: a --smoke run of each recipe: the limits of WORK/data (longtail_small: the first training / test images of
#: each dataset; inat2018: classes, training and validation images per class of the slice)
SMOKE_DATA = {'longtail_small': {'train_limit': 2000, 'test_limit': 200},
              'inat2018': {'classes': 10, 'train_per_class': 6, 'val_per_class': 2}}
#: options of timm-el-train the recipe sets itself (refused after --), by argparse dest -> the recipe's option
RESERVED = {
    'data': '--data', 'data_dir': '--data', 'dataset': '--dataset', 'loss': '--rows', 'seed': '--seeds',
    'output': '--work', 'experiment': '--work', 'resume': None, 'task_name': None, 'config': None,
    'epochs': '--epochs / --crt-epochs', 'crt_from': '--rows crt,crt_el', 'drw_epoch': '--drw-epoch',
}
#: flags after -- that apply to some rows only, by dest: the EL flags to the EL rows, --drw-beta to the DRW rows;
#: the companion losses' flags go to their losses (timm_el.train_args.COMPANION_FLAGS)
DRW_DESTS = ('drw_beta',)
RESULT_FILES = ('results.csv', 'summary.csv', 'summary.md', 'longtail.md', 'published.csv')


class LongTailError(ValueError):
    """Bad input: one line ``timm_el.longtail_recipe: error: ...``, exit status 2."""


#: a list option's values checked (one line naming the flag), raising LongTailError
_check_choice = functools.partial(check_choice, error=LongTailError)


def _say(line: str) -> None:
    sys.stderr.write(f'== {line}\n')
    sys.stderr.flush()


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise LongTailError(f'unknown recipe {name!r} ({", ".join(RECIPES)})')
    return RECIPES[name]


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise LongTailError('--seeds: no seed given')
    for s in seeds:
        if list(seeds).count(s) > 1:
            raise LongTailError(f'--seeds: {s} given twice')


def _unique(items) -> List:
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


# ----------------------------------------------------------------------------- runs and their flags


def run_name(row: str, seed: int) -> str:
    """The run directory's name: ``<row>-seed<seed>``."""
    return f'{row}-seed{seed}'


def run_dir(work, row: str, seed: int) -> Path:
    """``WORK/runs/<row>-seed<seed>``."""
    return Path(work) / 'runs' / run_name(row, seed)


def plan_runs(rows: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The rows to train in each stage, Table 3's order: ``(representation rows, cRT rows)``. The
    representation stage also trains the source rows of the cRT rows asked for (``ce`` for ``crt``,
    ``el_normal`` for ``crt_el``)."""
    _check_choice('--rows', rows, tuple(ROW))
    wanted = set(rows) | {ROW[r].crt_from for r in rows if ROW[r].crt_from}
    first = [r.name for r in ROWS if r.name in wanted and not r.crt_from]
    second = [r.name for r in ROWS if r.name in wanted and r.crt_from]
    return first, second


def default_drw_epoch(recipe: Recipe, epochs: Optional[int] = None, smoke: bool = False) -> int:
    """The first re-weighted epoch (0-based, ``--drw-epoch``) of the DRW rows: the recipe's
    (:attr:`Recipe.drw_epoch`, at the preset's epochs); with other ``epochs`` the same fraction of them,
    rounded, at least 1 and at most ``epochs - 1`` (both phases non-empty)."""
    base = _preset_epochs(recipe, False)
    epochs = epochs if epochs is not None else _preset_epochs(recipe, smoke)
    if epochs < 2:
        raise LongTailError(f'--epochs {epochs}: DRW needs at least 2 epochs (plain, then re-weighted)')
    if epochs == base:
        return recipe.drw_epoch
    return min(epochs - 1, max(1, round(recipe.drw_epoch * epochs / base)))


def _preset_epochs(recipe: Recipe, smoke: bool) -> int:
    from .recipe import merge_flags

    flags = list(recipe.preset.flags)
    if smoke:
        flags = merge_flags(flags, recipe.preset.smoke, _cli_parser())
    return int(_last_value(flags, '--epochs'))


def _last_value(flags: Sequence[str], flag: str) -> str:
    """The value of the last ``flag`` in ``flags``."""
    return flags[len(flags) - flags[::-1].index(flag)]


def _cli_parser():
    from .train import build_parser

    return build_parser()


def task_name(recipe: Recipe, dataset: Optional[str] = None, model: Optional[str] = None, smoke: bool = False) -> str:
    """The runs' and the records' task: ``inat2018_resnet50``, ``longtail_fashion_mnist`` (``longtail_mnist``,
    ``..._<model>`` with another model), ``..._smoke`` for a smoke run."""
    preset = recipe.preset
    dataset = preset.dataset if dataset is None else dataset
    model = model or preset.model
    if recipe.name == 'inat2018':
        task = f'inat2018_{model}'
    else:
        task = 'longtail_' + dataset.rpartition('/')[2].lower() + ('' if model == preset.model else f'_{model}')
    return task + ('_smoke' if smoke else '')


def data_root(recipe: Recipe, work, data: Optional[str], smoke: bool = False) -> Optional[str]:
    """Where the runs read the data: ``WORK/data`` for longtail_small (the prepare stage's) and for a smoke run
    of inat2018 (the slice), else ``--data``."""
    if recipe.prepared_data or smoke:
        return str(Path(work) / 'data')
    return data


def _row_extra(row: Row, groups) -> List[str]:
    """The flags after -- that apply to ``row``: EL flags to the EL rows, --drw-beta to the DRW rows, each companion
    loss's flags to that loss."""
    from .recipe import EL_DESTS
    from .train_args import COMPANION_FLAGS

    out = []
    for dest, group in groups:
        if dest in EL_DESTS and row.loss != 'encouraging':
            continue
        if dest in DRW_DESTS and not row.drw:
            continue
        if dest in COMPANION_FLAGS and row.loss not in COMPANION_FLAGS[dest]:
            continue
        out += group
    return out


def run_arguments(recipe_name: str, row: str, seed: int, *, work, data: Optional[str] = None,
                  dataset: Optional[str] = None, epochs: Optional[int] = None, crt_epochs: Optional[int] = None,
                  drw_epoch: Optional[int] = None, gpus: int = 1, smoke: bool = False, extra: Sequence[str] = (),
                  resume=None, parser: Optional[argparse.ArgumentParser] = None) -> List[str]:
    """The ``timm-el-train`` arguments of one run of Table 3 (EL_SPEC 6).

    The recipe's preset (:data:`timm_el.recipe.PRESETS`; its smoke flags over it with ``smoke``), for a cRT row
    :attr:`Recipe.crt_flags` over that and ``--crt-from`` the source row's run; the row's loss flags, ``--drw-epoch``
    for the DRW rows; then the flags after -- that apply to the row (each replacing the same option); the per-GPU
    batch (the preset's global batch over ``gpus`` unless ``-b`` is given); the data, loss, seed, run directory
    ``WORK/runs/<row>-seed<seed>`` and task. Raises :class:`LongTailError` on a bad option."""
    from .recipe import RecipeError, flag_groups, merge_flags, per_process_batch

    recipe = _recipe(recipe_name)
    if row not in ROW:
        raise LongTailError(f'--rows: unknown row {row!r} ({", ".join(ROW)})')
    r = ROW[row]
    preset = recipe.preset
    parser = parser or _cli_parser()
    dataset = preset.dataset if dataset is None else dataset
    if preset.datasets and dataset not in preset.datasets:
        raise LongTailError(f'--dataset: {dataset!r} is not one of {", ".join(preset.datasets)}')
    for flag, value in (('--epochs', epochs), ('--crt-epochs', crt_epochs), ('--gpus', gpus)):
        if value is not None and value < 1:
            raise LongTailError(f'{flag} must be an integer >= 1, got {value}')
    data = data_root(recipe, work, data, smoke)
    if not data:
        raise LongTailError('--data: the dataset directory is required')
    try:
        groups = flag_groups(extra, parser, where='-- ')
        for dest, group in groups:
            if dest in RESERVED:
                hint = f'; use the recipe\'s {RESERVED[dest]}' if RESERVED[dest] else ''
                raise LongTailError(f'-- {group[0].split("=")[0]}: set by the recipe{hint}')
        flags = list(preset.flags)
        if smoke:
            flags = merge_flags(flags, preset.smoke, parser)
        if r.crt_from:
            flags = merge_flags(flags, recipe.crt_smoke if smoke else recipe.crt_flags, parser)
            if crt_epochs is not None:
                flags = merge_flags(flags, ['--epochs', str(crt_epochs)], parser)
        elif epochs is not None:
            flags = merge_flags(flags, ['--epochs', str(epochs)], parser)
        own = list(r.flags)
        if r.drw:
            drw = drw_epoch if drw_epoch is not None else default_drw_epoch(recipe, epochs, smoke)
            own += ['--drw-epoch', str(drw)]
        flags = merge_flags(flags, own, parser)
        mine = _row_extra(r, groups)
        if not any(dest == 'batch_size' for dest, _ in flag_groups(flags + mine, parser)):
            flags += ['-b', str(per_process_batch(preset.global_batch, gpus))]
        flags = merge_flags(flags, mine, parser)
    except RecipeError as err:
        raise LongTailError(str(err)) from None
    if r.drw:
        drw = int(_last_value(flags, '--drw-epoch'))
        total = int(_last_value(flags, '--epochs'))
        if not 0 < drw < total:
            raise LongTailError(f'--drw-epoch {drw} must be in [1, {total - 1}] with {total} epochs '
                                '(plain training first, then re-weighted)')
    model = flags[flags.index('--model') + 1]
    args = ['--data-dir', str(data), '--dataset', dataset, *flags]
    if r.crt_from:
        args += ['--crt-from', str(run_dir(work, r.crt_from, seed))]
    args += ['--loss', r.loss, '--seed', str(seed), '--output', str(Path(work) / 'runs'),
             '--experiment', run_name(row, seed), '--task-name', task_name(recipe, dataset, model, smoke)]
    if resume:
        args += ['--resume', str(resume)]
    return args


def _parse_check(args: Sequence[str], parser=None) -> None:
    """``args`` through timm-el-train's own checks (:func:`timm_el.train.parse_args`): one line on a bad value."""
    from .train import UsageError, parse_args

    try:
        parse_args(list(args), parser or _cli_parser())
    except UsageError as err:
        raise LongTailError(f'timm-el-train: {err}') from None
    except SystemExit:  # argparse has printed its one line (timm-el-train: error: ...)
        raise SystemExit(2) from None


def _options(opts) -> dict:
    return dict(work=opts.work, data=opts.data, dataset=opts.dataset, epochs=opts.epochs, crt_epochs=opts.crt_epochs,
                drw_epoch=opts.drw_epoch, gpus=opts.gpus, smoke=opts.smoke)


def check(recipe_name: str, rows: Sequence[str], seeds: Sequence[int], extra: Sequence[str] = (), **options) -> None:
    """Every option and every run's full command, checked by the training CLI's parser; creates nothing. A cRT
    run whose representation is not finished yet is checked without ``--crt-from`` (the rest of its flags), a
    run on a ``WORK/data`` not prepared yet with an empty folder in its place."""
    from .recipe import run_state

    recipe = _recipe(recipe_name)
    first, second = plan_runs(rows)
    _check_seeds(seeds)
    parser = _cli_parser()
    with tempfile.TemporaryDirectory() as empty:
        for row in first + second:
            for seed in seeds:
                args = run_arguments(recipe_name, row, seed, extra=extra, parser=parser, **options)
                if ROW[row].crt_from and run_state(run_dir(options['work'], ROW[row].crt_from, seed)) != 'finished':
                    k = args.index('--crt-from')
                    args = args[:k] + args[k + 2:]
                if (recipe.prepared_data or options.get('smoke')) and not Path(args[1]).is_dir():
                    args[1] = empty  # WORK/data, which the prepare stage writes
                _parse_check(args)


# ----------------------------------------------------------------------------- prepare


def slice_inat(root, out, classes: int = 10, train_per_class: int = 6, val_per_class: int = 2) -> dict:
    """A small iNaturalist 2018 root for a smoke run: ``out/train2018.json`` and ``out/val2018.json`` with the
    ``classes`` smallest category ids that have training images (renumbered 0..classes-1, in id order), their first
    ``train_per_class`` training and ``val_per_class`` validation images, and links to the root's image folders
    (the first component of each ``file_name``). Returns the ``prepared.json`` record."""
    root, out = Path(root), Path(out)
    loaded = {}
    for split in ('train', 'val'):
        path = root / f'{split}2018.json'
        if not path.is_file():
            raise LongTailError(f'--data {str(root)!r}: no {path.name} (an iNaturalist 2018 root holds '
                                'train2018.json and val2018.json)')
        try:
            loaded[split] = read_json(path, 'iNaturalist annotation file')
        except FileProblem as err:
            raise LongTailError(str(err)) from None
        for key in ('images', 'annotations', 'categories'):
            if not isinstance(loaded[split].get(key), list):
                raise LongTailError(f'{path}: no {key!r} list (COCO-style annotations expected)')
    train_ids = sorted({a['category_id'] for a in loaded['train']['annotations']})
    keep = train_ids[:classes]
    new_id = {c: k for k, c in enumerate(keep)}
    names = {c['id']: c.get('name', str(c['id'])) for c in loaded['train']['categories']}
    out.mkdir(parents=True, exist_ok=True)
    counts, tops = {}, set()
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        files = {im['id']: im for im in loaded[split]['images']}
        taken: Dict[int, int] = {}
        images, annotations = [], []
        for a in loaded[split]['annotations']:
            c = a['category_id']
            if c not in new_id or taken.get(c, 0) >= per_class or a['image_id'] not in files:
                continue
            taken[c] = taken.get(c, 0) + 1
            image = files[a['image_id']]
            images.append(image)
            annotations.append({'id': len(annotations), 'image_id': a['image_id'], 'category_id': new_id[c]})
            tops.add(Path(image['file_name']).parts[0])
        doc = {'images': images, 'annotations': annotations,
               'categories': [{'id': new_id[c], 'name': names.get(c, str(c))} for c in keep]}
        with atomic_write(out / f'{split}2018.json') as f:
            json.dump(doc, f)
        counts[split] = len(images)
    for top in sorted(tops):
        link = out / top
        if not link.exists():
            os.symlink((root / top).resolve(), link)
    return {'data': str(root.resolve()), 'classes': len(keep), 'train_per_class': train_per_class,
            'val_per_class': val_per_class, 'counts': counts}


def prepare(recipe_name: str, work, data: Optional[str] = None, smoke: bool = False) -> Optional[dict]:
    """``WORK/data`` where the recipe reads its data from there (:attr:`Recipe.prepared_data`, or a smoke run):
    longtail_small: Fashion-MNIST and MNIST in torchvision's layout (:func:`timm_el.mnist_ood.prepare`; a smoke
    run keeps the first :data:`SMOKE_DATA` images); inat2018 with ``smoke``: :func:`slice_inat` of ``--data``.
    inat2018 without ``smoke`` reads ``--data`` in place: its two annotation files are checked. A ``WORK/data``
    prepared the same way is kept (``prepared.json``); prepared otherwise, it is refused."""
    from .mnist_ood import MnistOodError
    from .mnist_ood import prepare as prepare_mnist

    recipe = _recipe(recipe_name)
    if data is not None and not Path(data).is_dir():
        raise LongTailError(f'--data: directory not found: {str(data)!r}')
    if not recipe.prepared_data and not smoke:
        if data is None:
            raise LongTailError('--data: the iNaturalist 2018 root is required (train2018.json, val2018.json and '
                                'the image folders they name)')
        for name in ('train2018.json', 'val2018.json'):
            if not (Path(data) / name).is_file():
                raise LongTailError(f'--data {str(data)!r}: no {name} (an iNaturalist 2018 root holds '
                                    'train2018.json and val2018.json)')
        _say(f'{data}: iNaturalist 2018 root, read in place')
        return None
    root = Path(work) / 'data'
    marker = root / 'prepared.json'
    limits = SMOKE_DATA[recipe.name] if smoke else {}
    if marker.is_file():
        try:
            done = read_json(marker, 'preparation record')
        except FileProblem as err:
            raise LongTailError(str(err)) from None
        same = all(done.get(k) == v for k, v in limits.items()) and \
            all(done.get(k) is None for k in ('train_limit', 'test_limit') if k not in limits)
        if same and (data is None or done.get('data') in (str(Path(data).resolve()), None)):
            _say(f'{root}: prepared already from {done.get("data")} ({marker}), skipping')
            return done
        raise LongTailError(f'{root} was prepared from {done.get("data")} with other limits '
                            f'({json.dumps({k: done.get(k) for k in limits or ("train_limit", "test_limit")})}); '
                            'use another --work or delete it')
    if recipe.name == 'inat2018':
        if data is None:
            raise LongTailError('--data: the iNaturalist 2018 root is required (the smoke run slices it)')
        record = slice_inat(data, root, **limits)
        write_json(marker, record)
        _say(f'{root}: {record["classes"]} classes, {record["counts"]["train"]} training and '
             f'{record["counts"]["val"]} validation images of {data}')
        return record
    try:
        return prepare_mnist(root, data, limits.get('train_limit'), limits.get('test_limit'))
    except MnistOodError as err:
        raise LongTailError(str(err)) from None


# ----------------------------------------------------------------------------- train and crt


def stage_plan(stage: str, work, rows: Sequence[str], seeds: Sequence[int], *,
               say: bool = True) -> List[Tuple[str, int, Path, str]]:
    """The runs a stage (``train``: the representation rows and the sources of the cRT rows, :func:`plan_runs`;
    ``crt``: the cRT rows) has to do, seed by seed: ``(row, seed, run directory, state)`` with the state of
    :func:`timm_el.recipe.run_state` (``resume``, ``incomplete`` or ``new``); finished runs are left out (and
    named when ``say``). A cRT run whose source run is not finished is refused."""
    from .recipe import run_state

    if stage not in ('train', 'crt'):
        raise LongTailError(f'unknown stage {stage!r} (train, crt)')
    first, second = plan_runs(rows)
    _check_seeds(seeds)
    mine = first if stage == 'train' else second
    work = Path(work)
    if stage == 'train' and say:
        extra_rows = [r for r in first if r not in rows]
        if extra_rows:
            _say(f'train: also {", ".join(extra_rows)} (the representation of '
                 f'{", ".join(r for r in second if ROW[r].crt_from in extra_rows)})')
    todo = []
    for seed in seeds:  # seed by seed: an interrupted table has whole seeds
        for row in mine:
            path = run_dir(work, row, seed)
            state = run_state(path)
            if state == 'finished':
                if say:
                    _say(f'{stage} {run_name(row, seed)}: finished ({path / "eval" / "last.json"}), skipping')
                continue
            source = ROW[row].crt_from
            if source and run_state(run_dir(work, source, seed)) != 'finished':
                raise LongTailError(f'no finished {source} run for seed {seed} ({run_dir(work, source, seed)}), the '
                                    f'representation of {row}; run the train stage')
            todo.append((row, seed, path, state))
    return todo


def _stage(stage: str, recipe_name: str, rows: Sequence[str], seeds: Sequence[int], *, work, extra=(),
           dry_run: bool = False, python: str = sys.executable, **options) -> int:
    from .recipe import _aside, launch_command, record_problem, run_state

    recipe = _recipe(recipe_name)
    work = Path(work)
    todo = stage_plan(stage, work, rows, seeds)
    if not todo:
        return 0
    if recipe.prepared_data or options.get('smoke'):
        if not (work / 'data' / 'prepared.json').is_file():
            raise LongTailError(f'{work / "data"} is not prepared (run the prepare stage)')
    parser = _cli_parser()
    commands = []
    for row, seed, path, state in todo:  # every command checked before anything is trained
        resume = path / 'last.pth.tar' if state == 'resume' else None
        args = run_arguments(recipe_name, row, seed, work=work, extra=extra, parser=parser, resume=resume, **options)
        _parse_check(args)
        commands.append(args)
    for n, ((row, seed, path, state), args) in enumerate(zip(todo, commands), 1):
        name = run_name(row, seed)
        if state == 'resume':
            damaged = record_problem(path) if (path / 'eval' / 'last.json').is_file() else None
            _say(f'{stage} {name}: ' + (f'{damaged}; ' if damaged else 'interrupted, ') +
                 f'resuming from {path / "last.pth.tar"}')
        elif state == 'incomplete' and not dry_run:
            moved = _aside(path, LongTailError)
            _say(f'{stage} {name}: {path} holds no checkpoint; moved aside to {moved}, starting again')
        cmd = launch_command(args, gpus=options.get('gpus') or 1, python=python)
        _say(f'{stage} {name} ({n}/{len(todo)}): {shlex.join(cmd)}')
        if dry_run:
            continue
        code = subprocess.call(cmd)
        if code:
            _say(f'{stage} {name}: training stopped with exit status {code}')
            return code if code > 0 else 128 - code
        if run_state(path) != 'finished':
            raise LongTailError(f'{stage} {name}: training ended but {record_problem(path)}')
    return 0


def train(recipe_name: str, rows: Sequence[str], seeds: Sequence[int], **kwargs) -> int:
    """The representation stage (EL_SPEC 6): every run of the rows without cRT (and the representations the
    cRT rows need), ``WORK/runs/<row>-seed<seed>``: a finished run is skipped, an interrupted one resumed, the
    rest trained with ``python -m timm_el.train`` (:func:`run_arguments`; torchrun with ``gpus`` > 1). Every
    command is checked first. Returns the exit status."""
    return _stage('train', recipe_name, rows, seeds, **kwargs)


def crt(recipe_name: str, rows: Sequence[str], seeds: Sequence[int], **kwargs) -> int:
    """The cRT stage (Kang et al. 2020, EL_SPEC 6): the cRT rows among ``rows``, each from its finished source
    run (``--crt-from``), skipped / resumed / trained as :func:`train`. Returns the exit status."""
    return _stage('crt', recipe_name, rows, seeds, **kwargs)


# ----------------------------------------------------------------------------- records


def _number(value, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LongTailError(f'{where}: {value!r} is not a finite number')
    return float(value)


def run_record(record: Mapping, *, row: str, seed: int, task: Optional[str] = None,
               source: str = 'eval/last.json') -> dict:
    """The ``el-result/1`` record of one run of Table 3 from its ``eval/last.json``: task the run's (or ``task``),
    loss the row, checkpoint ``last``, metrics ``all`` (top-1 %), ``many``, ``medium``, ``few`` (Kang et al.'s
    shot groups, %; a group without a class is left out). A record without the shot groups is refused."""
    metrics = record.get('metrics')
    if not isinstance(metrics, dict):
        raise LongTailError(f'{source}: no metrics')
    if 'top1' not in metrics:
        raise LongTailError(f'{source}: no top1 metric')
    if not any(k in metrics for k in ('many', 'medium', 'few')):
        raise LongTailError(f'{source}: no shot-group accuracy (metrics many, medium, few); the run was not '
                            'evaluated with shot groups')
    out = {}
    for metric in METRICS:
        value = _number(metrics.get(SOURCE_METRIC[metric]), f'{source}: metrics.{SOURCE_METRIC[metric]}')
        if value is not None:
            out[metric] = value
    info = dict(record.get('info') or {})
    info.update({'row': row, 'label': ROW[row].label, 'source': source, 'run_task': record.get('task'),
                 'run_loss': record.get('loss')})
    return {'schema': 'el-result/1', 'task': task or str(record.get('task')), 'loss': row, 'seed': int(seed),
            'run': run_name(row, seed), 'checkpoint': 'last', 'metrics': out, 'info': info}


def published_rows(recipe_name: str = 'inat2018', smoke: bool = False) -> List[dict]:
    """The paper's Table 3 (:data:`PAPER`, EL_SPEC 6) as el-results ``--published`` rows: task the paper's
    (``inat2018_resnet50``, ``_smoke`` for a smoke run), loss the row, metric all / many / medium / few, mean, no
    std, checkpoint ``last``."""
    task = task_name(RECIPES['inat2018'], smoke=smoke)
    return [{'task': task, 'loss': row, 'metric': metric, 'mean': value, 'std': '', 'checkpoint': 'last'}
            for row, values in PAPER.items() for metric, value in zip(METRICS, values)]


def write_published(path, recipe_name: str = 'inat2018', smoke: bool = False) -> Path:
    """:func:`published_rows` as a CSV (task, loss, metric, mean, std, checkpoint), written atomically."""
    path = Path(path)
    with atomic_write(path, newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['task', 'loss', 'metric', 'mean', 'std', 'checkpoint'])
        writer.writeheader()
        for row in published_rows(recipe_name, smoke):
            writer.writerow(dict(row, mean=f'{row["mean"]:g}'))
    return path


# ----------------------------------------------------------------------------- tables and plots


def collect_stats(records: Sequence[Mapping]) -> Dict[str, Dict[str, object]]:
    """Mean +- std (ddof=1) over seeds per row and metric: ``{row: {metric: MetricStats}}`` (a metric no record
    of the row has is absent)."""
    from encouraging_loss.tools.results import describe

    values: Dict[str, Dict[str, List[float]]] = {}
    for r in records:
        for metric, v in r['metrics'].items():
            values.setdefault(r['loss'], {}).setdefault(metric, []).append(v)
    return {row: {m: describe(v) for m, v in by_metric.items()} for row, by_metric in values.items()}


def direction(stats: Mapping, treatment: str, baseline: str, metric: str) -> Optional[dict]:
    """One comparison of Table 3 measured against the paper's: ``delta`` (mean of ``treatment`` minus mean of
    ``baseline``), ``se`` (the standard error of that difference, sqrt(s1^2/n1 + s2^2/n2); None with one seed of
    either), ``paper`` (the published difference) and ``verdict``: ``agrees`` (same sign as the paper's and
    larger than its standard error), ``opposite`` (the other sign, larger than its standard error), ``noise``
    (not larger than its standard error), ``paper flat`` (the paper's difference is 0); with one seed the
    verdict is by sign alone. None when either row lacks the metric."""
    t, b = stats.get(treatment, {}).get(metric), stats.get(baseline, {}).get(metric)
    if t is None or b is None:
        return None
    delta = t.mean - b.mean
    se = math.sqrt(t.std ** 2 / t.n + b.std ** 2 / b.n) if t.std is not None and b.std is not None else None
    k = METRICS.index(metric)
    paper = round(PAPER[treatment][k] - PAPER[baseline][k], 6)
    if paper == 0:
        verdict = 'paper flat'
    elif delta == 0 or (se is not None and abs(delta) <= se):
        verdict = 'noise'
    elif (delta > 0) == (paper > 0) and delta != 0:
        verdict = 'agrees'
    else:
        verdict = 'opposite'
    return {'delta': delta, 'se': se, 'paper': paper, 'verdict': verdict}


def _cell(st, n_seeds: int) -> str:
    if st is None:
        return '–'
    text = f'{st.mean:.2f}' + (f' ± {st.std:.2f}' if st.std is not None else '')
    return text + (f' (n={st.n})' if st.n != n_seeds else '')


def _shot_text(groups) -> Optional[str]:
    """``many 5, medium 3, few 2 (many > 100, few < 20)`` from a run record's ``info.shot_groups``."""
    if not isinstance(groups, dict):
        return None
    counts = ', '.join(f'{g} {groups[g + "_classes"]}' for g in ('many', 'medium', 'few') if g + '_classes' in groups)
    if not counts:
        return None
    if 'many_above' in groups and 'few_below' in groups:
        counts += f' (many > {groups["many_above"]}, few < {groups["few_below"]} training images)'
    return counts


def render_markdown(records: Sequence[Mapping], *, recipe_name: str, seeds: Sequence[int] = (),
                    smoke: bool = False) -> str:
    """``longtail.md`` (EL_SPEC 6, Table 3 / Table 9): every row of the paper's table, All / Many / Medium / Few
    accuracy (%) mean ± std over seeds beside the paper's (a row not run: –), the shot groups' class counts, then
    the comparisons the paper draws (:data:`DIRECTION_PAIRS`): measured and published differences and whether
    the direction agrees (:func:`direction`)."""
    recipe = _recipe(recipe_name)
    stats = collect_stats(records)
    n_seeds = len(seeds) or len({r['seed'] for r in records})
    seed_text = ', '.join(map(str, seeds)) if seeds else str(n_seeds)
    tasks = _unique(r['task'] for r in records)
    paper = 'paper' if recipe.paper_task else 'paper (iNat 2018)'
    lines = [f'# Imbalanced classification: {recipe.title}' + (' (smoke run: not a result)' if smoke else ''), '',
             f'Zhao et al., AAAI 2022, Table 3 / Table 9 (EL_SPEC 6): top-1 accuracy (%) on the balanced '
             f'{"validation" if recipe.paper_task else "test"} set, All and per shot group (Kang et al. 2020: '
             f'many > 100, medium 20-100, few < 20 training images), mean ± std over seeds {seed_text} '
             f'(n=k: a cell with fewer runs); task {", ".join(tasks) or "–"}.'
             + ('' if recipe.paper_task else ' The paper\'s numbers are iNaturalist 2018\'s (ResNet-50): compare '
                                             'directions, not levels.'), '',
             '| row | method | ' + ' | '.join(METRIC_LABELS[m] for m in METRICS) + ' | '
             + ' | '.join(f'{paper} {METRIC_LABELS[m]}' for m in METRICS) + ' |',
             '|---|---|' + '---:|' * (2 * len(METRICS))]
    for row in ROWS:
        cells = [_cell(stats.get(row.name, {}).get(m), n_seeds) for m in METRICS]
        cells += [f'{v:.1f}' for v in PAPER[row.name]]
        lines.append(f'| `{row.name}` | {row.label} | ' + ' | '.join(cells) + ' |')
    groups = _unique(_shot_text(r.get('info', {}).get('shot_groups')) for r in records)
    groups = [g for g in groups if g]
    if groups:
        lines += ['', 'Classes per shot group (the training set\'s): ' + '; '.join(groups) + '.']
    lines += ['', '## Direction of each comparison, measured and published', '',
              'Difference of the means (treatment − baseline, points) and the paper\'s; "agrees": the same sign '
              'and larger than its standard error, "opposite": the other sign and larger than it, "noise": '
              'within one standard error (with one seed: by sign alone).', '',
              '| comparison | ' + ' | '.join(METRIC_LABELS[m] for m in METRICS) + ' |',
              '|---|' + '---|' * len(METRICS)]
    tally: Dict[str, int] = {}
    for treatment, baseline in DIRECTION_PAIRS:
        found = [direction(stats, treatment, baseline, m) for m in METRICS]
        if all(d is None for d in found):
            continue
        cells = []
        for d in found:
            if d is None:
                cells.append('–')
                continue
            tally[d['verdict']] = tally.get(d['verdict'], 0) + 1
            cells.append(f'{d["delta"]:+.2f} ({d["paper"]:+.1f}) {d["verdict"]}')
        lines.append(f'| {ROW[treatment].label} vs {ROW[baseline].label} | ' + ' | '.join(cells) + ' |')
    if tally:
        lines += ['', 'Verdicts: ' + ', '.join(f'{k} {v}' for k, v in sorted(tally.items())) + '.']
    else:
        lines += ['', 'No comparison: a treatment and its baseline row are both needed.']
    return '\n'.join(lines) + '\n'


def plot(records: Sequence[Mapping], path, *, recipe_name: str, smoke: bool = False) -> Optional[Path]:
    """``longtail.png``: a panel per metric (All, Many, Medium, Few); top: each row's accuracy (bar: mean, line:
    ± std, dots: seeds; the paper's number as a black dash for the paper's recipe), bottom: the difference from
    CE, measured (bars) and published (dashes) -- the direction the README compares. None without records."""
    from encouraging_loss.tools.results import loss_colours
    from encouraging_loss.tools.results.plots import new_figure

    recipe = _recipe(recipe_name)
    stats = collect_stats(records)
    rows = [r.name for r in ROWS if r.name in stats]
    if not rows:
        return None
    colours = loss_colours(rows, 'ce', 'el_normal')
    fig = new_figure(4.0 * len(METRICS), 7.4)
    xs = range(len(rows))
    for k, metric in enumerate(METRICS):
        top = fig.add_subplot(2, len(METRICS), k + 1)
        low = fig.add_subplot(2, len(METRICS), len(METRICS) + k + 1)
        base = stats.get('ce', {}).get(metric)
        for x, row in zip(xs, rows):
            st = stats[row].get(metric)
            if st is None:
                continue
            top.bar(x, st.mean, color=colours[row], alpha=0.8, yerr=st.std or 0, capsize=2)
            seeds = [r['metrics'][metric] for r in records if r['loss'] == row and metric in r['metrics']]
            top.plot([x] * len(seeds), seeds, 'k.', ms=3)
            if recipe.paper_task:
                top.plot([x - 0.4, x + 0.4], [PAPER[row][k]] * 2, 'k-', linewidth=1.5)
            if base is not None:
                low.bar(x, st.mean - base.mean, color=colours[row], alpha=0.8)
            low.plot([x - 0.4, x + 0.4], [PAPER[row][k] - PAPER['ce'][k]] * 2, 'k-', linewidth=1.5)
        for ax, label in ((top, f'{METRIC_LABELS[metric]} (%)'), (low, f'{METRIC_LABELS[metric]} − CE (points)')):
            ax.set_xticks(list(xs))
            ax.set_xticklabels(rows, rotation=60, ha='right', fontsize=7)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(axis='y', alpha=0.3)
        low.axhline(0, color='grey', linewidth=0.8)
    task = ', '.join(_unique(r['task'] for r in records))
    fig.suptitle(f'{task}: mean ± std over seeds, dots: seeds; black dashes: the paper'
                 + ('' if recipe.paper_task else ' (iNaturalist 2018, bottom row only)'), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    return path


# ----------------------------------------------------------------------------- results


def _inputs(work: Path, rows, seeds, smoke) -> dict:
    from .recipe import record_problem

    runs = []
    for row in rows:
        for seed in seeds:
            path = run_dir(work, row, seed)
            problem = record_problem(path)
            if problem is not None:
                stage = 'crt' if ROW[row].crt_from else 'train'
                raise LongTailError(f'no finished {row} run for seed {seed} ({problem}); run the {stage} stage')
            last = path / 'eval' / 'last.json'
            st = last.stat()
            runs.append([row, seed, str(last), st.st_mtime_ns, st.st_size])
    return {'rows': list(rows), 'seeds': list(seeds), 'smoke': bool(smoke), 'runs': runs}


def results(recipe_name: str, work, rows: Sequence[str], seeds: Sequence[int], *, smoke: bool = False,
            plots: bool = True) -> Tuple[Dict[str, Path], bool]:
    """``WORK/results`` from the runs' ``eval/last.json`` (EL_SPEC 6): the ``el-result/1`` records
    (``records/seed<seed>/<row>.json``, :func:`run_record`), ``published.csv`` (the paper's Table 3), el-results'
    ``results.csv`` / ``summary.csv`` / ``summary.md`` (baseline ``ce``, treatment ``el_normal``; the paper's numbers
    beside for the paper's task), ``longtail.md`` (:func:`render_markdown`) and ``longtail.png`` (:func:`plot`).
    Skipped when ``inputs.json`` says the runs, rows and seeds are those of the files there; otherwise every file
    is written again (they are derived). Returns the paths and whether they were written."""
    from encouraging_loss.tools.results import main as results_main

    _recipe(recipe_name)
    _check_choice('--rows', rows, tuple(ROW))
    _check_seeds(seeds)
    rows = [r.name for r in ROWS if r.name in rows]
    work = Path(work)
    out = work / 'results'
    inputs = _inputs(work, rows, seeds, smoke)
    stamp = out / 'inputs.json'
    paths = {name: out / name for name in RESULT_FILES}
    if plots:
        paths['longtail.png'] = out / 'longtail.png'
    if stamp.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if read_json(stamp, 'inputs record') == inputs:
                _say(f'results: up to date ({out}), skipping')
                return paths, False
        except FileProblem:
            pass
    if (out / 'records').is_dir():
        shutil.rmtree(out / 'records')  # derived from the runs: written again whole
    records = []
    for row, seed, last, _, _ in inputs['runs']:
        try:
            run = read_json(last, 'result record')
        except FileProblem as err:
            raise LongTailError(str(err)) from None
        record = run_record(run, row=row, seed=seed, source=os.path.relpath(last, work))
        path = out / 'records' / f'seed{seed}' / f'{row}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        records.append(record)
    tasks = _unique(r['task'] for r in records)
    if len(tasks) > 1:
        raise LongTailError(f'the runs belong to different tasks ({", ".join(tasks)}); one work directory holds '
                            'one recipe, dataset and model')
    write_published(paths['published.csv'], recipe_name, smoke)
    _say(f'results: {len(records)} records -> {out / "records"}; el-results')
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = results_main([str(out / 'records'), '--out', str(out), '--force', '--no-plots', '--baseline', 'ce',
                             '--treatment', 'el_normal', '--published', str(paths['published.csv'])])
    if code:
        raise LongTailError(f'el-results failed on {out / "records"} (exit status {code}; see above)')
    with atomic_write(paths['longtail.md']) as f:
        f.write(render_markdown(records, recipe_name=recipe_name, seeds=seeds, smoke=smoke))
    if plots:
        plot(records, paths['longtail.png'], recipe_name=recipe_name, smoke=smoke)
    write_json(stamp, inputs)
    return paths, True


# ----------------------------------------------------------------------------- command line


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer >= 1')
    return int(text)


def build_parser(prog: str = PROG):
    parser = Parser(prog=prog, description='Imbalanced classification (Zhao et al., AAAI 2022, Table 3; EL_SPEC 6): '
                                           'the stages of scripts/longtail_small.sh and scripts/inat2018.sh.')
    sub = parser.add_subparsers(dest='command', required=True, parser_class=Parser)

    def common(p, runs=True):
        p.add_argument('recipe', choices=tuple(RECIPES), help='the recipe')
        p.add_argument('--work', required=True, help='the work directory (data/, runs/<row>-seed<seed>, results/)')
        p.add_argument('--smoke', action='store_true',
                       help='a short run that checks the recipe, not a result: the preset\'s smoke flags, a small '
                            'WORK/data (SMOKE_DATA), tasks ending in _smoke')
        p.add_argument('--rows', type=list_of(str, 'a name'), default=[r.name for r in ROWS], metavar='LIST',
                       help='comma-separated rows of Table 3: ' + ', '.join(ROW))
        p.add_argument('--seeds', type=list_of(seed_number, 'a non-negative integer'), default=None, metavar='LIST',
                       help='seeds (default: the recipe\'s: inat2018 1, longtail_small 1,2,3; 1 with --smoke)')
        if runs:
            p.add_argument('--data', default=None, help='inat2018: the iNaturalist 2018 root; longtail_small: read '
                                                        'from WORK/data (see prepare)')
            p.add_argument('--dataset', default=None,
                           help='longtail_small: torch/fashion_mnist or torch/mnist (default: the preset\'s)')
            p.add_argument('--epochs', type=_count, default=None, help='representation epochs (default: the '
                                                                       'preset\'s)')
            p.add_argument('--crt-epochs', type=_count, default=None, help='cRT epochs (default: the recipe\'s)')
            p.add_argument('--drw-epoch', type=_count, default=None,
                           help='first re-weighted epoch (0-based) of the DRW rows (default: the recipe\'s, the '
                                'same fraction of other --epochs)')
            p.add_argument('--gpus', type=_count, default=1, help='GPUs (processes); more than one: torchrun, '
                                                                  'the preset\'s batch divided among them')

    p = sub.add_parser('check', help='check the options and every run\'s command; create nothing')
    common(p)
    p = sub.add_parser('prepare', help='WORK/data (longtail_small; inat2018 --smoke: a slice of --data)')
    p.add_argument('recipe', choices=tuple(RECIPES), help='the recipe')
    p.add_argument('--work', required=True, help='the work directory')
    p.add_argument('--data', default=None, help='longtail_small: the MNIST files (DIR/mnist/, DIR/fashion-mnist/ or '
                                                'torchvision\'s layout; default: download); inat2018: its root')
    p.add_argument('--smoke', action='store_true', help='the smoke run\'s small data (SMOKE_DATA)')
    for name, what in (('train', 'the representation rows'), ('crt', 'the cRT rows')):
        p = sub.add_parser(name, help=f'train {what} (skip finished runs, resume interrupted ones)')
        common(p)
        p.add_argument('--dry-run', action='store_true', help='print the commands only')
    p = sub.add_parser('results', help='records, el-results, longtail.md and longtail.png in WORK/results')
    common(p, runs=False)
    p.add_argument('--no-plots', action='store_true', help='no longtail.png')
    p = sub.add_parser('published', help='the paper\'s Table 3 as an el-results --published CSV')
    p.add_argument('recipe', choices=tuple(RECIPES), help='the recipe')
    p.add_argument('--out', required=True, help='the CSV to write')
    p.add_argument('--smoke', action='store_true', help='task ending in _smoke')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    prog = PROG
    if argv[:1] == ['--prog'] and len(argv) > 1:  # the recipe scripts: their name in the error lines
        prog, argv = argv[1], argv[2:]
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if extra and opts.command not in ('check', 'train', 'crt'):
        parser.error(f'flags after -- go to the check, train and crt commands only, got {" ".join(extra)!r}')
    try:
        if opts.command == 'prepare':
            prepare(opts.recipe, opts.work, opts.data, opts.smoke)
            return 0
        if opts.command == 'published':
            _say(f'wrote {write_published(opts.out, opts.recipe, opts.smoke)}')
            return 0
        if opts.seeds is None:
            opts.seeds = [1] if opts.smoke else list(RECIPES[opts.recipe].seeds)
        if opts.command == 'check':
            check(opts.recipe, opts.rows, opts.seeds, extra, **_options(opts))
            return 0
        if opts.command in ('train', 'crt'):
            stage = train if opts.command == 'train' else crt
            return stage(opts.recipe, opts.rows, opts.seeds, extra=extra, dry_run=opts.dry_run, **_options(opts))
        paths, written = results(opts.recipe, opts.work, opts.rows, opts.seeds, smoke=opts.smoke,
                                 plots=not opts.no_plots)
        sys.stdout.write(paths['longtail.md'].read_text())
        for name, path in paths.items():
            if written and name not in ('results.csv', 'summary.csv', 'summary.md'):  # el-results names those
                sys.stderr.write(f'== wrote {path}\n')
        return 0
    except (LongTailError, FileProblem) as err:
        parser.error(str(err))


if __name__ == '__main__':
    sys.exit(main())
