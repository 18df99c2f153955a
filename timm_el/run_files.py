"""The run directory of ``timm-el-train`` (:mod:`timm_el.train`) and its files besides the checkpoints:
the directory itself, ``log.txt``, ``args.yaml`` and other atomic text writes, ``summary.csv``, the
``eval/*.json`` result records and the state digests of the ranks."""
import csv
import hashlib
import io
import logging
import math
import os
import re
import sys
from collections import OrderedDict
from datetime import datetime
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm import utils
from timm.models import safe_model_name

from encouraging_loss.tools.files import FileProblem, atomic_write, check_writable_dir, os_error_line, write_json
from encouraging_loss.tools.results import SCHEMA

from .factory import COMPANION_KWARGS
from .rebalance import SHOT_GROUPS
from .train_args import EL_DEFAULTS, PROG, RECORD_LOSS, UsageError, _one_line

_logger = logging.getLogger('timm_el.train')

#: when set, each rank writes ``rank<R>.sha256`` (the digest of its model's state) into this
#: directory at the end of training: a check that the ranks of a DDP run agree.
DIGEST_ENV = 'TIMM_EL_STATE_DIGEST_DIR'
#: the temporary files of our own atomic writes (``.<name>.<random>.tmp``) that a killed run leaves behind
_OUR_TEMPORARY = re.compile(
    r'\.(?:last\.pth\.tar|model_best\.pth\.tar|checkpoint-\d+\.pth\.tar|summary\.csv|args\.yaml)\.\w+\.tmp')


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
    weights. Metrics: validation ``top1`` and ``top5`` (%), and ``many`` / ``medium`` / ``few`` (%, Kang et
    al. 2020's shot groups) when validation reported them (a group without classes is left out). ``info`` holds
    the epoch (numbered as in ``summary.csv``), the model and the checkpoint
    file with those weights (relative to the record, like ``curve``; None when
    not kept), ``drw`` (``--drw-epoch`` / ``--drw-beta``) and ``crt`` (the ``--crt-from`` checkpoint) when
    used, and ``extra_info`` (the run's ``skipped_train_images`` and ``unreadable_train_images``, the
    ``shot_groups`` thresholds and class counts). Each file is written atomically. Returns the paths written.
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
            if getattr(args, 'drw_epoch', None) is not None:  # DRW (Cao et al. 2019)
                info['drw'] = {'epoch': args.drw_epoch, 'beta': args.drw_beta}
            if getattr(args, 'crt_from', ''):  # cRT (Kang et al. 2020): the first stage's checkpoint
                info['crt'] = {'from': args.crt_from}
            if args.loss == 'encouraging':
                info['el'] = {dest: getattr(args, dest) for dest in EL_DEFAULTS}
            elif args.loss in COMPANION_KWARGS:
                info['companion'] = {dest: getattr(args, dest) for dest in COMPANION_KWARGS[args.loss]}
            metrics = {'top1': float(row[prefix + 'top1']), 'top5': float(row[prefix + 'top5'])}
            # the shot groups (Kang et al. 2020), when validated; an empty group has no number
            metrics.update((group, float(row[prefix + group])) for group in SHOT_GROUPS
                           if row.get(prefix + group) not in (None, ''))
            record = {
                'schema': SCHEMA, 'task': _task_name(args), 'loss': RECORD_LOSS[args.loss], 'seed': args.seed,
                'run': os.path.basename(os.path.normpath(run_dir)), 'checkpoint': name + suffix,
                'metrics': metrics,
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
