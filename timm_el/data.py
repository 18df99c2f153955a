""" MNIST from its original idx files, and image folders with unreadable files handled

A small reader for the four files of the MNIST distribution
(``train-images-idx3-ubyte.gz`` and friends, gzipped or not), used by the
tests and examples to train timm models with the Encouraging Loss on real
data without torchvision's downloader.

:class:`CheckedImageDataset` is timm's ``ImageDataset`` with a policy for
images that cannot be read (truncated, not an image): timm logs the index and
quietly returns the *next* sample in its place, so a damaged validation image
shifts the reported accuracy without a word. Here a validation split stops
with :class:`ImageReadError` naming the file, and a training split skips the
image as timm does but counts every skip in a shared tensor that the main
process reads after the epoch, whatever the number of loader workers.
"""
import gzip
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset

__all__ = ['MNIST_FILES', 'CheckedImageDataset', 'ImageReadError', 'load_mnist', 'read_idx']

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


# ----------------------------------------------------------------------------- unreadable images


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


class ImageReadError(Exception):
    """An image that cannot be read where that must stop the run; ``str()`` is one line naming it.

    A DataLoader worker's exception reaches the main process re-made from the worker's whole
    traceback text; the one line (the traceback's last) is taken back out of it here."""

    def __init__(self, message):
        text = str(message)
        if '\n' in text:
            marker = f'{type(self).__name__}: '
            for line in reversed(text.strip().splitlines()):
                head, sep, rest = line.partition(marker)
                if sep:
                    text = rest
                    break
            else:
                text = ' '.join(text.split())
        super().__init__(text)


class CheckedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` whose unreadable images follow a policy instead of timm's silent
    substitution. Make one from a dataset ``timm.data.create_dataset`` made, with :meth:`wrap`.

    ``strict`` (validation): an image that cannot be opened and decoded raises
    :class:`ImageReadError` ``"<what>: cannot read image <path>: <reason>"``.
    Otherwise (training): as timm, the next image takes its place, and ``skips[index]`` counts
    each time image ``index`` was skipped. ``skips`` lives in shared memory once
    :meth:`share_counts` was called, so worker processes' skips are seen by the main process.
    """

    strict: bool = False
    what: str = 'dataset'
    skips: torch.Tensor

    @classmethod
    def wrap(cls, dataset: ImageDataset, *, strict: bool, what: str) -> 'CheckedImageDataset':
        """A checked dataset with the reader, transforms and settings of ``dataset``."""
        checked = cls.__new__(cls)
        checked.__dict__.update(dataset.__dict__)
        checked.strict, checked.what = strict, what
        checked.skips = torch.zeros(len(dataset), dtype=torch.int32)
        return checked

    def share_counts(self) -> None:
        """Put the skip counts in shared memory (before loader workers start)."""
        self.skips.share_memory_()

    def path(self, index: int) -> str:
        """The file of image ``index``."""
        try:
            return str(self.filename(index, absolute=True))
        except Exception:  # noqa: BLE001 -- readers without file names
            return f'#{index}'

    def _load(self, index: int):
        """Image ``index``, opened and decoded (so that a damaged file fails here), its target and features."""
        img, target, *features = self.reader[index]
        if self.load_bytes:
            return img.read(), target, features
        try:
            image = Image.open(img)
            image = image.convert(self.input_img_mode) if self.input_img_mode else image
            image.load()
        finally:
            if hasattr(img, 'close'):
                img.close()
        return image, target, features

    def __getitem__(self, index):
        first = index
        tries = max(1, int(getattr(self, '_max_retries', 10)))
        for _ in range(tries):
            try:
                img, target, features = self._load(index)
                break
            except Exception as err:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ...
                if self.strict:
                    raise ImageReadError(f'{self.what}: cannot read image {self.path(index)}: {_one_line(err)}') \
                        from None
                self.skips[index] += 1
                index = (index + 1) % len(self.reader)
        else:
            raise ImageReadError(f'{self.what}: {tries} images in a row cannot be read, from '
                                 f'{self.path(first)} on; is the data damaged?')
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (img, target) if self.additional_features is None else (img, target, *features)

    def unreadable(self) -> list:
        """The indices of the images skipped so far (sorted)."""
        return torch.nonzero(self.skips).flatten().tolist()


def image_problem(path: str, mode: Optional[str] = None) -> Optional[str]:
    """Why the image file ``path`` cannot be read (one line), or None when it can."""
    try:
        with Image.open(path) as image:
            (image.convert(mode) if mode else image).load()
    except Exception as err:  # noqa: BLE001
        return _one_line(err)
    return None
