"""The checkpoints of a ``timm-el-train`` run (:mod:`timm_el.train`) and what exact resume needs: the
run's checkpoint saver (``last``, ``model_best``, the ``checkpoint-E`` history), safe reads of
training checkpoints, the random number generators and the plateau schedule's state that a checkpoint
holds, and the kill hook of the tests."""
import argparse
import logging
import math
import os
import random
import re
import shutil
import signal
from typing import List, Optional, Tuple

import numpy as np
import torch
from timm import utils

from encouraging_loss.bonus import as_integer, as_real
from encouraging_loss.tools.files import FileProblem, atomic_path, atomic_write, load_checkpoint_safely, os_error_line

from .train_args import _one_line, _read_checkpoint

_logger = logging.getLogger('timm_el.train')

#: for tests only: ``E:B`` makes the process SIGKILL itself after the update of batch B of epoch E,
#: ``E:save`` while it writes epoch E's checkpoint (the data written, the file not yet in place):
#: how the tests prove that a killed run, resumed, ends exactly as an uninterrupted one.
KILL_ENV = 'TIMM_EL_TEST_SIGKILL_AT'
_CHECKPOINT_EXT = '.pth.tar'
_HISTORY_NAME = re.compile(r'checkpoint-(\d+)\.pth\.tar')


def _kill_point(epoch: int, where) -> None:
    """Tests only: SIGKILL this process at ``$TIMM_EL_TEST_SIGKILL_AT`` (``epoch:batch`` or ``epoch:save``)."""
    at = os.environ.get(KILL_ENV)
    if at and at == f'{epoch}:{where}':
        os.kill(os.getpid(), signal.SIGKILL)


def _load_checkpoint_meta(path: str) -> dict:
    """A training checkpoint (tensors on the CPU), read with ``weights_only=True``
    (``encouraging_loss.tools.files.load_checkpoint_safely``; ``FileProblem`` when it cannot be)."""
    return load_checkpoint_safely(path, 'checkpoint', allowed=[argparse.Namespace])


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
