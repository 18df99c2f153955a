"""Encouraging Loss for PyTorch Geometric: graph classification as in the paper's graph experiments.

Zhao et al., "Well-Classified Examples are Underestimated in Classification with Deep Neural Networks",
AAAI 2022, section 5.2 (EL_SPEC 6): SAGPool (Lee et al. 2019) on TU datasets (PROTEINS, NCI1), cross-entropy
against the Encouraging Loss, each run on its own random split. The loss itself is the core's
(``encouraging_loss.EncouragingLoss``, graph logits and labels); this package holds what needs PyTorch
Geometric:

* :mod:`pyg_el.models`: :class:`SAGPoolNet` (hierarchical or global pooling);
* :mod:`pyg_el.data`: :func:`load_tu` (TUDataset from a local copy or downloaded) and :func:`split_indices`;
* :mod:`pyg_el.train`: the command ``python -m pyg_el.train`` (runs, early stopping, resume, records, plot).

Install with ``pip install -e .[graph]``. Importing this package does not import torch_geometric; the
names below are imported on first use.
"""
import importlib

_HOME = {
    "SAGPoolNet": "models",
    "POOLINGS": "models",
    "DataError": "data",
    "load_tu": "data",
    "split_indices": "data",
    "split_sizes": "data",
}

__all__ = sorted(_HOME)


def __getattr__(name):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
