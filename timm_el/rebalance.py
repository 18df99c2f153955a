""" Rebalancing for long-tailed training in ``timm-el-train``: DRW, cRT and shot-group accuracy

The training side of the paper's imbalanced-classification experiments (Zhao et al., AAAI 2022, Table 3 /
Table 9; EL_SPEC section 6), in the setting of Kang et al. (ICLR 2020):

* **DRW** (deferred re-weighting, Cao et al., NeurIPS 2019, "LDAM-DRW", Sec. 3.3 and their released
  code): plain training first, then from epoch ``--drw-epoch E`` on the training loss weighs each class by
  the inverse of its *effective number of samples* (Cui et al., CVPR 2019, Eq. 1-3):
  ``w_c = (1 - beta) / (1 - beta ** n_c)``, normalised to sum to the number of classes
  (:func:`class_balanced_weights`, :class:`DeferredReweighting`). The weights go into the loss's ``weight``
  (``F.cross_entropy``'s meaning; the Encouraging Loss and the companion losses have the same attribute).
* **cRT** (classifier re-training, Kang et al. 2020, Sec. 4.2 "Classifier Re-training"): a second stage
  that starts from a finished run's weights (:func:`resolve_crt_source`, :func:`load_crt_source`),
  re-initialises the classifier, freezes everything else -- parameters *and* BatchNorm statistics, the
  frozen part kept in eval mode -- (:func:`prepare_crt_model`) and trains the classifier alone on
  class-balanced batches (:class:`ClassBalancedSampler`, put into timm's loader by :func:`with_sampler`).
* **Shot groups** (Kang et al. 2020, Sec. 5.1: many-shot > 100 training images, medium 20-100, few < 20):
  :func:`gather_predictions` puts every process's predictions together so that the core's
  :func:`encouraging_loss.tools.analysis.shot_accuracy` sees the whole validation set.
"""
import logging
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from encouraging_loss.tools.analysis import SHOT_GROUPS  # the metric names of validation's shot groups

__all__ = [
    'CRT_CHECKPOINT',
    'SHOT_GROUPS',
    'ClassBalancedSampler',
    'DeferredReweighting',
    'class_balanced_weights',
    'classifier_name',
    'gather_predictions',
    'load_crt_source',
    'prepare_crt_model',
    'resolve_crt_source',
    'with_sampler',
]

_logger = logging.getLogger('timm_el.train')

#: the checkpoint of a run directory that ``--crt-from RUN`` starts from (the last epoch, as Kang et al.).
CRT_CHECKPOINT = 'last.pth.tar'


# ----------------------------------------------------------------------------- DRW


def class_balanced_weights(counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights by the effective number of samples (Cui et al., CVPR 2019, Eq. 3), as DRW uses
    them (Cao et al., NeurIPS 2019, Sec. 3.3 and their code ``per_cls_weights``)::

        w_c = (1 - beta) / (1 - beta ** n_c),   then   w <- w * C / sum_c w_c

    so that the weights sum to the number of classes ``C``. ``beta = 0`` gives equal weights (1 each);
    ``beta -> 1`` approaches inverse class frequency. A class without training images (``n_c = 0``, it is
    never a target) gets weight 0 and the others share the sum ``C``.

    Args:
        counts: training images per class, ``n_c >= 0`` (at least one > 0).
        beta: in ``[0, 1)`` (Cao et al.'s default 0.9999).

    Returns:
        float32 tensor of ``C`` weights (finite, ``>= 0``).
    """
    n = np.asarray(list(counts), dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or not np.all(np.isfinite(n)) or np.any(n < 0) or not np.any(n > 0):
        raise ValueError(f'counts must be one count >= 0 per class, some > 0; got {list(counts)[:10]}')
    beta = float(beta)
    if not 0 <= beta < 1:
        raise ValueError(f'beta must be in [0, 1), got {beta!r}')
    present = n > 0
    weights = np.zeros_like(n)
    if beta == 0:
        weights[present] = 1.0
    else:
        # (1 - beta) / (1 - beta^n) with 1 - beta^n = -expm1(n log beta), accurate for beta near 1
        weights[present] = -math.expm1(math.log(beta)) / -np.expm1(n[present] * math.log(beta))
    weights *= n.size / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


class DeferredReweighting:
    """DRW (Cao et al., NeurIPS 2019, Sec. 3.3): the training loss unweighted before epoch ``start``,
    weighted by :func:`class_balanced_weights` of the training ``counts`` from epoch ``start`` on.

    :meth:`apply` is called at the start of every epoch (0-based, as timm counts) and sets
    ``loss_fn.weight`` (``None`` or the weights), so a run resumed at an epoch ``>= start`` has them on
    again from its first epoch.
    """

    def __init__(self, start: int, beta: float, counts: Sequence[int]):
        self.start, self.beta = int(start), float(beta)
        self.counts = [int(c) for c in counts]
        self.weights = class_balanced_weights(self.counts, self.beta)

    def describe(self) -> str:
        """One line: when and which weights."""
        w = self.weights
        return (f'DRW: class-balanced loss weights (effective number, beta {self.beta:g}) from epoch {self.start} '
                f'on: {len(w)} classes, weights {w.min().item():.4g} .. {w.max().item():.4g} '
                f'(images per class {min(self.counts)} .. {max(self.counts)})')

    def weight_at(self, epoch: int) -> Optional[torch.Tensor]:
        """The loss weights during ``epoch``: None before :attr:`start`, the weights from then on."""
        return self.weights if epoch >= self.start else None

    def apply(self, loss_fn: nn.Module, epoch: int, device=None) -> bool:
        """Set ``loss_fn.weight`` for ``epoch`` (the weights on ``device``); True when it changed
        (off -> on, or on -> off)."""
        weight = self.weight_at(epoch)
        before = getattr(loss_fn, 'weight', None)
        if (before is None) == (weight is None):
            return False
        loss_fn.weight = None if weight is None else weight.to(device or 'cpu')
        return True


# ----------------------------------------------------------------------------- cRT: the model


def resolve_crt_source(path: str) -> str:
    """The checkpoint ``--crt-from PATH`` names: ``PATH/last.pth.tar`` for a run directory, else ``PATH``.
    ``ValueError`` (one line naming ``--crt-from``) when there is none."""
    if os.path.isdir(path):
        checkpoint = os.path.join(path, CRT_CHECKPOINT)
        if not os.path.isfile(checkpoint):
            raise ValueError(f'--crt-from {path!r}: no {CRT_CHECKPOINT} in this run directory '
                             f'(a finished timm-el-train run, or give a checkpoint file)')
        return checkpoint
    if not os.path.isfile(path):
        raise ValueError(f'--crt-from: no such run directory or checkpoint: {path!r}')
    return path


def classifier_name(model: nn.Module) -> str:
    """The name (in ``model.named_modules()``) of timm's classifier, ``model.get_classifier()``.
    ``ValueError`` when the model has none with parameters."""
    get = getattr(model, 'get_classifier', None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        for name, module in model.named_modules():
            if module is head and name:
                return name
    raise ValueError(f'{type(model).__name__} has no classifier with parameters (timm get_classifier())')


def _plain_state_dict(state_dict: dict) -> dict:
    """A state dict without DDP's ``module.`` prefix."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_crt_source(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load a finished run's weights into ``model`` (strict). ``ValueError`` naming ``--crt-from`` when they
    do not fit: another number of classes, another architecture."""
    state_dict = _plain_state_dict(state_dict)
    head = classifier_name(model)
    own = model.state_dict()
    for key in (f'{head}.weight', f'{head}.bias'):
        if key in own and key in state_dict and tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise ValueError(f'--crt-from {source!r}: its classifier {key} has shape {tuple(state_dict[key].shape)}, '
                             f'this run\'s {tuple(own[key].shape)} ({model.num_classes} classes: the data or '
                             f'--num-classes)')
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        what = (f'missing {missing[0]}' if missing else f'unexpected {unexpected[0]}' if unexpected
                else f'{wrong[0]} of shape {tuple(state_dict[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}')
        count = len(missing) + len(unexpected) + len(wrong)
        raise ValueError(f'--crt-from {source!r} does not fit this --model: {what} ({count} key(s) differ)')
    model.load_state_dict(state_dict, strict=True)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a cRT model: everything in eval mode (BatchNorm uses and keeps its running statistics,
    dropout and drop-path off), only the classifier follows ``mode``."""
    nn.Module.train(self, False)
    self.get_classifier().train(mode)
    return self


def prepare_crt_model(model: nn.Module) -> List[str]:
    """cRT's model (Kang et al. 2020, Sec. 4.2): the classifier (timm ``get_classifier()``) re-initialised
    (each of its modules' ``reset_parameters()``, PyTorch's default initialisation, drawn from torch's
    global generator), every other parameter frozen (``requires_grad = False``), and the model's ``train()``
    replaced so that everything but the classifier stays in eval mode (BatchNorm statistics do not move,
    dropout is off; :func:`_frozen_train`).

    Call it after the source weights are loaded and before the optimizer is made (timm's optimizer factory
    leaves out parameters that need no gradient). Returns the names of the trainable parameters.
    """
    head_name = classifier_name(model)
    head = model.get_classifier()
    reset = [m for m in head.modules() if callable(getattr(m, 'reset_parameters', None))]
    if not reset:
        raise ValueError(f'{type(model).__name__}: its classifier {head_name} ({type(head).__name__}) cannot be '
                         f're-initialised (no reset_parameters)')
    for module in reset:
        module.reset_parameters()
    trainable = {id(p) for p in head.parameters()}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable)
        if id(param) in trainable:
            names.append(name)
    model.train = _frozen_train.__get__(model)  # instance attribute: nn.Module.train recurses into it too
    model.train(False)
    return names


# ----------------------------------------------------------------------------- cRT: the sampler


class ClassBalancedSampler(Sampler[int]):
    """Class-balanced sampling (Kang et al. 2020, Sec. 4.1 "class-balanced sampling", ``q = 0``; their
    ``ClassAwareSampler``, after Shen et al. 2016): each draw picks a class with equal probability, then an
    image of that class.

    As Kang et al.'s sampler, the classes come in random cycles (a random order of all classes that have
    images, then another, ...) and each class's images in random cycles of their own, so over an epoch every
    class is drawn equally often (up to one) and a class's images as evenly as its draws allow. An epoch has
    ``num_samples`` draws in all (default: the dataset's size; Kang et al.'s code draws
    ``C * max_c n_c`` per epoch, set ``num_samples`` for that), split over the ``world_size`` processes
    (process ``rank`` takes every ``world_size``-th draw, as ``DistributedSampler``).

    Seeded and stateless: the draws of an epoch are a function of ``(seed, epoch)`` alone (numpy's
    ``default_rng([seed, epoch])``), the same on every process; :meth:`set_epoch` chooses the epoch, so a
    resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_samples: Optional[int] = None,
                 rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0 or labels.min() < 0:
            raise ValueError('labels must be one class index >= 0 per sample, at least one')
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f'rank {rank} is not in [0, world_size {world_size})')
        self.seed, self.epoch = int(seed), 0
        self.rank, self.world_size = int(rank), int(world_size)
        order = np.argsort(labels, kind='stable')
        counts = np.bincount(labels)
        self.classes = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)])
        self.members = {int(c): order[starts[c]:starts[c + 1]] for c in self.classes}
        total = len(labels) if num_samples is None else int(num_samples)
        if total < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples!r}')
        self.num_samples = math.ceil(total / self.world_size)  # per process
        self.total_size = self.num_samples * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws :meth:`__iter__` gives."""
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The draws of ``epoch`` over all processes (``total_size`` dataset indices)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        total, classes = self.total_size, self.classes
        cycles = -(-total // len(classes))
        class_seq = np.concatenate([rng.permutation(classes) for _ in range(cycles)])[:total]
        draws = np.bincount(class_seq, minlength=int(classes.max()) + 1)
        slots = np.argsort(class_seq, kind='stable')  # the positions of each class's draws, class by class
        out = np.empty(total, dtype=np.int64)
        start = 0
        for c in classes:
            k = int(draws[c])
            if k == 0:
                continue
            members = self.members[int(c)]
            picks = np.concatenate([rng.permutation(members) for _ in range(-(-k // len(members)))])[:k]
            out[slots[start:start + k]] = picks
            start += k
        return out

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)[self.rank:self.total_size:self.world_size]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_samples


def with_sampler(loader, sampler: Sampler):
    """timm's training loader (``create_loader``: its transforms, collate function -- ``FastCollateMixup``
    too --, workers and prefetcher) drawing its batches through ``sampler`` instead of timm's shuffling or
    ``DistributedSampler``: the inner ``DataLoader`` is made again with the same settings and ``sampler``;
    a ``PrefetchLoader`` around it is kept (and returned), a plain ``DataLoader`` replaced."""
    inner = getattr(loader, 'loader', loader)
    if not isinstance(inner, DataLoader):
        raise TypeError(f'expected a DataLoader (or timm PrefetchLoader), got {type(loader).__name__}')
    rebuilt = DataLoader(
        inner.dataset, batch_size=inner.batch_size, sampler=sampler, num_workers=inner.num_workers,
        collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, drop_last=inner.drop_last,
        worker_init_fn=inner.worker_init_fn, persistent_workers=inner.persistent_workers,
        timeout=inner.timeout, prefetch_factor=inner.prefetch_factor if inner.num_workers > 0 else None)
    if inner is loader:
        return rebuilt
    loader.loader = rebuilt
    return loader


# ----------------------------------------------------------------------------- shot groups


def gather_predictions(pred: torch.Tensor, target: torch.Tensor, distributed: bool,
                       device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every process's predicted and true classes put together (CPU int64 tensors, rank order), for the
    per-class accuracies of the shot groups (Kang et al. 2020): the shot-group accuracies are then computed
    from the whole validation set's per-class counts, never averaged over processes. ``device``: where the
    collective runs (the process's device: CUDA for NCCL)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if not distributed:
        return pred.cpu(), target.cpu()
    device = device or pred.device
    pair = torch.stack([pred, target]).to(device)
    world = torch.distributed.get_world_size()
    size = torch.tensor([pair.shape[1]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((2, longest), -1, device=device, dtype=torch.long)
    padded[:, :pair.shape[1]] = pair
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    both = torch.cat([p[:, :int(s.item())] for p, s in zip(parts, sizes)], dim=1).cpu()
    return both[0], both[1]
