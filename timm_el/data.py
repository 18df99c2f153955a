""" MNIST from its original idx files

A small reader for the four files of the MNIST distribution
(``train-images-idx3-ubyte.gz`` and friends, gzipped or not), used by the
tests and examples to train timm models with the Encouraging Loss on real
data without torchvision's downloader.
"""
import gzip
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

__all__ = ['MNIST_FILES', 'load_mnist', 'read_idx']

#: split -> (images file, labels file), without the optional ``.gz``.
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# idx magic numbers: 0x00 0x00 <type 0x08 = uint8> <number of dimensions>
_UINT8 = 0x08


def _find(root: Path, name: str) -> Path:
    tried = []
    for folder in (root, root / 'mnist'):
        for candidate in (folder / (name + '.gz'), folder / name):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(f"MNIST file {name}(.gz) not found; looked for: {', '.join(tried)}")


def read_idx(path: Union[str, Path], ndim: int, limit: Optional[int] = None) -> np.ndarray:
    """Read a uint8 idx file (gzipped if its name ends in ``.gz``).

    Args:
        path: The file.
        ndim: Expected number of dimensions (3 for images, 1 for labels).
        limit: Read only the first ``limit`` items.

    Returns:
        A uint8 array of shape ``(n, ...)`` as stored in the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != _UINT8 or header[3] != ndim:
            raise ValueError(
                f'{path} is not a uint8 idx file with {ndim} dimension(s) (header {header.hex() or "empty"})')
        dims = np.frombuffer(f.read(4 * ndim), dtype='>u4').astype(np.int64)
        if len(dims) != ndim:
            raise ValueError(f'{path}: truncated idx header')
        count = int(dims[0]) if limit is None else min(int(dims[0]), int(limit))
        item = int(np.prod(dims[1:])) if ndim > 1 else 1
        data = f.read(count * item)
    if len(data) != count * item:
        raise ValueError(f'{path}: expected {count * item} bytes of data, found {len(data)}')
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape((count,) + tuple(int(d) for d in dims[1:]))


def load_mnist(
        root: Union[str, Path],
        split: str = 'train',
        limit: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from the original idx files.

    Args:
        root: Folder holding the four MNIST files, or a folder with an
            ``mnist/`` sub-folder holding them (e.g. the project's shared data dir).
        split: 'train' (60,000 images) or 'test' (10,000).
        limit: Load only the first ``limit`` examples.

    Returns:
        ``(images, labels)``: uint8 array ``(n, 28, 28)`` and int64 array ``(n,)``.

    Raises:
        FileNotFoundError: a file is missing (the message lists the paths tried).
        ValueError: unknown split, or a file that is not the expected idx file.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {', '.join(MNIST_FILES)}, got {split!r}")
    root = Path(root)
    image_file, label_file = (_find(root, name) for name in MNIST_FILES[split])
    images = read_idx(image_file, 3, limit)
    labels = read_idx(label_file, 1, limit).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f'{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels')
    return images, labels
