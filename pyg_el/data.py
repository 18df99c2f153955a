"""TU graph-classification datasets (PROTEINS, NCI1, ...) through PyTorch Geometric's ``TUDataset``, and the
paper's per-run random splits.

:func:`load_tu` reads a dataset from ``--root`` in any of three forms (PyG's ``ROOT/NAME/raw/NAME_*.txt``,
the unpacked TU archive ``ROOT/NAME/NAME_*.txt``, or the archive itself ``ROOT/NAME.zip``) and downloads it
into ``ROOT`` (TUDataset's own download) when none is there. Whatever the form, the files are read by
PyG's own TU reader. :func:`split_indices` is the paper's split (EL_SPEC 6, as SAGPool: 80 / 10 / 10 %,
a fresh random permutation per run, seeded).
"""
import os
import shutil
import zipfile
from pathlib import Path
from typing import Tuple

import torch

__all__ = ["DataError", "TU_FILES", "load_tu", "split_indices", "split_sizes", "tu_raw_dir"]

#: the files every TU dataset has (``NAME_<suffix>.txt``); node and edge labels and attributes are optional.
TU_FILES = ("A", "graph_indicator", "graph_labels")


class DataError(ValueError):
    """A dataset that cannot be found, read or downloaded; the message is one line naming the flag."""


def _has_tu_files(folder: Path, name: str) -> bool:
    return all((folder / f"{name}_{part}.txt").is_file() for part in TU_FILES)


def tu_raw_dir(root, name: str) -> Path:
    """``ROOT/NAME/raw``, PyG's place for the TU text files (what :func:`load_tu` reads)."""
    return Path(root) / name / "raw"


def _unpack(archive: Path, raw: Path, name: str) -> None:
    """Copy ``NAME_*.txt`` (at any depth) of the TU archive into ``raw``, all or nothing."""
    tmp = raw.with_name(raw.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist()
                       if os.path.basename(m).startswith(f"{name}_") and m.endswith(".txt")]
            tmp.mkdir(parents=True)
            for member in members:
                with zf.open(member) as src, open(tmp / os.path.basename(member), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"--root: cannot unpack {archive}: {getattr(err, 'strerror', None) or err}") from None
    if not _has_tu_files(tmp, name):
        shutil.rmtree(tmp, ignore_errors=True)
        want = ", ".join(f"{name}_{p}.txt" for p in TU_FILES)
        raise DataError(f"--root: {archive} is not the TU archive of {name} (it lacks one of {want})")
    os.replace(tmp, raw)


def _prepare_raw(root: Path, name: str) -> bool:
    """Put the TU files of ``name`` where PyG reads them (``ROOT/NAME/raw``) from a local copy in ``root``;
    False when there is none (TUDataset then downloads)."""
    raw = tu_raw_dir(root, name)
    if _has_tu_files(raw, name):
        return True
    unpacked = root / name
    if _has_tu_files(unpacked, name):  # the archive unpacked in place: ROOT/NAME/NAME_A.txt ...
        raw.mkdir(exist_ok=True)
        for f in unpacked.glob(f"{name}_*.txt"):
            shutil.copy2(f, raw / f.name)
        return True
    archive = root / f"{name}.zip"
    if archive.is_file():
        (root / name).mkdir(parents=True, exist_ok=True)
        _unpack(archive, raw, name)
        return True
    return False


def load_tu(name: str, root, *, download: bool = True):
    """The TU dataset ``name`` as PyG's ``TUDataset(root, name)`` (node labels one-hot as ``x``, as SAGPool).

    A local copy in ``root`` (see the module's docstring) is used first; without one the dataset is
    downloaded by ``TUDataset`` when ``download`` is true, else :class:`DataError`. PyG writes its
    processed copy to ``ROOT/NAME/processed``, so ``root`` must be writable. Every failure is a
    :class:`DataError` with one line naming ``--root`` or ``--dataset``.
    """
    from torch_geometric.datasets import TUDataset

    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"--dataset: {name!r} is not a TU dataset name (letters, digits, '-' and '_')")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"--root {root}: not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        local = _prepare_raw(root, name)
    except OSError as err:
        raise DataError(f"--root {root}: {err.strerror or err}") from None
    if not os.access(root / name if (root / name).exists() else root, os.W_OK):
        raise DataError(f"--root {root}: not writable (PyTorch Geometric keeps its processed copy there)")
    if not local and not download:
        raise DataError(f"--root {root}: no {name} there ({name}.zip, {name}/{name}_A.txt ... or "
                        f"{name}/raw/{name}_A.txt) and downloading is off")
    try:
        dataset = TUDataset(str(root), name)
    except Exception as err:  # noqa: BLE001 - a download or parse failure, reported as one line
        where = "cannot read" if local else "cannot download"
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        hint = "" if local else f"; without internet, put {name}.zip (the TU archive) in --root"
        raise DataError(f"--dataset {name}: {where} it under --root {root}: {detail}{hint}") from None
    if len(dataset) < 10:
        raise DataError(f"--dataset {name}: {len(dataset)} graphs under --root {root}; a 80/10/10 split needs "
                        f"10 or more")
    if dataset.num_node_features == 0:
        raise DataError(f"--dataset {name}: its graphs have no node labels or attributes (no input features)")
    return dataset


def split_sizes(n: int) -> Tuple[int, int, int]:
    """(train, valid, test) sizes of SAGPool's split of ``n`` graphs: ``int(0.8 n)``, ``int(0.1 n)``, the rest."""
    train, valid = int(n * 0.8), int(n * 0.1)
    return train, valid, n - train - valid


def split_indices(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint (train, valid, test) index tensors covering ``range(n)``: a random permutation drawn from
    ``torch.Generator().manual_seed(seed)`` cut at :func:`split_sizes`. The same seed gives the same split on
    every machine (torch's CPU generator), another seed another split."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    train, valid, _ = split_sizes(n)
    return perm[:train], perm[train:train + valid], perm[train + valid:]
