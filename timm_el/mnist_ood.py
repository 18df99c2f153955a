""" MNIST vs Fashion-MNIST out-of-distribution detection: data preparation and the summary table

The decisions of ``scripts/mnist_fashion_ood.sh`` (the paper's OOD experiment,
Zhao et al., AAAI 2022, Table 4; EL_SPEC 5: AUROC 95.68 -> 98.04, FPR95
20.92 -> 8.69 from CE to EL, the indicator being the minimum conditional
energy): the script trains the MNIST CNN with CE and EL through
``scripts/mnist.sh`` and analyses each seed's pair with ``el-analyze``, MNIST
test in-distribution and Fashion-MNIST test out of distribution. Here::

    python -m timm_el.mnist_ood prepare --root WORK/data [--data DIR] [--train-limit N] [--test-limit N]
    python -m timm_el.mnist_ood summary WORK/analysis/seed1 [WORK/analysis/seed2 ...] --out WORK/analysis

``prepare`` writes torchvision's layout (``ROOT/MNIST/raw/`` and
``ROOT/FashionMNIST/raw/``, the four uncompressed idx files each) that
``timm-el-train --dataset torch/mnist`` and ``el-analyze --dataset
torch/fashion_mnist`` read without a network: from ``--data`` (the project's
layout ``DIR/mnist/`` and ``DIR/fashion-mnist/`` with the original ``.gz``
files, or torchvision's ``DIR/MNIST/raw/`` and ``DIR/FashionMNIST/raw/``), or
downloaded by torchvision into ``ROOT/download/`` when ``--data`` is not
given. ``--train-limit`` / ``--test-limit`` keep the first N images of each
split (quick runs, tests). A prepared ROOT is kept (``prepared.json`` records
the sources and limits); preparing it again with other limits is refused.

``summary`` reads the seeds' ``report.json`` and writes ``ood_summary.json``
and ``ood_summary.md``: per model, mean +- std over seeds of accuracy, AUROC
and FPR95 by each OOD score, beside the paper's numbers; the table is printed.
"""
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from encouraging_loss.tools.cli import Parser

__all__ = ['DATASETS', 'PAPER', 'MnistOodError', 'build_parser', 'main', 'prepare', 'render_summary',
           'summarize_reports', 'write_idx', 'write_summary']

PROG = 'timm_el.mnist_ood'
#: name -> (torchvision class = folder under ROOT, the project's shared-data folder)
DATASETS = {'mnist': ('MNIST', 'mnist'), 'fashion_mnist': ('FashionMNIST', 'fashion-mnist')}
#: the paper's MNIST vs Fashion-MNIST results (EL_SPEC 5), min conditional energy, percent.
PAPER = {'ce': {'auroc': 95.68, 'fpr95': 20.92}, 'el': {'auroc': 98.04, 'fpr95': 8.69}}
_SPLITS = {'train': 'train', 'test': 't10k'}


class MnistOodError(ValueError):
    """Bad input: one line ``timm_el.mnist_ood: error: ...``, exit status 2."""


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an (uncompressed) idx file: magic ``00 00 08 ndim``, big-endian sizes, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype='>u4').tobytes()
    Path(path).write_bytes(header + array.tobytes())


def _source(data: Path, shared: str, tv: str) -> Path:
    from .analyze import is_idx_dir

    for folder in (data / shared, data / tv / 'raw', data):
        if is_idx_dir(folder) and (folder != data or shared == 'mnist'):
            return folder
    raise MnistOodError(f'--data {str(data)!r}: no {shared} files (looked in {data / shared} and {data / tv / "raw"})')


def _download(root: Path) -> Path:
    """Download MNIST and Fashion-MNIST with torchvision into ``root`` (its layout) and return it."""
    from torchvision import datasets

    for name, (tv, _) in DATASETS.items():
        cls = getattr(datasets, tv)
        for train in (True, False):
            sys.stderr.write(f'== downloading {tv} ({"train" if train else "test"}) into {root}\n')
            try:
                cls(str(root), train=train, download=True)
            except Exception as err:  # noqa: BLE001 -- network errors come in many kinds
                raise MnistOodError(f'downloading {tv} into {root} failed ({" ".join(str(err).split())}); '
                                    f'give a local copy with --data') from None
    return root


def prepare(root, data=None, train_limit: Optional[int] = None, test_limit: Optional[int] = None) -> dict:
    """Write ``ROOT/MNIST/raw`` and ``ROOT/FashionMNIST/raw`` (uncompressed idx files) from ``data``
    (or a torchvision download); returns the ``prepared.json`` record. Skips a ROOT prepared the same way."""
    from .data import load_mnist

    for flag, value in (('--train-limit', train_limit), ('--test-limit', test_limit)):
        if value is not None and value < 1:
            raise MnistOodError(f'{flag} must be an integer >= 1, got {value}')
    root = Path(root)
    if data is not None and not Path(data).is_dir():
        raise MnistOodError(f'--data: directory not found: {str(data)!r}')
    marker = root / 'prepared.json'
    wanted = {'data': str(Path(data).resolve()) if data is not None else 'download',
              'train_limit': train_limit, 'test_limit': test_limit}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in wanted} == wanted:
            sys.stderr.write(f'== {root}: prepared already ({marker})\n')
            return done
        raise MnistOodError(f'--root {str(root)!r} was prepared from {done.get("data")} with limits '
                            f'{done.get("train_limit")}/{done.get("test_limit")}, not {wanted["data"]} with '
                            f'{train_limit}/{test_limit}; use another --work or delete it')
    source_root = Path(data) if data is not None else _download(root / 'download')
    record = dict(wanted, counts={})
    for name, (tv, shared) in DATASETS.items():
        src = _source(source_root, shared, tv)
        raw = root / tv / 'raw'
        raw.mkdir(parents=True, exist_ok=True)
        for split, prefix in _SPLITS.items():
            images, labels = load_mnist(src, split, train_limit if split == 'train' else test_limit)
            write_idx(raw / f'{prefix}-images-idx3-ubyte', images)
            write_idx(raw / f'{prefix}-labels-idx1-ubyte', labels.astype(np.uint8))
            record['counts'][f'{name}/{split}'] = int(len(labels))
        sys.stderr.write(f'== {tv}: {src} -> {raw} ({record["counts"][name + "/train"]} train, '
                         f'{record["counts"][name + "/test"]} test images)\n')
    marker.write_text(json.dumps(record, indent=2) + '\n')
    return record


# ----------------------------------------------------------------------------- summary


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    a = np.asarray(values, dtype=np.float64)
    return {'mean': float(a.mean()), 'std': float(a.std(ddof=1)) if len(a) > 1 else None, 'n': len(a)}


def summarize_reports(report_dirs: Sequence) -> dict:
    """Mean +- std (ddof=1) over the seeds' reports of accuracy and each score's AUROC / FPR95, per model."""
    from encouraging_loss.tools.analysis import OOD_SCORES

    per_model: Dict[str, Dict[str, List[float]]] = {}
    for folder in report_dirs:
        path = Path(folder) / 'report.json'
        if not path.is_file():
            raise MnistOodError(f'REPORT {str(folder)!r}: no report.json')
        models = json.loads(path.read_text()).get('models') or {}
        for name, s in models.items():
            if not s.get('ood'):
                raise MnistOodError(f'{path}: model {name} has no OOD results')
            d = per_model.setdefault(name, {})
            d.setdefault('accuracy', []).append(s['accuracy'])
            for score in OOD_SCORES:
                for metric in ('auroc', 'fpr95'):
                    d.setdefault(f'{score}/{metric}', []).append(s['ood'][score][metric])
    if not per_model:
        raise MnistOodError('no model in the reports')
    return {'reports': [str(f) for f in report_dirs],
            'models': {name: {k: _mean_std(v) for k, v in d.items()} for name, d in per_model.items()},
            'paper': PAPER}


def _cell(stat: Optional[dict]) -> str:
    if not stat:
        return '–'
    return f'{stat["mean"]:.2f}' + (f' ± {stat["std"]:.2f}' if stat.get('std') is not None else '')


def render_summary(summary: dict) -> str:
    """The Markdown table: the paper's indicator (min conditional energy) beside the paper, then all scores."""
    from encouraging_loss.tools.analysis import OOD_SCORES

    models = summary['models']
    seeds = max(s['accuracy']['n'] for s in models.values())
    lines = [f'MNIST (in) vs Fashion-MNIST (out), min conditional energy; mean ± std over {seeds} seed(s)', '',
             '| model | accuracy (%) | AUROC (%) | paper AUROC | FPR95 (%) | paper FPR95 |',
             '|---|---:|---:|---:|---:|---:|']
    for name, s in models.items():
        paper = PAPER.get(name.lower(), {})
        lines.append(f'| {name} | {_cell(s["accuracy"])} | {_cell(s["min_energy/auroc"])} | '
                     f'{paper.get("auroc", "–")} | {_cell(s["min_energy/fpr95"])} | {paper.get("fpr95", "–")} |')
    lines += ['', '| model | ' + ' | '.join(f'AUROC {k} | FPR95 {k}' for k in OOD_SCORES) + ' |',
              '|---|' + '---:|' * (2 * len(OOD_SCORES))]
    for name, s in models.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{_cell(s[k + "/auroc"])} | {_cell(s[k + "/fpr95"])}'
                                                 for k in OOD_SCORES) + ' |')
    return '\n'.join(lines) + '\n'


def write_summary(report_dirs: Sequence, out) -> Dict[str, Path]:
    """Write ``ood_summary.json`` and ``ood_summary.md`` into ``out`` (replacing them: they are derived)."""
    summary = summarize_reports(report_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': out / 'ood_summary.json', 'markdown': out / 'ood_summary.md'}
    paths['json'].write_text(json.dumps(summary, indent=2, allow_nan=False) + '\n')
    paths['markdown'].write_text(render_summary(summary))
    return paths


# ----------------------------------------------------------------------------- command line


def build_parser():
    parser = Parser(prog=PROG, description='MNIST vs Fashion-MNIST OOD experiment (EL_SPEC 5): data preparation '
                                           'and the summary table. Used by scripts/mnist_fashion_ood.sh.')
    sub = parser.add_subparsers(dest='command', required=True, parser_class=Parser)
    p = sub.add_parser('prepare', help='write ROOT/MNIST/raw and ROOT/FashionMNIST/raw')
    p.add_argument('--root', required=True, help='where the torchvision layout goes')
    p.add_argument('--data', default=None, help='local copy (DIR/mnist + DIR/fashion-mnist, or torchvision\'s '
                                                'layout); default: download with torchvision')
    p.add_argument('--train-limit', type=int, default=None, help='first N training images of each dataset')
    p.add_argument('--test-limit', type=int, default=None, help='first N test images of each dataset')
    p = sub.add_parser('summary', help='mean ± std over the seeds\' reports, beside the paper')
    p.add_argument('reports', nargs='+', metavar='REPORT_DIR', help='el-analyze output folders')
    p.add_argument('--out', required=True, help='where ood_summary.json / .md go')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        if opts.command == 'prepare':
            prepare(opts.root, opts.data, opts.train_limit, opts.test_limit)
        else:
            paths = write_summary(opts.reports, opts.out)
            sys.stdout.write(paths['markdown'].read_text())
            for path in paths.values():
                sys.stderr.write(f'== wrote {path}\n')
    except MnistOodError as err:
        parser.error(str(err))
    return 0


if __name__ == '__main__':
    sys.exit(main())
