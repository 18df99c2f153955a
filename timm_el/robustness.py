""" MNIST adversarial robustness: the decisions of ``scripts/mnist_robustness.sh``

The robustness experiments of Zhao et al., AAAI 2022 (section 5.4, appendix C;
EL_SPEC 6): TorchAttacks' MNIST CNN (``mnist_ta_cnn``) trained with CE and EL
over seeds in four *columns*, attacked as in the paper:

* ``clean`` (plain training) attacked by FGSM, PGD, PGD-L2, APGD-DLR (L-infinity
  and L2) and AutoAttack (L-infinity and L2); Table 11 is AutoAttack's;
* ``fgsm``, ``pgd``, ``pgd_l2`` (adversarial training, ``timm-el-train --adv-train
  COLUMN``) each attacked by its own attack (Table 7), plus APGD-DLR of the same
  norm, which does not follow the scale of the loss's input gradient: the check
  for gradient masking.

``WORK`` holds ``data/`` (torchvision's layout, :func:`timm_el.mnist_ood.prepare`),
``<column>/runs/<loss>-seed<seed>/`` (``python -m timm_el.recipe train
mnist_robustness``), ``<column>/attacks/seed<seed>/`` (one ``el-analyze --attack``
report per column and seed, the CE and EL checkpoints side by side) and
``results/``. Here::

    python -m timm_el.robustness prepare --work WORK [--data DIR] [--train-limit N] [--test-limit N]
    python -m timm_el.robustness train   --work WORK --columns clean,fgsm --seeds 1,2 [--smoke] [-- FLAGS]
    python -m timm_el.robustness attack  --work WORK --columns clean --seeds 1 [--max-samples N] [--aa-max-samples N]
    python -m timm_el.robustness results --work WORK --columns clean --seeds 1 [--smoke]
    python -m timm_el.robustness published --out paper.csv [--columns LIST] [--smoke]

``train`` skips finished runs without starting a process and hands every
other run to ``python -m timm_el.recipe train`` (which resumes an interrupted
one). ``attack`` skips a column and seed whose ``report.json`` is complete
(every model, every attack of the column); delete the folder to attack again.
``results`` turns the reports into ``el-result/1`` records (one per run and
attack: task ``mnist_robustness_<column>``, checkpoint = the attack, metrics
``acc@<eps>`` and ``zero_grad_fraction``), writes the paper's numbers as a
``--published`` CSV (:data:`PAPER`) and runs ``el-results`` on them
(``results.csv``, ``summary.csv``, ``summary.md``), then writes
``robustness.md`` (one table per paper table, eps by row, measured mean +- std
beside the paper's) and ``robustness_<column>.png`` (accuracy against eps per
attack, mean and std band per loss, the paper's dashed). It is skipped when
its inputs (the reports, the columns, seeds and losses) have not changed.
"""
import contextlib
import functools
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import Parser, check_choice, list_of, seed_number, split_extra
from encouraging_loss.tools.files import FileProblem, atomic_path, atomic_write, read_json, write_json

from .attacks import ATTACKS, L2_EPS, LINF_EPS

__all__ = [
    'ATTACK_LABELS', 'COLUMNS', 'COLUMN_ATTACKS', 'LOSSES', 'PAPER', 'PAPER_TABLES', 'PRESET', 'RobustnessError',
    'SMOKE_SKIPS', 'analyze_command', 'attack', 'build_parser', 'collect_stats', 'column_attacks', 'main',
    'metric_name', 'model_names',
    'plot_column', 'prepare', 'published_rows', 'render_markdown', 'report_problem', 'report_records', 'results',
    'task_name', 'train', 'train_flags', 'write_published',
]

PROG = 'timm_el.robustness'
PRESET = 'mnist_robustness'
TASK_PREFIX = 'mnist_robustness'
LOSSES = ('ce', 'el')
COLUMNS = ('clean', 'fgsm', 'pgd', 'pgd_l2')
#: the attacks of each column (EL_SPEC 6): the clean models by every attack of the paper plus APGD-DLR, each
#: adversarially trained column by its own attack (Table 7) plus APGD-DLR of the same norm (gradient masking)
COLUMN_ATTACKS: Dict[str, Tuple[str, ...]] = {
    'clean': ('fgsm', 'pgd', 'pgd_l2', 'apgd_dlr', 'apgd_dlr_l2', 'autoattack', 'autoattack_l2'),
    'fgsm': ('fgsm', 'apgd_dlr'),
    'pgd': ('pgd', 'apgd_dlr'),
    'pgd_l2': ('pgd_l2', 'apgd_dlr_l2'),
}
#: attacks a ``--smoke`` run leaves out: AutoAttack costs about a minute per eps and model on a CPU as soon as
#: one image survives, whatever the subset (30 of the smoke run's 40 minutes); APGD-DLR stays as the scale-free check
SMOKE_SKIPS = ('autoattack', 'autoattack_l2')


def column_attacks(column: str, smoke: bool = False) -> Tuple[str, ...]:
    """The attacks of ``column`` (:data:`COLUMN_ATTACKS`); a smoke run's without :data:`SMOKE_SKIPS`."""
    return tuple(a for a in COLUMN_ATTACKS[column] if not (smoke and a in SMOKE_SKIPS))


ATTACK_LABELS = {'fgsm': 'FGSM', 'pgd': 'PGD', 'pgd_l2': 'PGD-L2', 'apgd_dlr': 'APGD-DLR',
                 'apgd_dlr_l2': 'APGD-DLR-L2', 'autoattack': 'AutoAttack', 'autoattack_l2': 'AutoAttack-L2'}
COLUMN_LABELS = {'clean': 'clean training', 'fgsm': 'FGSM adversarial training',
                 'pgd': 'PGD adversarial training', 'pgd_l2': 'PGD-L2 adversarial training'}

#: the paper's accuracies (%), (column, attack) -> loss -> one value per eps of the attack's grid
#: (:data:`timm_el.attacks.LINF_EPS` or :data:`~timm_el.attacks.L2_EPS`; eps 0 is the paper's "none").
#: Table 11 (clean training, AutoAttack) and Table 7 (adversarial training, each column attacked by the attack
#: it was trained with), EL_SPEC 6.
PAPER: Dict[Tuple[str, str], Dict[str, Tuple[float, ...]]] = {
    ('clean', 'autoattack'): {'ce': (98.69, 93.51, 74.89, 32.98, 5.04, 0.01, 0.0),
                              'el': (99.04, 94.99, 79.31, 37.74, 7.59, 0.26, 0.0)},
    ('clean', 'autoattack_l2'): {'ce': (98.69, 96.76, 80.76, 0.05, 0.0, 0.0, 0.0),
                                 'el': (99.04, 97.54, 84.03, 0.27, 0.0, 0.0, 0.0)},
    ('fgsm', 'fgsm'): {'ce': (95.43, 92.59, 91.01, 89.79, 89.30, 89.09, 87.87),
                       'el': (97.21, 95.81, 95.18, 95.16, 95.33, 95.09, 94.15)},
    ('pgd', 'pgd'): {'ce': (94.30, 92.32, 89.89, 87.07, 84.51, 82.17, 79.72),
                     'el': (96.88, 95.77, 94.48, 93.03, 91.79, 90.84, 90.03)},
    ('pgd_l2', 'pgd_l2'): {'ce': (98.97, 98.38, 93.88, 10.83, 0.01, 0.01, 0.01),
                           'el': (98.98, 98.40, 94.36, 76.22, 76.22, 76.22, 76.22)},
}
#: the paper's tables as robustness.md shows them: (title, what, the (column, attack) panels)
PAPER_TABLES = (
    ('Table 11', 'clean training, AutoAttack', (('clean', 'autoattack'), ('clean', 'autoattack_l2'))),
    ('Table 7', 'adversarial training, each column trained and attacked with the same attack',
     (('fgsm', 'fgsm'), ('pgd', 'pgd'), ('pgd_l2', 'pgd_l2'))),
)
ZERO_GRAD = 'zero_grad_fraction'
RESULT_FILES = ('results.csv', 'summary.csv', 'summary.md', 'robustness.md', 'published.csv')


class RobustnessError(ValueError):
    """Bad input: one line ``timm_el.robustness: error: ...``, exit status 2."""


#: a list option's values checked (one line naming the flag), raising RobustnessError
_check_choice = functools.partial(check_choice, error=RobustnessError)


def _say(line: str) -> None:
    sys.stderr.write(f'== {line}\n')
    sys.stderr.flush()


def eps_grid(attack: str) -> Tuple[float, ...]:
    """The paper's eps grid of an attack (Table 7 / Table 11): L-infinity or L2 by its norm."""
    return LINF_EPS if ATTACKS[attack].norm == 'Linf' else L2_EPS


def metric_name(eps: float) -> str:
    """The record metric of the accuracy at ``eps``: ``acc@0``, ``acc@0.05``, ``acc@1``, ``acc@100``."""
    return f'acc@{float(eps):g}'


def task_name(column: str, smoke: bool = False) -> str:
    """The records' task of a column: ``mnist_robustness_<column>`` (``..._smoke`` for a smoke run)."""
    return f'{TASK_PREFIX}_{column}' + ('_smoke' if smoke else '')


def model_names(losses: Sequence[str]) -> List[str]:
    """The report's model names of the losses (``--names`` of el-analyze): ``CE``, ``EL``."""
    return [loss.upper() for loss in losses]


def train_flags(column: str, extra: Sequence[str] = ()) -> List[str]:
    """The ``timm-el-train`` flags of a column's runs: ``--adv-train COLUMN`` for the adversarial ones, then
    ``extra``; the clean column's runs get ``extra`` alone (the recipe's own command, nothing added)."""
    return ([] if column == 'clean' else ['--adv-train', column]) + list(extra)


# ----------------------------------------------------------------------------- prepare


def prepare(work, data=None, train_limit: Optional[int] = None, test_limit: Optional[int] = None) -> dict:
    """``WORK/data`` in torchvision's layout (:func:`timm_el.mnist_ood.prepare`, EL_SPEC 6's MNIST).

    Without ``data`` a folder prepared already (from any source) is kept when its limits are the same, so a
    later run of the recipe without ``--data`` reuses it; with ``data`` the source must match too."""
    from .mnist_ood import MnistOodError
    from .mnist_ood import prepare as prepare_mnist

    root = Path(work) / 'data'
    marker = root / 'prepared.json'
    if data is None and marker.is_file():
        try:
            done = read_json(marker, 'preparation record')
        except FileProblem as err:
            raise RobustnessError(str(err)) from None
        if (done.get('train_limit'), done.get('test_limit')) == (train_limit, test_limit):
            _say(f'{root}: prepared already from {done.get("data")} ({marker}), skipping')
            return done
        raise RobustnessError(f'{root} was prepared with limits {done.get("train_limit")}/{done.get("test_limit")}, '
                              f'not {train_limit}/{test_limit}; use another --work or delete it')
    try:
        return prepare_mnist(root, data, train_limit, test_limit)
    except MnistOodError as err:
        raise RobustnessError(str(err)) from None


# ----------------------------------------------------------------------------- train


def train(work, columns: Sequence[str], seeds: Sequence[int], losses: Sequence[str] = LOSSES, *,
          log_end: Optional[float] = None, smoke: bool = False, extra: Sequence[str] = (),
          dry_run: bool = False) -> int:
    """Train every (column, loss, seed) run, ``WORK/<column>/runs/<loss>-seed<seed>`` (EL_SPEC 6; the
    adversarial columns with ``--adv-train COLUMN``): a finished run is skipped here, every other one goes to
    ``python -m timm_el.recipe train mnist_robustness`` (:func:`timm_el.recipe.main`, in this process: a new
    run, or an interrupted one resumed).
    Every command is checked first (``timm_el.recipe check``). Returns the exit status."""
    from . import recipe

    work = Path(work)
    _check_choice('--columns', columns, COLUMNS)
    _check_choice('--losses', losses, LOSSES)
    if log_end is not None and 'el' not in losses:
        raise RobustnessError(f'--log-end applies to the el runs, but --losses is {",".join(losses)!r}')
    todo = [(c, loss, s) for c in columns for loss in losses for s in seeds
            if recipe.run_state(work / c / 'runs' / f'{loss}-seed{s}') != 'finished']
    for c in columns:
        for loss in losses:
            for s in seeds:
                if (c, loss, s) not in todo:
                    _say(f'train {c} {loss}-seed{s}: finished ({work / c / "runs" / f"{loss}-seed{s}"}), skipping')
    if not todo:
        return 0
    if not (work / 'data' / 'prepared.json').is_file():
        raise RobustnessError(f'{work / "data"} is not prepared (run the prepare stage)')

    def common(c):
        args = ['--work', str(work / c), '--data', str(work / 'data'), '--dataset', 'torch/mnist']
        return args + (['--smoke'] if smoke else [])

    for c in _unique(c for c, _, _ in todo):  # every command checked before anything is trained
        ls = [loss for loss in losses if any(t[:2] == (c, loss) for t in todo)]
        code = recipe.main(['check', PRESET, *common(c), '--losses', ' '.join(ls), '--seeds',
                            ' '.join(str(s) for s in _unique(s for c2, _, s in todo if c2 == c)),
                            *(['--log-end', repr(float(log_end))] if log_end is not None and 'el' in ls else []),
                            '--', *train_flags(c, extra)])
        if code:
            return code
    for n, (c, loss, s) in enumerate(todo, 1):
        args = ['train', PRESET, *common(c), '--loss', loss, '--seed', str(s)]
        if loss == 'el' and log_end is not None:
            args += ['--log-end', repr(float(log_end))]
        if dry_run:
            args.append('--dry-run')
        _say(f'train {c} {loss}-seed{s} ({n}/{len(todo)}) -> {work / c / "runs" / f"{loss}-seed{s}"}')
        # python -m timm_el.recipe train, in this process: it skips, resumes or starts the run
        code = recipe.main([*args, '--', *train_flags(c, extra)])
        if code:
            _say(f'train {c} {loss}-seed{s}: stopped with exit status {code}')
            return code if code > 0 else 128 - code
    return 0


def _unique(items) -> List:
    """The items in their first order, without repeats."""
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


# ----------------------------------------------------------------------------- attack


def report_problem(out, names: Sequence[str], attacks: Sequence[str]) -> Optional[str]:
    """Why ``out/report.json`` is not a complete attack report (interface 1 of issue 19: every model of
    ``names`` with every attack of ``attacks``, an accuracy per eps), or None when it is one."""
    path = Path(out) / 'report.json'
    if not path.is_file():
        return f'{path} was not written'
    try:
        report = read_json(path, 'report')
    except FileProblem as err:
        return str(err)
    models = report.get('models')
    if not isinstance(models, dict):
        return f'{path} has no models'
    for name in names:
        model = models.get(name)
        if not isinstance(model, dict):
            return f'{path} has no model {name}'
        done = model.get('attacks') if isinstance(model.get('attacks'), dict) else {}
        for a in attacks:
            entry = done.get(a)
            if not isinstance(entry, dict):
                return f'{path}: model {name} was not attacked by {a}'
            eps, acc = entry.get('eps'), entry.get('accuracy')
            if not (isinstance(eps, list) and isinstance(acc, list) and eps and len(eps) == len(acc)):
                return f'{path}: model {name}, attack {a}: no accuracy for every eps'
    return None


def analyze_command(work, column: str, seed: int, losses: Sequence[str] = LOSSES, *,
                    max_samples: Optional[int] = None, aa_max_samples: Optional[int] = None,
                    device: Optional[str] = None, python: str = sys.executable, smoke: bool = False) -> List[str]:
    """The ``el-analyze`` command attacking one column's CE and EL runs of one seed (EL_SPEC 6):
    MNIST test, the column's attacks (:func:`column_attacks`) on the paper's eps grids, into
    ``WORK/<column>/attacks/seed<seed>``."""
    work = Path(work)
    runs = [str(work / column / 'runs' / f'{loss}-seed{seed}') for loss in losses]
    cmd = [python, '-m', 'timm_el.analyze', *runs, '--names', *model_names(losses),
           '--data-dir', str(work / 'data'), '--dataset', 'torch/mnist', '--split', 'test',
           '--attack', ','.join(column_attacks(column, smoke)), '--out', str(work / column / 'attacks' / f'seed{seed}'),
           '--force']
    if max_samples is not None:
        cmd += ['--max-samples', str(max_samples)]
    if aa_max_samples is not None:
        cmd += ['--aa-max-samples', str(aa_max_samples)]
    if device:
        cmd += ['--device', device]
    return cmd


def _default_device() -> str:
    import torch

    return 'cuda' if torch.cuda.is_available() else 'cpu'


def attack(work, columns: Sequence[str], seeds: Sequence[int], losses: Sequence[str] = LOSSES, *,
           max_samples: Optional[int] = None, aa_max_samples: Optional[int] = None, device: Optional[str] = None,
           python: str = sys.executable, smoke: bool = False) -> int:
    """Attack every (column, seed) pair of runs with el-analyze (:func:`analyze_command`), skipping those
    whose report is complete (:func:`report_problem`). Returns the exit status."""
    from .recipe import run_state

    work = Path(work)
    _check_choice('--columns', columns, COLUMNS)
    _check_choice('--losses', losses, LOSSES)
    for flag, value in (('--max-samples', max_samples), ('--aa-max-samples', aa_max_samples)):
        if value is not None and value < 1:
            raise RobustnessError(f'{flag} must be an integer >= 1, got {value}')
    pairs = [(c, s) for c in columns for s in seeds]
    todo = []
    for c, s in pairs:
        out = work / c / 'attacks' / f'seed{s}'
        problem = report_problem(out, model_names(losses), column_attacks(c, smoke))
        if problem is None:
            _say(f'attack {c} seed {s}: done ({out / "report.json"}), skipping; delete {out} to attack again')
            continue
        for loss in losses:
            run = work / c / 'runs' / f'{loss}-seed{s}'
            if run_state(run) != 'finished':
                raise RobustnessError(f'no finished {loss} run for column {c}, seed {s} ({run}); run the train stage')
        todo.append((c, s, out, problem))
    if todo and device is None:
        device = _default_device()
    for n, (c, s, out, problem) in enumerate(todo, 1):
        if (out / 'report.json').exists():
            _say(f'attack {c} seed {s}: {problem}; attacking again (its report is replaced)')
        cmd = analyze_command(work, c, s, losses, max_samples=max_samples, aa_max_samples=aa_max_samples,
                              device=device, python=python, smoke=smoke)
        _say(f'attack {c} seed {s} ({n}/{len(todo)}): {", ".join(column_attacks(c, smoke))} on {device} -> {out}')
        code = subprocess.call(cmd, stdout=subprocess.DEVNULL)
        if code:
            _say(f'attack {c} seed {s}: el-analyze stopped with exit status {code}')
            return code if code > 0 else 128 - code
        problem = report_problem(out, model_names(losses), column_attacks(c, smoke))
        if problem is not None:
            raise RobustnessError(f'el-analyze ended but {problem}')
    return 0


# ----------------------------------------------------------------------------- records


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RobustnessError(f'{where}: {value!r} is not a finite number')
    return float(value)


def report_records(report: Mapping, *, column: str, seed: int, smoke: bool = False, source: str = 'report.json',
                   losses: Sequence[str] = LOSSES) -> List[dict]:
    """The ``el-result/1`` records of one el-analyze attack report (EL_SPEC 6): one per model (loss) and attack,
    task ``mnist_robustness_<column>``, checkpoint the attack, metrics ``acc@<eps>`` (accuracy %, per eps) and
    ``zero_grad_fraction`` (the model's clean test points with an exactly zero input gradient), info: samples,
    subset, norm. Models whose loss is not in ``losses`` are left out; a name that is no loss is refused."""
    models = report.get('models')
    if not isinstance(models, dict) or not models:
        raise RobustnessError(f'{source}: no models')
    records = []
    for name, model in models.items():
        loss = str(name).lower()
        if loss not in LOSSES:
            raise RobustnessError(f'{source}: model {name!r} is not one of {", ".join(model_names(LOSSES))}')
        if loss not in losses:
            continue
        attacks = model.get('attacks') if isinstance(model, dict) else None
        if not isinstance(attacks, dict) or not attacks:
            raise RobustnessError(f'{source}: model {name} has no attacks')
        gradient = model.get('input_gradient') or {}
        zero = gradient.get('zero_fraction') if isinstance(gradient, dict) else None
        for a, entry in attacks.items():
            where = f'{source}: models.{name}.attacks.{a}'
            eps, acc = entry.get('eps'), entry.get('accuracy')
            if not isinstance(eps, list) or not isinstance(acc, list) or len(eps) != len(acc) or not eps:
                raise RobustnessError(f'{where}: eps and accuracy must be lists of the same length')
            metrics = {metric_name(_number(e, f'{where}.eps')): _number(v, f'{where}.accuracy')
                       for e, v in zip(eps, acc)}
            if zero is not None:
                metrics[ZERO_GRAD] = _number(zero, f'{source}: models.{name}.input_gradient.zero_fraction')
            info = {'samples': entry.get('samples'), 'subset': bool(entry.get('subset')),
                    'norm': entry.get('norm', ATTACKS[a].norm if a in ATTACKS else None),
                    'column': column, 'attack': a, 'model': name, 'report': source}
            if isinstance(gradient, dict) and 'samples' in gradient:
                info['input_gradient_samples'] = gradient['samples']
            records.append({'schema': 'el-result/1', 'task': task_name(column, smoke), 'loss': loss,
                            'seed': int(seed), 'run': f'{loss}-seed{seed}', 'checkpoint': a, 'metrics': metrics,
                            'info': info})
    return records


def published_rows(columns: Sequence[str] = COLUMNS, smoke: bool = False) -> List[dict]:
    """The paper's numbers (:data:`PAPER`, EL_SPEC 6 Tables 7 and 11) as el-results ``--published`` rows:
    task ``mnist_robustness_<column>``, loss, metric ``acc@<eps>``, mean, std (none published), checkpoint
    = the attack."""
    rows = []
    for (column, a), by_loss in PAPER.items():
        if column not in columns:
            continue
        for loss, values in by_loss.items():
            for eps, value in zip(eps_grid(a), values):
                rows.append({'task': task_name(column, smoke), 'loss': loss, 'metric': metric_name(eps),
                             'mean': value, 'std': '', 'checkpoint': a})
    return rows


def write_published(path, columns: Sequence[str] = COLUMNS, smoke: bool = False) -> Path:
    """:func:`published_rows` as a CSV (task, loss, metric, mean, std, checkpoint), written atomically."""
    import csv

    path = Path(path)
    with atomic_write(path, newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['task', 'loss', 'metric', 'mean', 'std', 'checkpoint'])
        writer.writeheader()
        for row in published_rows(columns, smoke):
            writer.writerow(dict(row, mean=f'{row["mean"]:g}'))
    return path


# ----------------------------------------------------------------------------- tables and plots


def _eps_of(metric: str) -> Optional[float]:
    if not metric.startswith('acc@'):
        return None
    try:
        return float(metric[4:])
    except ValueError:
        return None


def collect_stats(records: Sequence[Mapping]) -> dict:
    """Mean +- std (ddof=1) over seeds: ``{(column, attack): {'acc': {loss: {eps: MetricStats}},
    'zero': {loss: MetricStats}, 'samples': {(n, subset), ...}, 'norm': 'Linf'|'L2'}}``."""
    from encouraging_loss.tools.results import describe

    values: Dict[Tuple[str, str], dict] = {}
    for r in records:
        info = r.get('info') or {}
        key = (info.get('column'), r['checkpoint'])
        d = values.setdefault(key, {'acc': {}, 'zero': {}, 'samples': set(), 'norm': info.get('norm')})
        d['samples'].add((info.get('samples'), bool(info.get('subset'))))
        for metric, v in r['metrics'].items():
            eps = _eps_of(metric)
            if eps is not None:
                d['acc'].setdefault(r['loss'], {}).setdefault(eps, []).append(v)
            elif metric == ZERO_GRAD:
                d['zero'].setdefault(r['loss'], []).append(v)
    for d in values.values():
        d['acc'] = {loss: {e: describe(v) for e, v in sorted(by_eps.items())} for loss, by_eps in d['acc'].items()}
        d['zero'] = {loss: describe(v) for loss, v in d['zero'].items()}
    return values


def _cell(st, seeds: int) -> str:
    if st is None:
        return '–'
    text = f'{st.mean:.2f}' + (f' ± {st.std:.2f}' if st.std is not None else '')
    return text + (f' (n={st.n})' if st.n != seeds else '')


def _eps_label(eps: float) -> str:
    return f'{eps:g}' + (' (none)' if eps == 0 else '')


def _block(stats: dict, panels: Sequence[Tuple[str, str]], losses: Sequence[str], seeds: int, paper: bool,
           label) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of one norm's block: an eps column, then per panel the measured losses (and the paper's)."""
    grid = sorted({e for p in panels for by_eps in stats[p]['acc'].values() for e in by_eps}
                  | {e for p in panels if paper and p in PAPER for e in eps_grid(p[1])})
    header = [f'{stats[panels[0]]["norm"] or ATTACKS[panels[0][1]].norm} eps']
    for p in panels:
        header += [f'{label(p)} {loss.upper()}' for loss in losses]
        if paper and p in PAPER:
            header += [f'paper {loss.upper()}' for loss in losses if loss in PAPER[p]]
    rows = []
    for e in grid:
        row = [_eps_label(e)]
        for p in panels:
            row += [_cell(stats[p]['acc'].get(loss, {}).get(e), seeds) for loss in losses]
            if paper and p in PAPER:
                paper_eps = list(eps_grid(p[1]))
                for loss in losses:
                    if loss in PAPER[p]:
                        row.append(f'{PAPER[p][loss][paper_eps.index(e)]:.2f}' if e in paper_eps else '–')
        rows.append(row)
    return header, rows


def _table(stats: dict, panels: Sequence[Tuple[str, str]], losses: Sequence[str], seeds: int, paper: bool,
           label) -> List[str]:
    """The panels' blocks side by side (L-infinity first, L2 after), as the paper prints them."""
    blocks = []
    for norm in ('Linf', 'L2'):
        mine = [p for p in panels if (stats[p]['norm'] or ATTACKS[p[1]].norm) == norm]
        if mine:
            blocks.append(_block(stats, mine, losses, seeds, paper, label))
    header = [h for b in blocks for h in b[0]]
    height = max(len(b[1]) for b in blocks)
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---' if h.endswith(' eps') else '---:' for h in header) + '|']
    for k in range(height):
        cells = []
        for h, rows in blocks:
            cells += rows[k] if k < len(rows) else [''] * len(h)
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def _samples_note(stats: dict, panels: Sequence[Tuple[str, str]]) -> str:
    """``Samples: AutoAttack, AutoAttack-L2: 1000 test images (a fixed seeded subset).`` (counts that differ
    between runs joined by ``/``)."""
    groups: Dict[str, List[str]] = {}
    for p in panels:
        counts = sorted({n for n, _ in stats[p]['samples']}, key=lambda n: (n is None, n or 0))
        subset = any(s for _, s in stats[p]['samples'])
        text = ' / '.join(str(n) for n in counts) + ' test images' + (' (a fixed seeded subset)' if subset else '')
        groups.setdefault(text, []).append(ATTACK_LABELS.get(p[1], p[1]))
    return 'Samples: ' + '; '.join(f'{", ".join(names)}: {text}' for text, names in groups.items()) + '.'


def render_markdown(records: Sequence[Mapping], *, seeds: Sequence[int] = (), smoke: bool = False) -> str:
    """``robustness.md`` (EL_SPEC 6): one table per paper table (Table 11: clean training, AutoAttack; Table 7:
    adversarial training), eps by row, measured mean ± std over seeds beside the paper's, with the sample
    counts; then the attacks without published numbers (APGD-DLR: the gradient-masking check) and the fraction
    of test points whose input gradient is exactly zero."""
    stats = collect_stats(records)
    losses = [loss for loss in LOSSES if any(r['loss'] == loss for r in records)]
    n_seeds = len(seeds) or len({r['seed'] for r in records})
    seed_text = ', '.join(str(s) for s in seeds) if seeds else str(n_seeds)
    lines = ['# MNIST adversarial robustness' + (' (smoke run: not a result)' if smoke else ''), '',
             'Zhao et al., AAAI 2022, section 5.4 and appendix C (EL_SPEC 6): accuracy (%) under attack, '
             f'mean ± std over seeds {seed_text} (n=k: a cell with fewer runs); "paper": the published number '
             '(eps 0 is the paper\'s "none").', '']
    shown = set()
    for title, what, panels in PAPER_TABLES:
        mine = [p for p in panels if p in stats]
        if not mine:
            continue
        shown.update(mine)
        lines += [f'## {title}: {what}', '']
        lines += _table(stats, mine, losses, n_seeds, True, lambda p: ATTACK_LABELS[p[1]])
        lines += ['', _samples_note(stats, mine), '']
    rest = [p for p in stats if p not in shown]
    for column in _unique(p[0] for p in rest):
        mine = [p for p in rest if p[0] == column]
        lines += [f'## {COLUMN_LABELS.get(column, column)}: the other attacks (no published numbers)', '']
        lines += _table(stats, mine, losses, n_seeds, False, lambda p: ATTACK_LABELS.get(p[1], p[1]))
        lines += ['', _samples_note(stats, mine), '']
    zero = {p[0]: stats[p]['zero'] for p in stats if stats[p]['zero']}
    if zero:
        lines += ['## Gradient masking indicator', '',
                  'Fraction of the clean test points whose cross-entropy input gradient is exactly zero in float32: '
                  'FGSM and PGD get no direction there, so their accuracy overstates robustness (APGD-DLR does not '
                  'depend on that gradient\'s scale).', '',
                  '| column | ' + ' | '.join(loss.upper() for loss in losses) + ' |',
                  '|---|' + '---:|' * len(losses)]
        for column, by_loss in zero.items():
            cells = [('–' if by_loss.get(loss) is None else
                      f'{by_loss[loss].mean:.4f}' + (f' ± {by_loss[loss].std:.4f}' if by_loss[loss].std is not None
                                                     else '')) for loss in losses]
            lines.append(f'| {column} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def plot_column(records: Sequence[Mapping], column: str, path, *, smoke: bool = False) -> Optional[Path]:
    """``robustness_<column>.png``: accuracy against eps, a panel per attack, per loss the mean over seeds with
    a ±1 std band, the paper's numbers dashed (EL_SPEC 6; like the paper's Fig. 7). None if no record."""
    from encouraging_loss.tools.results import loss_colours
    from encouraging_loss.tools.results.plots import new_figure

    stats = {p: d for p, d in collect_stats(records).items() if p[0] == column}
    if not stats:
        return None
    attacks = [a for a in COLUMN_ATTACKS.get(column, ()) if (column, a) in stats]
    attacks += [p[1] for p in stats if p[1] not in attacks]
    losses = [loss for loss in LOSSES if any(loss in stats[(column, a)]['acc'] for a in attacks)]
    colours = loss_colours(losses)
    cols = min(4, len(attacks))
    rows = -(-len(attacks) // cols)
    fig = new_figure(3.6 * cols + 0.4, 3.2 * rows + 0.6)
    for k, a in enumerate(attacks, 1):
        d = stats[(column, a)]
        ax = fig.add_subplot(rows, cols, k)
        grid = sorted({e for by_eps in d['acc'].values() for e in by_eps} |
                      (set(eps_grid(a)) if (column, a) in PAPER else set()))
        x_of = {e: i for i, e in enumerate(grid)}
        for loss in losses:
            by_eps = d['acc'].get(loss, {})
            if by_eps:
                xs = [x_of[e] for e in by_eps]
                mean = [st.mean for st in by_eps.values()]
                std = [st.std or 0.0 for st in by_eps.values()]
                n = max(st.n for st in by_eps.values())
                ax.plot(xs, mean, '-o', color=colours[loss], ms=3.5, label=f'{loss.upper()} (n={n})')
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colours[loss], alpha=0.2, linewidth=0)
            if (column, a) in PAPER and loss in PAPER[(column, a)]:
                ax.plot([x_of[e] for e in eps_grid(a)], PAPER[(column, a)][loss], '--', color=colours[loss],
                        linewidth=1.2, label=f'{loss.upper()} paper')
        ax.set_xticks(range(len(grid)))
        ax.set_xticklabels([f'{e:g}' for e in grid], fontsize=7)
        ax.set_ylim(-3, 103)
        ax.set_xlabel(f'eps ({d["norm"] or ATTACKS[a].norm})', fontsize=8)
        ax.set_ylabel('accuracy (%)', fontsize=8)
        samples = ', '.join(str(n) for n in _unique(n for n, _ in sorted(d['samples'], key=str)))
        subset = ', a subset' if any(s for _, s in d['samples']) else ''
        ax.set_title(f'{ATTACK_LABELS.get(a, a)} ({samples} test images{subset})', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='best')
    fig.suptitle(f'{task_name(column, smoke)}: {COLUMN_LABELS.get(column, column)}; mean ± std over seeds, '
                 'paper dashed', fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    return path


# ----------------------------------------------------------------------------- results


def _inputs(work: Path, columns, seeds, losses, smoke) -> dict:
    reports = []
    for c in columns:
        for s in seeds:
            path = work / c / 'attacks' / f'seed{s}' / 'report.json'
            if not path.is_file():
                raise RobustnessError(f'no attack report {path} (run the attack stage)')
            st = path.stat()
            reports.append([c, s, str(path), st.st_mtime_ns, st.st_size])
    return {'columns': list(columns), 'seeds': list(seeds), 'losses': list(losses), 'smoke': bool(smoke),
            'reports': reports}


def results(work, columns: Sequence[str], seeds: Sequence[int], losses: Sequence[str] = LOSSES, *,
            smoke: bool = False, plots: bool = True) -> Tuple[Dict[str, Path], bool]:
    """``WORK/results`` from the attack reports (EL_SPEC 6): the ``el-result/1`` records
    (``records/<column>/seed<seed>/<loss>__<attack>.json``), ``published.csv`` (the paper's numbers), el-results'
    ``results.csv`` / ``summary.csv`` / ``summary.md`` (mean +- std over seeds beside the paper's),
    ``robustness.md`` and ``robustness_<column>.png``. Skipped when ``inputs.json`` says the reports, columns,
    seeds and losses are those of the files there; otherwise every file is written again (they are derived).
    Returns the paths and whether they were written (False: skipped)."""
    from encouraging_loss.tools.results import main as results_main

    work = Path(work)
    _check_choice('--columns', columns, COLUMNS)
    _check_choice('--losses', losses, LOSSES)
    out = work / 'results'
    inputs = _inputs(work, columns, seeds, losses, smoke)
    stamp = out / 'inputs.json'
    pngs = {c: out / f'robustness_{c}.png' for c in columns} if plots else {}
    paths = {name: out / name for name in RESULT_FILES}
    paths.update({f'robustness_{c}.png': p for c, p in pngs.items()})
    if stamp.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if read_json(stamp, 'inputs record') == inputs:
                _say(f'results: up to date ({out}), skipping')
                return paths, False
        except FileProblem:
            pass
    records = []
    if (out / 'records').is_dir():
        shutil.rmtree(out / 'records')  # derived from the reports: written again whole
    for c, s, report_path, _, _ in inputs['reports']:
        try:
            report = read_json(report_path, 'report')
        except FileProblem as err:
            raise RobustnessError(str(err)) from None
        rel = os.path.relpath(report_path, work)
        mine = report_records(report, column=c, seed=s, smoke=smoke, source=rel, losses=losses)
        missing = [loss for loss in losses if not any(r['loss'] == loss for r in mine)]
        if missing:
            raise RobustnessError(f'{report_path}: no model {", ".join(model_names(missing))}')
        for r in mine:
            path = out / 'records' / c / f'seed{s}' / f'{r["loss"]}__{r["checkpoint"]}.json'
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, r)
        records += mine
    write_published(paths['published.csv'], columns, smoke)
    _say(f'results: {len(records)} records ({len(inputs["reports"])} reports) -> {out / "records"}; el-results')
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = results_main([str(out / 'records'), '--out', str(out), '--force', '--no-plots',
                             '--published', str(paths['published.csv'])])
    if code:
        raise RobustnessError(f'el-results failed on {out / "records"} (exit status {code}; see above)')
    with atomic_write(paths['robustness.md']) as f:
        f.write(render_markdown(records, seeds=seeds, smoke=smoke))
    for c, png in pngs.items():
        plot_column(records, c, png, smoke=smoke)
    write_json(stamp, inputs)
    return paths, True


# ----------------------------------------------------------------------------- command line


def build_parser():
    parser = Parser(prog=PROG, description='MNIST adversarial robustness (Zhao et al., AAAI 2022, section 5.4; '
                                           'EL_SPEC 6): the stages of scripts/mnist_robustness.sh.')
    sub = parser.add_subparsers(dest='command', required=True, parser_class=Parser)

    def common(p, seeds=True):
        p.add_argument('--work', required=True, help='the work directory (data/, <column>/runs, <column>/attacks, '
                                                     'results/)')
        p.add_argument('--columns', type=list_of(str, 'a name'), default=list(COLUMNS), metavar='LIST',
                       help=f'comma-separated: {", ".join(COLUMNS)}')
        if seeds:
            p.add_argument('--seeds', type=list_of(seed_number, 'a non-negative integer'), default=[1, 2, 3],
                           metavar='LIST', help='seeds')
            p.add_argument('--losses', type=list_of(str, 'a name'), default=list(LOSSES), metavar='LIST',
                           help='ce, el')

    p = sub.add_parser('prepare', help='WORK/data: MNIST in torchvision\'s layout')
    p.add_argument('--work', required=True, help='the work directory')
    p.add_argument('--data', default=None, help='local copy (DIR/mnist + DIR/fashion-mnist, or torchvision\'s '
                                                'layout); default: download, or keep WORK/data if prepared')
    p.add_argument('--train-limit', type=int, default=None, help='first N training images')
    p.add_argument('--test-limit', type=int, default=None, help='first N test images')
    p = sub.add_parser('train', help='train the runs (skip finished ones, resume interrupted ones)')
    common(p)
    p.add_argument('--log-end', type=float, default=None, help='EL\'s log_end (default: the preset\'s, 0.75)')
    p.add_argument('--smoke', action='store_true', help='the preset\'s smoke flags (1 epoch), task <task>_smoke')
    p.add_argument('--dry-run', action='store_true', help='print the commands only')
    p = sub.add_parser('attack', help='el-analyze --attack per column and seed (skip complete reports)')
    common(p)
    p.add_argument('--max-samples', type=int, default=None, help='el-analyze --max-samples (default: all)')
    p.add_argument('--aa-max-samples', type=int, default=None,
                   help='el-analyze --aa-max-samples: AutoAttack and APGD on a fixed subset (default: el-analyze\'s)')
    p.add_argument('--device', default=None, help='el-analyze --device (default: cuda if available, else cpu)')
    p.add_argument('--smoke', action='store_true', help='a smoke run: no AutoAttack (SMOKE_SKIPS), APGD-DLR stays')
    p = sub.add_parser('results', help='records, el-results, robustness.md and PNGs in WORK/results')
    common(p)
    p.add_argument('--smoke', action='store_true', help='the records\' tasks end in _smoke')
    p.add_argument('--no-plots', action='store_true', help='no robustness_<column>.png')
    p = sub.add_parser('published', help='the paper\'s numbers as an el-results --published CSV')
    p.add_argument('--out', required=True, help='the CSV to write')
    p.add_argument('--columns', type=list_of(str, 'a name'), default=list(COLUMNS), metavar='LIST', help='columns')
    p.add_argument('--smoke', action='store_true', help='tasks ending in _smoke')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = build_parser()
    opts = parser.parse_args(argv)
    if extra and opts.command != 'train':
        parser.error(f'flags after -- go to the train command only, got {" ".join(extra)!r}')
    try:
        if opts.command == 'prepare':
            prepare(opts.work, opts.data, opts.train_limit, opts.test_limit)
            return 0
        if opts.command == 'published':
            _check_choice('--columns', opts.columns, COLUMNS)
            _say(f'wrote {write_published(opts.out, opts.columns, opts.smoke)}')
            return 0
        if not opts.seeds:
            raise RobustnessError('--seeds: no seed given')
        if len(set(opts.seeds)) != len(opts.seeds):
            raise RobustnessError(f'--seeds: a seed given twice ({" ".join(map(str, opts.seeds))})')
        if opts.command == 'train':
            return train(opts.work, opts.columns, opts.seeds, opts.losses, log_end=opts.log_end, smoke=opts.smoke,
                         extra=extra, dry_run=opts.dry_run)
        if opts.command == 'attack':
            return attack(opts.work, opts.columns, opts.seeds, opts.losses, max_samples=opts.max_samples,
                          aa_max_samples=opts.aa_max_samples, device=opts.device, smoke=opts.smoke)
        paths, written = results(opts.work, opts.columns, opts.seeds, opts.losses, smoke=opts.smoke,
                                 plots=not opts.no_plots)
        sys.stdout.write(paths['robustness.md'].read_text())
        for name, path in paths.items():
            if written and name not in ('results.csv', 'summary.csv', 'summary.md'):  # el-results names those
                sys.stderr.write(f'== wrote {path}\n')
        return 0
    except RobustnessError as err:
        parser.error(str(err))
    except FileProblem as err:
        parser.error(str(err))


if __name__ == '__main__':
    sys.exit(main())
