"""Fixes that make stock fairseq CLIs work, and read checkpoints safely, on
today's Python and PyTorch.

All four are applied by :func:`install`, which runs when the plugin is
imported (``--user-dir``). None changes fairseq's files.

1. **Checkpoints under torch >= 2.6.** ``torch.load`` defaults to
   ``weights_only=True`` and rejects fairseq checkpoints, which hold a few
   plain Python objects besides tensors. Rather than turning the check off,
   we add those types to torch's allow-list
   (``torch.serialization.add_safe_globals``); anything else in a checkpoint
   is still refused.
2. **No lost examples under fairseq-fixed.** ``fairseq-fixed`` drops the last
   batch from ``fairseq.data.data_utils.batch_by_size`` when its size is not
   a multiple of ``--required-batch-size-multiple``, so ``fairseq-generate``
   skips sentences and validation loses examples. We wrap that function and
   put the dropped examples back as a final batch, as upstream fairseq does.
3. **No code runs from a checkpoint.** fairseq reads checkpoints with
   ``torch.load`` without ``weights_only``, so a crafted file runs code when
   ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set, and on torch < 2.6 by
   default. We wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (what
   ``fairseq-train --restore-file`` / resuming, ``fairseq-generate --path``,
   ``fairseq-interactive``, ``load_model_ensemble`` and the hub loaders use):
   every file is first read with ``weights_only=True`` passed explicitly
   (:func:`read_checkpoint`), and one that holds anything but tensors, plain
   data and the types of :func:`safe_checkpoint_globals` is refused with
   :class:`CheckpointRefused` before fairseq unpickles it; a stock CLI then
   prints one line (``fairseq-generate: error: ...``) instead of a traceback.
   The plugin's own commands do the same read themselves before handing a
   file to fairseq.
4. **No truncated ``checkpoint_last.pt``.** fairseq writes the first file of
   each save atomically (a ``.tmp`` then a rename) but makes
   ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with a plain file copy
   (``PathManager.copy``): a run killed during that copy, or a full disk,
   leaves a truncated ``checkpoint_last.pt`` that the next start then cannot
   resume from. We make that copy atomic for local files
   (:func:`atomic_local_copy`): the old file stays whole until the new one is.
"""
import argparse
import functools
import os
import shutil
import sys

import numpy as np
import torch

from encouraging_loss.tools.files import FileProblem, atomic_path, load_checkpoint_safely

__all__ = ["CheckpointRefused", "atomic_local_copy", "install", "keep_every_example", "read_checkpoint",
           "safe_checkpoint_globals", "safe_load_checkpoint_to_cpu"]


def safe_checkpoint_globals() -> list:
    """The non-tensor types found in fairseq checkpoints beyond torch's defaults:
    the legacy ``args`` / model config (``argparse.Namespace``) and numpy scalars
    (a best-checkpoint score kept as a numpy float pickles through these)."""
    types = [argparse.Namespace]
    types.append(np.dtype)
    types.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    types.append(scalar)
    return types


def _allow_checkpoint_types() -> None:
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no allow-list (and loads everything)
        add(safe_checkpoint_globals())


def keep_every_example(batch_by_size):
    """Wrap ``data_utils.batch_by_size`` so that no index is left out."""
    if getattr(batch_by_size, "_el_keeps_every_example", False):
        return batch_by_size

    @functools.wraps(batch_by_size)
    def wrapper(indices, *args, **kwargs):
        batches = batch_by_size(indices, *args, **kwargs)
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        n_batched = sum(len(b) for b in batches)
        if n_batched >= len(indices):
            return batches
        batched = np.concatenate(batches) if len(batches) else np.empty(0, dtype=np.int64)
        missing = indices[~np.isin(indices, batched)]
        if len(missing) == 0:
            return batches
        tail = np.asarray(missing, dtype=batches[0].dtype if len(batches) else np.int64)
        return list(batches) + [tail]

    wrapper._el_keeps_every_example = True
    return wrapper


class CheckpointRefused(FileProblem):
    """A checkpoint that fairseq is not allowed to unpickle (hostile, not a checkpoint, truncated);
    ``str()`` is one line naming the file."""


def read_checkpoint(path, what: str = "checkpoint"):
    """The checkpoint at ``path`` read with ``torch.load(weights_only=True)`` passed explicitly (so
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn the check off), with the types of
    :func:`safe_checkpoint_globals` allowed; tensors on the CPU, memory-mapped where the format allows.
    Raises :class:`encouraging_loss.tools.files.FileProblem` (one line starting ``WHAT PATH:``) for a missing,
    hostile, truncated or non-checkpoint file."""
    return load_checkpoint_safely(path, what, allowed=safe_checkpoint_globals())


def safe_load_checkpoint_to_cpu(load):
    """Wrap fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` so that the file passes
    :func:`read_checkpoint` before fairseq's own ``torch.load`` (which passes no ``weights_only``)
    reads it; a file that does not is refused with :class:`CheckpointRefused`."""
    if getattr(load, "_el_reads_safely", False):
        return load

    @functools.wraps(load)
    def wrapper(path, *args, **kwargs):
        local = path
        try:
            from fairseq.file_io import PathManager

            local = PathManager.get_local_path(path)
        except Exception:  # noqa: BLE001 -- a plain local path needs no PathManager
            pass
        try:
            read_checkpoint(local)
        except FileProblem as err:
            raise CheckpointRefused(str(err)) from None
        # again: another library's torch.serialization.safe_globals([...]) context removes the types it
        # named on exit even when they were allowed before it (timm's checkpoint loaders do, for Namespace)
        _allow_checkpoint_types()
        return load(path, *args, **kwargs)

    wrapper._el_reads_safely = True
    return wrapper


def _refusal_hook(previous):
    """``sys.excepthook`` that prints a :class:`CheckpointRefused` reaching the top of a command (a stock
    fairseq CLI) as one line, ``PROG: error: MESSAGE``; anything else goes to ``previous``."""
    if getattr(previous, "_el_refusal_hook", False):
        return previous

    def hook(kind, value, tb):
        if isinstance(value, CheckpointRefused):
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
            print(f"{prog}: error: {value}", file=sys.stderr, flush=True)
            return
        previous(kind, value, tb)

    hook._el_refusal_hook = True
    return hook


def atomic_local_copy(copy):
    """Wrap fairseq's ``PathManager.copy`` so that a copy between local files goes to a temporary
    name beside the destination and is renamed over it when complete (a kill or a full disk
    leaves the old destination whole). Remote paths (``scheme://``) go to ``copy`` unchanged."""
    if getattr(copy, "_el_atomic", False):
        return copy

    @functools.wraps(copy)
    def wrapper(src_path, dst_path, overwrite=False):
        if "://" in str(src_path) or "://" in str(dst_path):
            return copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        with atomic_path(dst_path) as tmp:
            shutil.copyfile(src_path, tmp)
        return True

    wrapper._el_atomic = True
    return wrapper


def install() -> None:
    """Apply the four fixes; safe to call more than once."""
    _allow_checkpoint_types()
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils

    data_utils.batch_by_size = keep_every_example(data_utils.batch_by_size)
    checkpoint_utils.load_checkpoint_to_cpu = safe_load_checkpoint_to_cpu(checkpoint_utils.load_checkpoint_to_cpu)
    sys.excepthook = _refusal_hook(sys.excepthook)
    from fairseq.file_io import PathManager

    PathManager.copy = staticmethod(atomic_local_copy(PathManager.copy))
