"""Graph classification as in the paper: the decisions of ``scripts/graph.sh``.

Zhao et al., AAAI 2022, section 5.2 and Fig. 4 (EL_SPEC 6): SAGPool (Lee et al. 2019) on PROTEINS and NCI1,
cross-entropy (CE) against the Encouraging Loss with a conservative bonus (EL, ``--log-end 0.75``), each run on
its own random 80 / 10 / 10 split, the test accuracy of the best-valid epoch. ``WORK`` holds ``data/tu``
(the TU archives, ``NAME.zip``; PyG's ``NAME/raw`` and ``NAME/processed`` beside them), ``runs/NAME-ce`` and
``runs/NAME-el`` (one ``python -m pyg_el.train --out`` folder each: ``settings.json``, ``run<r>/result.json``)
and ``results/``::

    python -m pyg_el.recipe check   --work WORK [--data DIR] [--datasets LIST] [--runs N] [--seed S]
                                    [--losses ce,el] [--log-end LE] [--threads T] [--smoke] [-- FLAGS]
    python -m pyg_el.recipe prepare --work WORK [--data DIR] [--datasets LIST] [--smoke]
    python -m pyg_el.recipe train   (the options of check) [--dry-run] [-- FLAGS]
    python -m pyg_el.recipe results --work WORK [--datasets LIST] [--losses LIST] [--runs N] [--smoke] [--no-plots]

``train`` walks the runs interleaved (:func:`train_plan`): per dataset, for ``r = 1 .. --runs``, for each loss,
``pyg_el.train --runs r`` adds run ``r - 1`` (the training CLI skips its finished runs and resumes an
unfinished one), so that a recipe stopped early leaves CE and EL with the same runs, paired by seed. A step
whose runs are all finished is skipped without calling the CLI; the CLI runs in this process (one import of
PyTorch Geometric for all runs). Flags after ``--`` go to every run (EL flags to the EL runs only).
``results`` reads the ``result.json`` records (:func:`collect_runs`; runs of one loss made with different
settings, or CE and EL runs of one dataset differing in more than the loss, are refused), runs ``el-results``
on them (summary.md / csv, plots, the ``valid_acc`` curves) and writes ``graph.md`` (:func:`render_markdown`:
per dataset CE and EL mean +- std, EL - CE, the paired difference (:func:`paired_difference`), epochs and
seconds per run, a verdict) and ``graph.png`` (:func:`plot`). The paper has no table for this figure: the exact
numbers of Fig. 4 are not in our copy (EL_SPEC 6); its claim is that EL improves over CE on both datasets.
"""
import argparse
import contextlib
import io
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from encouraging_loss.tools import cli
from encouraging_loss.tools.cli import Parser, check_choice, list_of, seed_number, split_extra
from encouraging_loss.tools.files import FileProblem, atomic_path, atomic_write, read_json, write_json
from encouraging_loss.tools.results.tables import describe

__all__ = [
    'DEFAULTS', 'LOSSES', 'LOSS_SETTINGS', 'PAPER_DATASETS', 'RecipeError', 'build_parser', 'check',
    'check_datasets', 'check_same_settings', 'collect_runs', 'data_root', 'flag_groups', 'loss_stats', 'main',
    'paired_difference', 'plot', 'prepare', 'render_markdown', 'results', 'run_arguments', 'run_dir', 't975',
    'train', 'train_plan', 'tu_source', 'verdict',
]

PROG = 'pyg_el.recipe'
#: the training command the recipe runs, as named in its messages
TRAIN_PROG = 'python -m pyg_el.train'
#: the paper's graph datasets (section 5.2, Fig. 4); others are taken from a local TU archive
PAPER_DATASETS = ('PROTEINS', 'NCI1')
#: the recipe's loss label (run folders, records) -> ``pyg_el.train --loss``
LOSSES = {'ce': 'ce', 'el': 'encouraging'}
LOSS_LABELS = {'ce': 'CE', 'el': 'EL'}
#: the recipe's defaults: 10 runs from SAGPool's seed 777, EL with the conservative bonus (EL_SPEC 6: log_end
#: 0.75, as the image recipes), one CPU thread (on a shared machine two threads were ten times slower)
DEFAULTS = {'runs': 10, 'seed': 777, 'log_end': 0.75, 'threads': 1, 'log_every': 10}
#: a --smoke run: one run of the first dataset, 2 epochs, patience 1 (before the flags after --)
SMOKE = {'runs': 1, 'flags': ('--max-epochs', '2', '--patience', '1')}
#: pyg_el.train options the recipe sets itself (refused after --): dest -> the recipe's option
RESERVED = {'dataset': '--datasets', 'root': '--data / --work', 'loss': '--losses', 'runs': '--runs',
            'seed': '--seed', 'out': '--work', 'threads': '--threads', 'log_end': '--log-end'}
#: the settings of pyg_el.train that may differ between the CE and the EL runs of one pairing: the loss and the EL
#: flags (encouraging_loss.tools.el_flags.EL_FLAG_DEFAULTS; written out: that module imports torch, and the
#: prepare and results stages run without it)
LOSS_SETTINGS = ('loss', 'log_end', 'bonus', 'bonus_start', 'bonus_gamma', 'bonus_rho', 'bonus_smoothing',
                 'defer_start')
#: 97.5 % quantiles of Student's t by degrees of freedom (1..30; 1.96 beyond): the 95 % interval of a mean
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: the files of WORK/results besides el-results' plots
RESULT_FILES = ('results.csv', 'summary.csv', 'summary.md', 'graph.md')
TIE = 1e-9  # accuracies (%) closer than this are a tie


class RecipeError(ValueError):
    """Bad input: one line ``<prog>: error: ...``, exit status 2."""


def _say(line: str) -> None:
    sys.stderr.write(f'== {line}\n')
    sys.stderr.flush()


# ----------------------------------------------------------------------------- datasets and data


def _check_name(name: str) -> None:
    if not name or not name.replace('_', '').replace('-', '').isalnum():
        raise RecipeError(f'--datasets: {name!r} is not a TU dataset name (letters, digits, \'-\' and \'_\')')


def tu_source(data, name: str) -> Optional[Path]:
    """The TU archive of ``name`` in ``--data DIR``: ``DIR/tu/NAME.zip`` (the project's data layout) or
    ``DIR/NAME.zip``; None when neither is there."""
    if data is None:
        return None
    for path in (Path(data) / 'tu' / f'{name}.zip', Path(data) / f'{name}.zip'):
        if path.is_file():
            return path
    return None


def data_root(work) -> Path:
    """``WORK/data/tu``: the runs' ``--root``."""
    return Path(work) / 'data' / 'tu'


def _local(work, name: str) -> bool:
    root = data_root(work)
    return (root / f'{name}.zip').is_file() or (root / name).is_dir()


def check_datasets(datasets: Sequence[str], work, data=None) -> None:
    """``--datasets``: names of TU datasets, none twice, each either one of the paper's (:data:`PAPER_DATASETS`,
    downloaded by TUDataset without ``--data``) or found as a TU archive under ``--data`` or ``WORK/data/tu``.
    With ``--data``, the paper's datasets must be there too (or in ``WORK/data/tu`` already)."""
    if not datasets:
        raise RecipeError(f'--datasets: nothing given ({", ".join(PAPER_DATASETS)})')
    for name in datasets:
        _check_name(name)
        if list(datasets).count(name) > 1:
            raise RecipeError(f'--datasets: {name!r} given twice')
    if data is not None and not Path(data).is_dir():
        raise RecipeError(f'--data: directory not found: {str(data)!r}')
    for name in datasets:
        if tu_source(data, name) is not None or _local(work, name):
            continue
        if name not in PAPER_DATASETS:
            where = f'{data}/tu/{name}.zip or {data}/{name}.zip' if data else f'{name}.zip under --data'
            raise RecipeError(f'--datasets: unknown dataset {name!r} (the paper\'s: {", ".join(PAPER_DATASETS)}; '
                              f'another TU dataset needs {where})')
        if data is not None:
            raise RecipeError(f'--data {data}: no {name}.zip (looked for {data}/tu/{name}.zip and {data}/{name}.zip); '
                              f'leave --data out to download it')


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def prepare(work, datasets: Sequence[str], data=None) -> List[str]:
    """``WORK/data/tu/NAME.zip`` for each dataset from ``--data`` (:func:`tu_source`), copied atomically; a
    copy already there with the same bytes is kept, one with other bytes refused (no silent overwrite).
    Without ``--data`` nothing is copied: ``pyg_el.train`` downloads into ``WORK/data/tu``. Returns one line
    per dataset saying what was done."""
    check_datasets(datasets, work, data)
    root = data_root(work)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in datasets:
        target = root / f'{name}.zip'
        source = tu_source(data, name)
        if source is None:
            have = 'its TU archive is there' if target.is_file() else (
                'prepared there' if (root / name).is_dir() else 'pyg_el.train downloads it there (TUDataset)')
            lines.append(f'{name}: {root}: {have}')
            continue
        if target.is_file():
            if not _same_file(source, target):
                raise RecipeError(f'{target} differs from --data\'s {source}; delete it (and {root / name}) or '
                                  'use another --work')
            lines.append(f'{name}: {target} is a copy of {source} already, keeping it')
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        lines.append(f'{name}: copied {source} -> {target} ({target.stat().st_size:,} bytes)')
    return lines


# ----------------------------------------------------------------------------- the runs' commands


def run_dir(work, dataset: str, loss: str) -> Path:
    """``WORK/runs/<dataset>-<loss>`` (loss ``ce`` or ``el``): one ``pyg_el.train --out`` folder."""
    return Path(work) / 'runs' / f'{dataset}-{loss}'


def _train_parser():
    from .train import build_parser

    return build_parser()


def flag_groups(tokens: Sequence[str], parser=None, where: str = '-- ') -> List[Tuple[str, List[str]]]:
    """Split ``pyg_el.train`` flags into ``(dest, tokens)`` groups with its own parser
    (:func:`encouraging_loss.tools.cli.flag_groups`); :class:`RecipeError` on an unknown option or a stray value."""
    return cli.flag_groups(tokens, parser or _train_parser(), program=TRAIN_PROG, where=where, error=RecipeError)


def _merge(base: Sequence[str], extra: Sequence[str], parser) -> List[str]:
    """``base`` with each option of ``extra`` replacing the same option in it (else appended)."""
    return cli.merge_flags(base, extra, parser, program=TRAIN_PROG, error=RecipeError)


def run_arguments(dataset: str, loss: str, runs: int, *, work, seed: int = DEFAULTS['seed'],
                  log_end: float = DEFAULTS['log_end'], threads: int = DEFAULTS['threads'], extra: Sequence[str] = (),
                  smoke: bool = False, parser=None) -> List[str]:
    """The ``python -m pyg_el.train`` arguments of one step of the recipe (EL_SPEC 6): ``--dataset``, ``--root
    WORK/data/tu``, ``--loss ce|encouraging`` (EL: ``--log-end``, the conservative bonus), ``--runs`` (runs 0 ..
    runs - 1), ``--seed`` (run r: seed + r), ``--out WORK/runs/<dataset>-<loss>``, ``--threads``,
    ``--log-every 10``; then the smoke flags (:data:`SMOKE`) and the flags after -- (each replacing the same
    option; EL flags for the EL runs only). The model and optimisation are the CLI's defaults (SAGPool's)."""
    if loss not in LOSSES:
        raise RecipeError(f'--losses: unknown value {loss!r} ({", ".join(LOSSES)})')
    parser = parser or _train_parser()
    groups = flag_groups(extra, parser)
    for dest, group in groups:
        if dest in RESERVED:
            raise RecipeError(f'-- {group[0].split("=")[0]}: set by the recipe; use its {RESERVED[dest]}')
    mine = [tok for dest, group in groups if loss == 'el' or dest not in LOSS_SETTINGS for tok in group]
    args = ['--dataset', dataset, '--root', str(data_root(work)), '--loss', LOSSES[loss]]
    if loss == 'el':
        args += ['--log-end', f'{log_end:g}']
    args += ['--runs', str(runs), '--seed', str(seed), '--out', str(run_dir(work, dataset, loss)),
             '--threads', str(threads)]
    flags = ['--log-every', str(DEFAULTS['log_every'])] + (list(SMOKE['flags']) if smoke else [])
    return args + _merge(flags, mine, parser)


def _parse_run(args: Sequence[str], parser=None):
    """``args`` through ``pyg_el.train``'s parser and checks: ``(namespace, settings)``; one line on a bad
    value (RecipeError naming the CLI)."""
    from .train import UsageError, check_args, settings_of

    parser = parser or _train_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(list(args))
    except SystemExit:
        text = err.getvalue().strip().splitlines()
        raise RecipeError((text[-1] if text else 'bad flags').replace(f'{parser.prog}: error: ', 'pyg_el.train: ')
                          ) from None
    try:
        check_args(ns)
    except UsageError as e:
        raise RecipeError(f'pyg_el.train: {e}') from None
    return ns, settings_of(ns)


def _check_settings(out: Path, settings: Mapping) -> None:
    """A run folder made with other settings is refused before anything trains (as ``pyg_el.train`` would)."""
    path = out / 'settings.json'
    if not path.is_file():
        return
    try:
        saved = read_json(path, 'settings file')
    except FileProblem as err:
        raise RecipeError(str(err)) from None
    for name, value in settings.items():
        if name in saved and saved[name] != value:
            flag = '--' + name.replace('_', '-')
            raise RecipeError(f'{out} holds runs made with {flag} {saved[name]!r}, this command has {flag} {value!r}; '
                              'give the same flags to continue them, or another --work')


def _check_counts(runs: int, threads: int) -> None:
    for flag, value in (('--runs', runs), ('--threads', threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f'{flag}: {value!r} is not an integer >= 1')


def train_plan(work, datasets: Sequence[str], losses: Sequence[str], runs: int, **options
               ) -> List[Tuple[str, int, str, List[str], bool]]:
    """The recipe's steps in order, ``(dataset, r, loss, pyg_el.train arguments, done)``: per dataset, for
    ``r = 1 .. runs``, for each loss (CE first), ``--runs r`` (it adds run ``r - 1``). ``done``: the step's runs
    ``run0 .. run<r-1>`` all hold a ``result.json`` in a folder whose ``settings.json`` is this command's.
    Every command is checked with the training CLI's parser first; a run folder made with other settings is
    refused (one line)."""
    check_choice('--losses', losses, tuple(LOSSES), error=RecipeError)
    _check_counts(runs, options.get('threads', DEFAULTS['threads']))
    check_datasets(datasets, work, options.pop('data', None))
    parser = _train_parser()
    losses = [x for x in LOSSES if x in losses]
    plan = []
    for dataset in datasets:
        finished = {}
        for loss in losses:
            args = run_arguments(dataset, loss, runs, work=work, parser=parser, **options)
            _, settings = _parse_run(args, parser)
            out = run_dir(work, dataset, loss)
            _check_settings(out, settings)
            same = (out / 'settings.json').is_file()
            finished[loss] = [same and (out / f'run{k}' / 'result.json').is_file() for k in range(runs)]
        for r in range(1, runs + 1):
            for loss in losses:
                args = run_arguments(dataset, loss, r, work=work, parser=parser, **options)
                plan.append((dataset, r, loss, args, all(finished[loss][:r])))
    return plan


def check(work, datasets: Sequence[str], losses: Sequence[str], runs: int, **options) -> None:
    """Every option and every step's command (:func:`train_plan`), checked; creates nothing."""
    train_plan(work, datasets, losses, runs, **options)


def train(work, datasets: Sequence[str], losses: Sequence[str], runs: int, *, dry_run: bool = False,
          **options) -> int:
    """The training stage (EL_SPEC 6): the steps of :func:`train_plan` not done yet, each ``pyg_el.train``'s
    ``main`` in this process (it skips its finished runs, resumes an unfinished one from ``last.pt`` and
    trains the next). Returns the exit status (the CLI's on a failed step)."""
    from .train import main as train_main

    plan = train_plan(work, datasets, losses, runs, **options)
    todo = [step for step in plan if not step[4]]
    shown = ', '.join(datasets)
    _say(f'train: {shown}; runs 0..{runs - 1} (seed {options.get("seed", DEFAULTS["seed"])} + run), '
         f'losses {", ".join(x for x in LOSSES if x in losses)}; {len(plan) - len(todo)} of {len(plan)} steps done')
    for n, (dataset, r, loss, args, _) in enumerate(todo, 1):
        _say(f'train {dataset} run {r - 1} {loss} ({n}/{len(todo)}): python -m pyg_el.train {shlex.join(args)}')
        if dry_run:
            continue
        code = train_main(args)
        if code:
            _say(f'train {dataset} run {r - 1} {loss}: pyg_el.train stopped with exit status {code}')
            return code
        if not (run_dir(work, dataset, loss) / f'run{r - 1}' / 'result.json').is_file():
            raise RecipeError(f'train {dataset} run {r - 1} {loss}: pyg_el.train ended without '
                              f'{run_dir(work, dataset, loss) / f"run{r - 1}" / "result.json"}')
    return 0


# ----------------------------------------------------------------------------- records


def _settings_of(record: Mapping) -> dict:
    info = record.get('info') if isinstance(record.get('info'), dict) else {}
    settings = info.get('settings')
    return dict(settings) if isinstance(settings, dict) else {}


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def check_same_settings(dataset: str, by_loss: Mapping[str, Sequence[Mapping]]) -> None:
    """Refuse records that are not one experiment: runs of one loss with different settings (the records'
    ``info.settings``), or CE and EL runs of ``dataset`` that differ in more than the loss and its EL flags
    (:data:`LOSS_SETTINGS`). One line naming the runs and the setting."""
    first = {}
    for loss, records in by_loss.items():
        for rec in records:
            settings = _settings_of(rec)
            if loss not in first:
                first[loss] = (rec, settings)
                continue
            ref, ref_settings = first[loss]
            for name in sorted(set(settings) | set(ref_settings)):
                if settings.get(name) != ref_settings.get(name):
                    raise RecipeError(f'{dataset} {loss}: {rec.get("run")} was trained with {_flag(name)} '
                                      f'{settings.get(name)!r}, {ref.get("run")} with {ref_settings.get(name)!r}; '
                                      'the runs of one loss must share their settings (move the odd ones aside)')
    if 'ce' in first and 'el' in first:
        ce, el = first['ce'][1], first['el'][1]
        for name in sorted(set(ce) | set(el)):
            if name not in LOSS_SETTINGS and ce.get(name) != el.get(name):
                raise RecipeError(f'{dataset}: the ce and el runs differ in {_flag(name)} ({ce.get(name)!r} vs '
                                  f'{el.get(name)!r}); a paired comparison needs the same settings but the loss')


def _run_index(path: Path) -> Optional[int]:
    m = re.fullmatch(r'run(\d+)', path.name)
    return int(m.group(1)) if m else None


def _check_record(rec, path: Path, dataset: str, loss: str) -> dict:
    if rec.get('schema') != 'el-result/1':
        raise RecipeError(f'{path}: not an el-result/1 record (schema {rec.get("schema")!r})')
    if rec.get('task') != dataset or rec.get('loss') != loss:
        raise RecipeError(f'{path}: a {rec.get("task")} {rec.get("loss")} record in the {dataset}-{loss} folder')
    metrics = rec.get('metrics')
    value = metrics.get('test_acc') if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f'{path}: metrics.test_acc {value!r} is not a finite number')
    if isinstance(rec.get('seed'), bool) or not isinstance(rec.get('seed'), int):
        raise RecipeError(f'{path}: seed {rec.get("seed")!r} is not an integer')
    return rec


def collect_runs(work, datasets: Sequence[str], losses: Sequence[str], runs: Optional[int] = None
                 ) -> Tuple[Dict[str, Dict[str, List[dict]]], Dict[str, Path], List[str]]:
    """The finished runs' records, ``WORK/runs/<dataset>-<loss>/run<r>/result.json`` with ``r < runs`` (all
    with ``runs`` None): ``({dataset: {loss: [records by run]}}, {record file: ...}, notes)``. Each record is
    checked (schema, task, loss, a finite test_acc) and the settings of each dataset's runs
    (:func:`check_same_settings`). Unfinished runs (no ``result.json``) are left out and counted in the notes."""
    found: Dict[str, Dict[str, List[dict]]] = {}
    files: Dict[str, Path] = {}
    notes = []
    for dataset in datasets:
        found[dataset] = {}
        for loss in losses:
            folder = run_dir(work, dataset, loss)
            recs, open_runs, beyond = [], 0, 0
            dirs = sorted((p for p in folder.glob('run*') if p.is_dir() and _run_index(p) is not None),
                          key=_run_index) if folder.is_dir() else []
            for d in dirs:
                if runs is not None and _run_index(d) >= runs:
                    beyond += 1
                    continue
                path = d / 'result.json'
                if not path.is_file():
                    open_runs += 1
                    continue
                try:
                    rec = read_json(path, 'result record')
                except FileProblem as err:
                    raise RecipeError(str(err)) from None
                recs.append(_check_record(rec, path, dataset, loss))
                files[str(path)] = path
            found[dataset][loss] = recs
            if open_runs:
                notes.append(f'{dataset} {loss}: {open_runs} run{"s" if open_runs > 1 else ""} not finished '
                             '(no result.json), left out')
            if beyond:
                notes.append(f'{dataset} {loss}: {beyond} run folder{"s" if beyond > 1 else ""} beyond --runs '
                             f'{runs}, left out')
        check_same_settings(dataset, found[dataset])
    return found, files, notes


# ----------------------------------------------------------------------------- statistics


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (None for one value) by el-results' :func:`describe`; (None, None) for no value."""
    if not values:
        return None, None
    stats = describe(values)
    return stats.mean, stats.std


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (the 95 % interval's half-width over
    the standard error); 1.96 beyond 30."""
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def loss_stats(records: Sequence[Mapping], metric: str = 'test_acc') -> dict:
    """Per loss over its runs: ``n``, ``mean`` and ``std`` (ddof=1; None for one run) of ``metric``, the mean
    ``epochs`` trained and ``best_epoch``, the mean ``wall_s`` per run (``info.wall_s``) and its sum."""
    def values(get):
        out = []
        for r in records:
            try:
                v = get(r)
            except (KeyError, TypeError, AttributeError):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    acc = values(lambda r: r['metrics'][metric])
    mean, std = _mean_std(acc)
    walls = values(lambda r: r['info']['wall_s'])
    return {'n': len(acc), 'mean': mean, 'std': std, 'epochs': _mean_std(values(lambda r: r['metrics']['epochs']))[0],
            'best_epoch': _mean_std(values(lambda r: r['metrics']['best_epoch']))[0],
            'wall_s': _mean_std(walls)[0], 'wall_total_s': math.fsum(walls) if walls else None}


def paired_difference(ce: Sequence[Mapping], el: Sequence[Mapping], metric: str = 'test_acc') -> dict:
    """EL - CE over the runs with the same seed (EL_SPEC 6: run r of each loss has seed + r, so the two share
    the split, the initial weights and the batch order): ``pairs`` [(seed, ce, el, el - ce)] by seed, ``n``,
    ``mean`` and ``std`` (ddof=1; None for one pair) of the differences, ``ci`` (the 95 % t interval of the mean,
    None under two pairs), ``won`` / ``tied`` / ``lost`` (runs where EL is above / equal to / below CE), and
    ``unpaired`` {loss: [seeds with no partner]}. A seed twice within one loss is refused."""
    by_seed = {}
    for loss, records in (('ce', ce), ('el', el)):
        mine = {}
        for r in records:
            if r['seed'] in mine:
                raise RecipeError(f'{loss}: seed {r["seed"]} in two runs ({mine[r["seed"]]["run"]}, {r["run"]}); '
                                  'the pairing needs one run per seed')
            mine[r['seed']] = r
        by_seed[loss] = mine
    seeds = sorted(set(by_seed['ce']) & set(by_seed['el']))
    pairs = []
    for s in seeds:
        a, b = float(by_seed['ce'][s]['metrics'][metric]), float(by_seed['el'][s]['metrics'][metric])
        pairs.append((s, a, b, b - a))
    diffs = [p[3] for p in pairs]
    mean, std = _mean_std(diffs)
    ci = None
    if len(diffs) > 1:
        half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        ci = (mean - half, mean + half)
    return {'pairs': pairs, 'n': len(pairs), 'mean': mean, 'std': std, 'ci': ci,
            'won': sum(d > TIE for d in diffs), 'tied': sum(abs(d) <= TIE for d in diffs),
            'lost': sum(d < -TIE for d in diffs),
            'unpaired': {loss: sorted(set(by_seed[loss]) - set(seeds)) for loss in ('ce', 'el')}}


def verdict(dataset: str, paired: Mapping) -> str:
    """One plain sentence on the paper's claim for ``dataset`` (EL above CE, section 5.2 / Fig. 4) from the
    paired difference (:func:`paired_difference`): above / below CE when the 95 % interval of the mean paired
    difference excludes 0, else no clear difference; no verdict with fewer than two pairs."""
    n = paired['n']
    if n == 0:
        return f'{dataset}: no CE and EL runs with the same seed yet; no verdict.'
    if n == 1:
        return (f'{dataset}: one pair only (EL − CE = {paired["mean"]:+.2f} points); too few runs for a verdict.')
    lo, hi = paired['ci']
    tally = f'EL won {paired["won"]}, tied {paired["tied"]}, lost {paired["lost"]}'
    numbers = (f'{paired["mean"]:+.2f} points on average over {n} paired runs (95 % interval {lo:+.2f} to '
               f'{hi:+.2f}; {tally})')
    if lo > 0:
        return f'{dataset}: EL is above CE, as the paper claims: {numbers}.'
    if hi < 0:
        return f'{dataset}: EL is below CE, against the paper\'s claim: {numbers}.'
    return (f'{dataset}: no clear difference: EL − CE is {numbers}, an interval that holds 0; the paper\'s claim '
            f'(EL above CE) is neither confirmed nor contradicted by these runs.')


# ----------------------------------------------------------------------------- graph.md and graph.png


def _cell(st: Mapping) -> str:
    if not st['n']:
        return '–'
    return f'{st["mean"]:.2f}' + (f' ± {st["std"]:.2f}' if st['std'] is not None else '') + f' (n={st["n"]})'


def _num(x: Optional[float], fmt: str = '.0f') -> str:
    return '–' if x is None else format(x, fmt)


def _settings_text(settings: Mapping) -> str:
    keys = ('pooling', 'hidden', 'pooling_ratio', 'dropout', 'batch_size', 'lr', 'weight_decay', 'patience',
            'max_epochs', 'stop_on', 'smoothing')
    text = ', '.join(f'{k} {settings[k]}' for k in keys if k in settings)
    return text or 'not recorded'


def _el_text(settings: Mapping) -> str:
    keys = ('log_end', 'bonus', 'bonus_start', 'bonus_rho', 'bonus_gamma', 'bonus_smoothing', 'defer_start')
    return ', '.join(f'{k} {settings[k]}' for k in keys if k in settings) or 'not recorded'


def render_markdown(found: Mapping[str, Mapping[str, Sequence[Mapping]]], *, runs: Optional[int] = None,
                    smoke: bool = False, notes: Sequence[str] = ()) -> str:
    """``graph.md`` (Zhao et al., section 5.2 / Fig. 4; EL_SPEC 6): per dataset CE and EL test accuracy (%)
    mean ± std over runs and n, EL − CE (difference of the means), the paired difference EL − CE over runs with
    the same seed (mean ± std; EL won / tied / lost), the mean epochs (trained, and the best-valid epoch) and
    seconds per run; the verdicts (:func:`verdict`); per dataset its settings and the runs pair by pair. The
    paper's numbers for Fig. 4 are not in our copy: said, and only the direction is compared."""
    names = list(found)
    lines = [f'# Graph classification: CE vs EL, SAGPool on {", ".join(names)}'
             + (' (smoke run: not a result)' if smoke else ''), '',
             'Zhao et al., AAAI 2022, section 5.2 and Fig. 4 (EL_SPEC 6): SAGPool (Lee et al. 2019: GCN layers with '
             'self-attention graph pooling) trained with cross-entropy (CE) and with the Encouraging Loss (EL, '
             'conservative bonus), each run on its own random 80 / 10 / 10 split (seed + run); the metric is the '
             'test accuracy (%) of the epoch with the best valid accuracy (early stopping). A CE run and an EL run '
             'with the same seed share the split, the initial weights and the batch order: they are compared pair '
             'by pair.', '',
             'The paper gives no table for this experiment: the exact numbers of its Fig. 4 are not in our copy '
             '(EL_SPEC 6). Its claim is that EL improves over CE on both PROTEINS and NCI1; this page checks that '
             'direction, not the levels.', '',
             '| dataset | CE test acc | EL test acc | EL − CE | paired EL − CE | EL won / tied / lost | '
             'epochs CE / EL (best) | s per run CE / EL |',
             '|---|---:|---:|---:|---:|---:|---:|---:|']
    verdicts, sections = [], []
    for dataset in names:
        by_loss = found[dataset]
        ce, el = by_loss.get('ce', []), by_loss.get('el', [])
        sc, se = loss_stats(ce), loss_stats(el)
        diff = '–' if sc['mean'] is None or se['mean'] is None else f'{se["mean"] - sc["mean"]:+.2f}'
        paired = paired_difference(ce, el)
        if paired['n']:
            p = f'{paired["mean"]:+.2f}' + (f' ± {paired["std"]:.2f}' if paired['std'] is not None else '') + \
                f' (n={paired["n"]})'
            tally = f'{paired["won"]} / {paired["tied"]} / {paired["lost"]}'
        else:
            p = tally = '–'
        epochs = (f'{_num(sc["epochs"])} ({_num(sc["best_epoch"])}) / '
                  f'{_num(se["epochs"])} ({_num(se["best_epoch"])})')
        wall = f'{_num(sc["wall_s"])} / {_num(se["wall_s"])}'
        lines.append(f'| {dataset} | {_cell(sc)} | {_cell(se)} | {diff} | {p} | {tally} | {epochs} | {wall} |')
        verdicts.append(f'- {verdict(dataset, paired)}')
        section = [f'## {dataset}', '']
        settings = next((_settings_of(r) for r in (ce or el)), {})
        el_settings = next((_settings_of(r) for r in el), {})
        section.append(f'Settings: {_settings_text(settings)}; seed {settings.get("seed", "–")} + run. '
                       f'EL: {_el_text(el_settings) if el else "no runs"}.')
        total = [x for x in (sc['wall_total_s'], se['wall_total_s']) if x is not None]
        if total:
            section.append(f'Training time: {math.fsum(total) / 60:.1f} minutes in all ({len(ce)} CE and {len(el)} '
                           'EL runs; the records\' info.wall_s, training and validation epochs).')
        section += ['', '| seed | CE | EL | EL − CE |', '|---:|---:|---:|---:|']
        for seed, a, b, d in paired['pairs']:
            section.append(f'| {seed} | {a:.2f} | {b:.2f} | {d:+.2f} |')
        for loss, seeds in paired['unpaired'].items():
            for seed in seeds:
                value = next(r['metrics']['test_acc'] for r in by_loss[loss] if r['seed'] == seed)
                cells = (f'{value:.2f}', '–') if loss == 'ce' else ('–', f'{value:.2f}')
                section.append(f'| {seed} | {cells[0]} | {cells[1]} | unpaired |')
        sections += section + ['']
    lines += ['', 'Mean ± sample std (ddof=1) over runs; EL − CE: difference of the means; paired EL − CE: mean ± '
              'std of the per-seed differences (points); epochs: mean epochs trained (in brackets the mean '
              'best-valid epoch); s per run: mean wall seconds of a run (info.wall_s)'
              + (f'; runs asked for: {runs}' if runs is not None else '') + '.', '', '## Verdicts', '', *verdicts]
    if notes:
        lines += ['', 'Notes: ' + '; '.join(notes) + '.']
    lines += [''] + sections
    return '\n'.join(lines).rstrip('\n') + '\n'


def plot(found: Mapping[str, Mapping[str, Sequence[Mapping]]], path, *, smoke: bool = False) -> Optional[Path]:
    """``graph.png``: a panel per dataset with runs, CE (left) and EL (right) test accuracy per run as dots, the
    runs with the same seed joined (green: EL above, red: below, grey: tie), the means as bars with ± std;
    None when no dataset has a run."""
    from encouraging_loss.tools.results import loss_colours
    from encouraging_loss.tools.results.plots import new_figure

    names = [d for d in found if any(found[d].get(x) for x in LOSSES)]
    if not names:
        return None
    colours = loss_colours(list(LOSSES), 'ce', 'el')
    fig = new_figure(max(6.6, 3.6 * len(names) + 0.6), 4.8)
    for k, dataset in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        by_loss = found[dataset]
        paired = paired_difference(by_loss.get('ce', []), by_loss.get('el', []))
        for seed, a, b, d in paired['pairs']:
            colour = '#2ca02c' if d > TIE else '#d62728' if d < -TIE else '0.6'
            ax.plot([0, 1], [a, b], '-', color=colour, linewidth=1, alpha=0.7, zorder=1)
        for x, loss in enumerate(LOSSES):
            values = [r['metrics']['test_acc'] for r in by_loss.get(loss, [])]
            if not values:
                continue
            ax.scatter([x] * len(values), values, s=22, color=colours[loss], zorder=3)
            mean, std = _mean_std(values)
            ax.hlines(mean, x - 0.22, x + 0.22, color='k', linewidth=2.2, zorder=4)
            if std is not None:
                ax.errorbar([x + 0.27], [mean], yerr=[std], fmt='none', ecolor='k', elinewidth=1.2, capsize=3,
                            zorder=4)
            ax.annotate(f'{mean:.2f}', (x - 0.22, mean), textcoords='offset points', xytext=(-30, -3), fontsize=7)
        ax.set_xticks([0, 1])
        ax.set_xticklabels([f'{LOSS_LABELS[x]} (n={len(by_loss.get(x, []))})' for x in LOSSES])
        ax.set_xlim(-0.6, 1.6)
        ax.set_ylabel('test accuracy (%)')
        title = dataset
        if paired['n']:
            title += f'\nEL − CE {paired["mean"]:+.2f} (paired, n={paired["n"]}; W/T/L ' \
                     f'{paired["won"]}/{paired["tied"]}/{paired["lost"]})'
        ax.set_title(title, fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    fig.suptitle('SAGPool, CE vs EL: test accuracy per run' + (' (smoke run: not a result)' if smoke else '')
                 + '\nlines join the runs with the same seed (green: EL above, red: below); bar: mean ± std',
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    return path


# ----------------------------------------------------------------------------- results


def results(work, datasets: Sequence[str], losses: Sequence[str] = tuple(LOSSES), runs: Optional[int] = None, *,
            smoke: bool = False, plots: bool = True) -> Tuple[Dict[str, Path], bool]:
    """``WORK/results`` from the finished runs (:func:`collect_runs`): el-results' ``results.csv``,
    ``summary.csv``, ``summary.md`` and plots (the test accuracy per run, the ``valid_acc`` curves; baseline
    ``ce``, treatment ``el``), ``graph.md`` (:func:`render_markdown`) and ``graph.png`` (:func:`plot`). Skipped
    when ``inputs.json`` says the record files and options are those of the files there; otherwise every file
    is written again (they are derived) and el-results' plots of a previous writing that are not written again
    are removed. Returns the paths and whether they were written."""
    from encouraging_loss.tools.results import main as results_main

    check_choice('--losses', losses, tuple(LOSSES), error=RecipeError)
    if not datasets:
        raise RecipeError(f'--datasets: nothing given ({", ".join(PAPER_DATASETS)})')
    for name in datasets:
        _check_name(name)
    if runs is not None:
        _check_counts(runs, 1)
    losses = [x for x in LOSSES if x in losses]
    work = Path(work)
    out = work / 'results'
    found, files, notes = collect_runs(work, datasets, losses, runs)
    if not files:
        folders = ', '.join(str(run_dir(work, d, x)) for d in datasets for x in losses)
        raise RecipeError(f'no finished runs in {folders}; run the train stage')
    inputs = {'datasets': list(datasets), 'losses': losses, 'runs': runs, 'smoke': bool(smoke), 'notes': notes,
              'files': [[os.path.relpath(p, work), p.stat().st_mtime_ns, p.stat().st_size]
                        for p in sorted(files.values())]}
    stamp = out / 'inputs.json'
    paths = {name: out / name for name in RESULT_FILES}
    if plots:
        paths['graph.png'] = out / 'graph.png'
    old = None
    if stamp.is_file():
        try:
            old = read_json(stamp, 'inputs record')
        except FileProblem:
            old = None
    if old is not None and {k: old.get(k) for k in inputs} == inputs and all(p.is_file() for p in paths.values()) \
            and all((out / name).is_file() for name in old.get('outputs', [])):
        _say(f'results: up to date ({out}), skipping')
        return paths, False
    out.mkdir(parents=True, exist_ok=True)
    _say(f'results: {len(files)} records of {", ".join(datasets)} -> {out}; el-results')
    argv = [str(p) for p in sorted(files.values())] + ['--out', str(out), '--force', '--baseline', 'ce',
                                                        '--treatment', 'el']
    argv += ['--curve-column', 'valid_acc'] if plots else ['--no-plots']
    captured_out, captured_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(captured_out), contextlib.redirect_stderr(captured_err):
        code = results_main(argv)
    written = [line[len('wrote '):] for line in captured_err.getvalue().splitlines() if line.startswith('wrote ')]
    for line in captured_err.getvalue().splitlines():  # warnings and errors; not the list of every record file
        if not line.startswith('wrote ') and ' records (' not in line:
            sys.stderr.write(line + '\n')
    if code:
        raise RecipeError(f'el-results failed on the records of {work / "runs"} (exit status {code}; see above)')
    outputs = sorted(os.path.relpath(p, out) for p in written)
    for name in (old or {}).get('outputs', []):  # el-results' plots of a previous writing not written again
        if name not in outputs and name.endswith('.png') and '__' in name and (out / name).is_file():
            (out / name).unlink()
    with atomic_write(paths['graph.md']) as f:
        f.write(render_markdown(found, runs=runs, smoke=smoke, notes=notes))
    if plots:
        plot(found, paths['graph.png'], smoke=smoke)
    for name in ('graph.md', 'graph.png'):
        if name in paths:
            outputs.append(name)
    write_json(stamp, dict(inputs, outputs=sorted(set(outputs))))
    for name in sorted(set(outputs)):
        sys.stderr.write(f'== wrote {out / name}\n')
    return paths, True


# ----------------------------------------------------------------------------- command line


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer >= 1')
    return int(text)


def _log_end(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number in (0, 1]') from None
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f'{text!r} is not a number in (0, 1]')
    return value


def build_parser(prog: str = PROG) -> Parser:
    parser = Parser(prog=prog, description='Graph classification as in Zhao et al., AAAI 2022, section 5.2 / Fig. 4 '
                                           '(EL_SPEC 6): the stages of scripts/graph.sh.')

    class Sub(Parser):
        def error(self, message):  # '<prog>: error: ...', the subcommand unnamed (graph.sh's lines)
            self.exit(2, f'{prog}: error: {message}\n')

    sub = parser.add_subparsers(dest='command', required=True, parser_class=Sub)

    def common(p, runs_only=False):
        p.add_argument('--work', required=True, help='the work directory (data/tu, runs/<dataset>-<loss>, results)')
        p.add_argument('--datasets', type=list_of(str, 'a name'), default=None, metavar='LIST',
                       help=f'comma-separated TU datasets (default: {",".join(PAPER_DATASETS)}; with --smoke '
                            f'{PAPER_DATASETS[0]})')
        p.add_argument('--smoke', action='store_true',
                       help=f'a short run that checks the recipe, not a result: {SMOKE["runs"]} run, '
                            f'{" ".join(SMOKE["flags"])}, the first dataset only unless --datasets is given')
        if runs_only:
            return
        p.add_argument('--losses', type=list_of(str, 'a name'), default=list(LOSSES), metavar='LIST',
                       help='comma-separated: ce, el')
        p.add_argument('--runs', type=_count, default=None,
                       help=f'runs per dataset and loss (default: {DEFAULTS["runs"]}; {SMOKE["runs"]} with --smoke)')

    for name, what in (('check', 'check the options and every step\'s command; create nothing'),
                       ('train', 'train the runs, interleaved (skip finished ones, resume an unfinished one)')):
        p = sub.add_parser(name, help=what)
        common(p)
        p.add_argument('--data', default=None, help='local TU archives: DIR/tu/NAME.zip or DIR/NAME.zip')
        p.add_argument('--seed', type=seed_number, default=DEFAULTS['seed'], help='seed of run 0 (run r: seed + r)')
        p.add_argument('--log-end', type=_log_end, default=DEFAULTS['log_end'],
                       help='the EL runs\' conservative bonus end point (EL_SPEC 2.1)')
        p.add_argument('--threads', type=_count, default=DEFAULTS['threads'], help='CPU threads of each run')
        if name == 'train':
            p.add_argument('--dry-run', action='store_true', help='print the steps only')
    p = sub.add_parser('prepare', help='WORK/data/tu/NAME.zip from --data (else pyg_el.train downloads)')
    common(p, runs_only=True)
    p.add_argument('--data', default=None, help='local TU archives: DIR/tu/NAME.zip or DIR/NAME.zip')
    p = sub.add_parser('results', help='el-results, graph.md and graph.png in WORK/results')
    common(p)
    p.add_argument('--no-plots', action='store_true', help='no PNGs')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    # PyTorch Geometric's import scripts a few functions with torch.jit, which torch now warns about on every run
    warnings.filterwarnings('ignore', message=r'.*torch\.jit\.script.* is deprecated', category=FutureWarning)
    argv, extra = split_extra(argv)
    prog = PROG
    if argv[:1] == ['--prog'] and len(argv) > 1:  # scripts/graph.sh: its name in the error lines
        prog, argv = argv[1], argv[2:]
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if extra and opts.command not in ('check', 'train'):
        parser.error(f'flags after -- go to the check and train commands only, got {" ".join(extra)!r}')
    datasets = opts.datasets
    if datasets is None:
        datasets = [PAPER_DATASETS[0]] if opts.smoke else list(PAPER_DATASETS)
    try:
        if opts.command == 'prepare':
            for line in prepare(opts.work, datasets, opts.data):
                _say(f'prepare {line}')
            return 0
        runs = opts.runs if opts.runs is not None else (SMOKE['runs'] if opts.smoke else None)
        if opts.command == 'results':
            paths, _ = results(opts.work, datasets, opts.losses, runs, smoke=opts.smoke, plots=not opts.no_plots)
            sys.stdout.write(paths['graph.md'].read_text(encoding='utf-8'))
            return 0
        options = dict(data=opts.data, seed=opts.seed, log_end=opts.log_end, threads=opts.threads, extra=extra,
                       smoke=opts.smoke)
        runs = runs or DEFAULTS['runs']
        if opts.command == 'check':
            check(opts.work, datasets, opts.losses, runs, **options)
            return 0
        return train(opts.work, datasets, opts.losses, runs, dry_run=opts.dry_run, **options)
    except (RecipeError, FileProblem) as err:
        parser.error(str(err))


if __name__ == '__main__':
    sys.exit(main())
