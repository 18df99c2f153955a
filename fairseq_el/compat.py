"""Fixes that make stock fairseq CLIs work on today's Python and PyTorch.

Both are applied by :func:`install`, which runs when the plugin is imported
(``--user-dir``). Neither changes fairseq's files.

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
"""
import argparse
import functools

import numpy as np
import torch

__all__ = ["install", "safe_checkpoint_globals", "keep_every_example"]


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


def install() -> None:
    """Apply both fixes; safe to call more than once."""
    _allow_checkpoint_types()
    from fairseq.data import data_utils

    data_utils.batch_by_size = keep_every_example(data_utils.batch_by_size)
