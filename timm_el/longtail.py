""" Long-tailed image classification data for ``timm-el-train``

The data side of the paper's imbalanced-classification experiments (Zhao et al., AAAI 2022, Table 3 / 9;
EL_SPEC section 6, in the setting of Kang et al., ICLR 2020):

* :func:`dataset_labels` / :func:`class_counts`: every sample's class index, and the images per class,
  read from the dataset's index (timm readers, torchvision ``targets``, subsets) without decoding an image;
  the training counts define the many / medium / few-shot groups (Kang et al. 2020) and the class-balanced
  weights of DRW (Cao et al. 2019).
* :func:`long_tail_counts` / :func:`long_tail_indices` / :func:`long_tail_subset`: ``--long-tail-ratio R``,
  the exponential profile of Cao et al. (NeurIPS 2019, "LDAM-DRW", their CIFAR-10/100-LT), applied to any
  training split with a seeded choice within each class (:func:`default_long_tail_max` the default n_max).
* :func:`inat2018_dataset` (``--dataset inat2018``, the official iNaturalist 2018 COCO-style JSON files) and
  :func:`imagenet_lt_dataset` (``--dataset imagenet_lt``, Liu et al. 2019's list files, as Kang et al. use
  them): timm ``ImageDataset`` s (PIL decoding, timm's transforms set by ``create_loader``), so that
  ``timm-el-train`` wraps them in :class:`~timm_el.data.CheckedImageDataset` like an ImageFolder.
"""
import copy
import json
import logging
import math
import os
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
from timm.data import ImageDataset

__all__ = [
    'LONGTAIL_DATASETS', 'ListReader', 'LongTailSubset', 'class_counts', 'dataset_labels', 'default_long_tail_max',
    'describe_profile', 'imagenet_lt_dataset', 'inat2018_dataset', 'is_longtail_dataset', 'long_tail_counts',
    'long_tail_indices', 'long_tail_subset', 'longtail_dataset', 'subset_dataset',
]

_logger = logging.getLogger(__name__)
#: from this many images on, checking that they exist is announced and timed in the log
_LARGE = 50000


def _as_int_array(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise TypeError(f'{what}: labels of shape {array.shape}, expected one class index per sample')
    if array.size and not np.issubdtype(array.dtype, np.integer):
        as_int = array.astype(np.int64)
        if not np.array_equal(as_int, array):
            raise TypeError(f'{what}: labels are not whole numbers (dtype {array.dtype})')
        array = as_int
    return array.astype(np.int64, copy=False)


def _apply_target_transform(labels: np.ndarray, dataset) -> np.ndarray:
    transform = getattr(dataset, 'target_transform', None)
    if transform is None:
        return labels
    return np.asarray([int(transform(int(label))) for label in labels], dtype=np.int64)


def _reader_labels(reader, what: str) -> np.ndarray:
    targets = getattr(reader, 'targets', None)  # timm's ReaderImageInTar
    if targets is not None:
        return _as_int_array(targets, what)
    samples = getattr(reader, 'samples', None)  # ReaderImageFolder, ReaderImageTar, this module's readers
    if samples is not None:
        return _as_int_array([target for _, target, *_ in samples], what)
    raise TypeError(f'{what}: its reader {type(reader).__name__} does not list its samples; the labels cannot be '
                    f'read without decoding every image')


def dataset_labels(dataset) -> np.ndarray:
    """The class index of every sample of ``dataset``, in index order, WITHOUT loading an image.

    Used for the training class counts of the shot groups (Kang et al. 2020, EL_SPEC 6) and of DRW's
    class-balanced weights (Cao et al. 2019). Reads, in this order:

    * a ``torch.utils.data.Subset`` (this module's long-tailed subsets too): the labels of its dataset at its
      ``indices``; a ``ConcatDataset``: its parts' labels one after the other;
    * a dataset with a timm ``reader`` (timm's ``ImageDataset``, :class:`~timm_el.data.CheckedImageDataset`,
      ``--dataset inat2018`` / ``imagenet_lt``): the reader's ``targets``, else the targets of its
      ``samples`` (``(file, target)`` pairs);
    * a torchvision dataset: ``targets`` (MNIST, Fashion-MNIST, CIFAR, ImageFolder), ``labels`` (SVHN, STL10)
      or ``_labels`` (Flowers102, DTD, Food101, ...);

    then the dataset's ``target_transform`` (when set) as its ``__getitem__`` would apply it.

    Returns:
        An int64 array of ``len(dataset)`` labels.

    Raises:
        TypeError: a dataset that does not keep its labels apart from its images (one line naming its type).
    """
    what = type(dataset).__name__
    if isinstance(dataset, torch.utils.data.Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)
        return dataset_labels(dataset.dataset)[indices] if indices.size else np.zeros(0, dtype=np.int64)
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    reader = getattr(dataset, 'reader', None)
    if reader is not None:
        labels = _reader_labels(reader, what)
    else:
        for name in ('targets', 'labels', '_labels'):
            values = getattr(dataset, name, None)
            if values is not None:
                labels = _as_int_array(values, what)
                break
        else:
            raise TypeError(f'{what}: no reader, targets or labels; the class of each sample cannot be read '
                            f'without loading the samples')
    return _apply_target_transform(labels, dataset)


def class_counts(dataset, num_classes: int) -> List[int]:
    """Images per class of ``dataset`` (:func:`dataset_labels`, no image decoded): ``num_classes`` counts,
    class-index order; classes without images count 0 (the ``n_c`` of Cao et al. 2019 / Kang et al. 2020).

    Raises:
        ValueError: a label outside ``[0, num_classes)`` (one line naming the label and the sample).
        TypeError: see :func:`dataset_labels`.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    labels = dataset_labels(dataset)
    return _counts(labels, num_classes, type(dataset).__name__)


def _counts(labels: np.ndarray, num_classes: int, what: str) -> List[int]:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f'{what}: sample {int(bad[0])} has label {int(labels[bad[0]])}, outside the '
                         f'{num_classes} classes [0, {num_classes})')
    return [int(n) for n in np.bincount(labels, minlength=num_classes)]



# ----------------------------------------------------------------------------- the exponential profile


def long_tail_counts(n_max: int, ratio: float, num_classes: int) -> List[int]:
    """The images of each class in a long-tailed split with the exponential profile of Cao et al.
    (NeurIPS 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", section 4,
    their CIFAR-10/100-LT; EL_SPEC 6): ``n_c = int(n_max * R ** (-c / (C - 1)))`` for class index
    ``c = 0 .. C-1``, truncated as their ``get_img_num_per_cls`` does (CIFAR-10, 5000 per class, R = 100:
    5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 = 12,406 images). ``R = n_0 / n_{C-1}`` is the
    imbalance ratio.

    Raises:
        ValueError: ``ratio`` < 1 (or not finite), ``n_max`` < 1, fewer than 2 classes.
    """
    ratio, n_max, num_classes = float(ratio), int(n_max), int(num_classes)
    if not np.isfinite(ratio) or ratio < 1:
        raise ValueError(f'the imbalance ratio must be a number >= 1, got {ratio!r}')
    if n_max < 1:
        raise ValueError(f'the largest class must keep at least 1 image, got {n_max}')
    if num_classes < 2:
        raise ValueError(f'a long-tailed profile needs at least 2 classes, got {num_classes}')
    factor = 1.0 / ratio
    return [int(n_max * (factor ** (c / (num_classes - 1.0)))) for c in range(num_classes)]


def default_long_tail_max(available: Sequence[int], ratio: float) -> int:
    """The default ``n_max`` of ``--long-tail-ratio``: the largest ``n_max`` whose profile
    (:func:`long_tail_counts`) every class can supply, ``min_c floor(a_c * R ** (c / (C - 1)))`` over the classes
    with ``a_c > 0`` images. For classes of equal size ``a`` it is ``a`` (Cao et al. 2019's ``img_max``, the
    images per class of CIFAR-10); for unequal ones (MNIST: 5,923 zeros but 6,742 ones) the profile is kept
    exactly, n_0 / n_{C-1} = R up to the truncation, instead of clipping the classes that fall short."""
    available = [int(n) for n in available]
    num_classes = len(available)
    long_tail_counts(1, ratio, num_classes)  # checks ratio and classes
    factor = 1.0 / float(ratio)
    candidates = [math.floor(n / factor ** (c / (num_classes - 1.0))) for c, n in enumerate(available) if n > 0]
    n_max = min(candidates) if candidates else 0
    while n_max > 0 and any(q > n for q, n in zip(long_tail_counts(n_max, ratio, num_classes), available) if n):
        n_max -= 1  # floating-point rounding
    return n_max


def long_tail_indices(labels, quotas: Sequence[int], seed: int = 0) -> np.ndarray:
    """The samples a long-tailed split keeps (the ``--long-tail-ratio`` subset): for each class ``c``,
    ``min(quotas[c], images of c)`` of its samples drawn without replacement by a generator seeded with
    ``(seed, c)`` (Cao et al. 2019 draw a seeded random subset of each class too); all of them when the
    class has no more than its quota. A class's choice depends only on the seed, its samples and its
    quota, not on the other classes nor on the training seed.

    Returns:
        The kept sample indices, sorted (the dataset's order), int64.
    """
    labels = _as_int_array(labels, 'labels')
    seed = int(seed)
    if seed < 0:
        raise ValueError(f'the seed must be >= 0, got {seed}')
    kept = []
    for c, quota in enumerate(quotas):
        members = np.flatnonzero(labels == c)
        if quota >= members.size:
            kept.append(members)
        elif quota > 0:
            kept.append(np.random.default_rng([seed, c]).choice(members, size=int(quota), replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def _class_name(classes: Optional[Sequence[str]], c: int) -> str:
    return repr(str(classes[c])) if classes is not None and c < len(classes) else f'#{c}'


def describe_profile(counts: Sequence[int], classes: Optional[Sequence[str]] = None) -> str:
    """One line on a split's class profile: classes, images, the largest and smallest class and the
    imbalance ratio n_max / n_min (Cao et al. 2019's rho), e.g. ``10 classes, 12406 images; largest
    class '0' 5000 images, smallest '9' 50; imbalance ratio 100``."""
    counts = [int(n) for n in counts]
    if not counts:
        return 'no classes'
    largest = max(range(len(counts)), key=lambda c: (counts[c], -c))
    smallest = min(range(len(counts)), key=lambda c: (counts[c], c))
    n_min = counts[smallest]
    imbalance = f'{counts[largest] / n_min:.4g}' if n_min else 'infinite (a class has no image)'
    return (f'{len(counts)} classes, {sum(counts)} images; largest class {_class_name(classes, largest)} '
            f'{counts[largest]} images, smallest {_class_name(classes, smallest)} {n_min}; '
            f'imbalance ratio {imbalance}')


class LongTailSubset(torch.utils.data.Subset):
    """The samples ``indices`` of a dataset without a timm reader (torchvision's MNIST, CIFAR, ImageFolder):
    a ``Subset`` that shows its dataset's ``classes`` / ``class_to_idx`` and passes ``transform`` /
    ``target_transform`` through to it (timm's ``create_loader`` sets ``dataset.transform``)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, [int(i) for i in indices])

    @property
    def classes(self):
        return getattr(self.dataset, 'classes', None)

    @property
    def class_to_idx(self):
        return getattr(self.dataset, 'class_to_idx', None)

    @property
    def transform(self):
        return getattr(self.dataset, 'transform', None)

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    @property
    def target_transform(self):
        return getattr(self.dataset, 'target_transform', None)

    @target_transform.setter
    def target_transform(self, value):
        self.dataset.target_transform = value


def subset_dataset(dataset, indices):
    """``dataset`` restricted to the samples ``indices`` (sorted), of the same kind where it can be: a timm
    ``ImageDataset`` (or :class:`~timm_el.data.CheckedImageDataset`) whose reader lists its ``samples``
    becomes a copy with a copy of the reader holding those samples only (so file names, the unreadable-image
    policy and ``create_loader``'s transforms work as before); any other dataset a :class:`LongTailSubset`."""
    indices = np.asarray(indices, dtype=np.int64)
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if isinstance(dataset, ImageDataset) and samples is not None:
        reader = copy.copy(reader)
        pick = (lambda seq: seq[indices]) if isinstance(samples, np.ndarray) else \
            (lambda seq: [seq[i] for i in indices])
        reader.samples = pick(samples)
        if getattr(reader, 'imgs', None) is samples:  # timm's ReaderImageTar keeps the list twice
            reader.imgs = reader.samples
        if getattr(reader, 'targets', None) is not None:  # timm's ReaderImageInTar
            reader.targets = np.asarray(reader.targets)[indices]
        subset = copy.copy(dataset)
        subset.reader = reader
        skips = getattr(dataset, 'skips', None)
        if isinstance(skips, torch.Tensor):
            subset.skips = torch.zeros(len(indices), dtype=skips.dtype)
        return subset
    return LongTailSubset(dataset, indices)


def long_tail_subset(dataset, ratio: float, num_classes: int, n_max: Optional[int] = None, seed: int = 0,
                     classes: Optional[Sequence[str]] = None):
    """``--long-tail-ratio``: a long-tailed version of the training split ``dataset`` with Cao et al.'s
    exponential profile (:func:`long_tail_counts`, class-index order) drawn by :func:`long_tail_indices`.

    Args:
        dataset: the training split (any dataset :func:`dataset_labels` reads).
        ratio: the imbalance ratio R >= 1.
        num_classes: C, the classes of the data.
        n_max: images kept of class 0, not more than the largest class has (default:
            :func:`default_long_tail_max`, the largest no class falls short of).
        seed: the seed of the choice within each class (``--long-tail-seed``).
        classes: the class names, for the messages.

    Returns:
        ``(subset, quotas, kept, clipped)``: the dataset (:func:`subset_dataset`), the images each class should
        keep, the images each keeps, and the classes ``(c, quota, available)`` with fewer images than their
        quota (all their images kept).

    Raises:
        ValueError: one line naming the flag (``--long-tail-ratio``, ``--long-tail-max``, ``--long-tail-seed``)
            when the profile cannot be drawn from the data.
    """
    available = class_counts(dataset, num_classes)
    largest = max(available)
    if n_max is None:
        try:
            n_max = default_long_tail_max(available, ratio)
        except ValueError as err:
            raise ValueError(f'--long-tail-ratio {ratio!r}: {err}') from None
        if n_max < 1:
            raise ValueError(f'--long-tail-ratio {ratio:g}: the training split has no images')
    elif int(n_max) > largest:
        biggest = available.index(largest)
        raise ValueError(f'--long-tail-max {n_max} is larger than the largest class of the training split '
                         f'({_class_name(classes, biggest)}, {largest} images)')
    try:
        quotas = long_tail_counts(n_max, ratio, num_classes)
    except ValueError as err:
        raise ValueError(f'--long-tail-ratio {ratio!r}: {err}') from None
    if min(quotas) < 1:
        raise ValueError(f'--long-tail-ratio {ratio:g} leaves the last class {_class_name(classes, num_classes - 1)} '
                         f'no image (n_max {n_max} / {ratio:g} < 1): the ratio can be at most n_max')
    indices = long_tail_indices(dataset_labels(dataset), quotas, seed)
    kept = [min(q, a) for q, a in zip(quotas, available)]
    clipped = [(c, q, a) for c, (q, a) in enumerate(zip(quotas, available)) if a < q]
    return subset_dataset(dataset, indices), quotas, kept, clipped


# ----------------------------------------------------------------------------- iNaturalist 2018, ImageNet-LT

#: --dataset name -> (split -> annotation file in DATA); 'validation' is the CLI's default --val-split.
LONGTAIL_DATASETS = {
    'inat2018': {'train': 'train2018.json', 'val': 'val2018.json', 'validation': 'val2018.json'},
    'imagenet_lt': {'train': 'ImageNet_LT_train.txt', 'val': 'ImageNet_LT_val.txt',
                    'validation': 'ImageNet_LT_val.txt', 'test': 'ImageNet_LT_test.txt'},
}


class ListReader:
    """A timm reader (``timm.data.readers.reader.Reader``'s interface) of a list of ``(file, class index)``
    samples: ``reader[i]`` is ``(open file, target)`` as timm's ``ReaderImageFolder`` gives them, so that
    ``ImageDataset`` decodes them with PIL and applies the loader's transforms."""

    def __init__(self, root: str, samples: List[tuple], class_to_idx: dict, source: str):
        self.root, self.samples, self.class_to_idx, self.source = root, samples, class_to_idx, source

    def __getitem__(self, index):
        path, target = self.samples[index]
        return open(path, 'rb'), target

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        filename = self.samples[index][0]
        if basename:
            return os.path.basename(filename)
        return filename if absolute else os.path.relpath(filename, self.root)

    def filename(self, index, basename=False, absolute=False):
        return self._filename(index, basename=basename, absolute=absolute)

    def filenames(self, basename=False, absolute=False):
        return [self._filename(i, basename=basename, absolute=absolute) for i in range(len(self))]


def _annotation_file(name: str, root: str, split: str) -> str:
    files = LONGTAIL_DATASETS[name]
    if split not in files:
        names = ', '.join(s for s in files if s != 'validation')
        raise ValueError(f'no split {split!r} in --dataset {name} (splits: {names}; validation = val)')
    path = os.path.join(root, files[split])
    if not os.path.isfile(path):
        raise ValueError(f'annotation file not found: {path}')
    return path


def _check_files(paths: Sequence[str], source: str) -> None:
    """Every image listed exists (one ``listdir`` per folder, not one ``stat`` per image)."""
    start = time.time()
    if len(paths) >= _LARGE:
        _logger.info(f'{source}: checking that its {len(paths)} images exist ...')
    listed = {}
    missing = []
    for path in paths:
        folder, base = os.path.split(path)
        if folder not in listed:
            try:
                listed[folder] = set(os.listdir(folder))
            except OSError:
                listed[folder] = set()
        if base not in listed[folder]:
            missing.append(path)
    if missing:
        raise ValueError(f'{len(missing)} image(s) listed in {source} not found, e.g. {missing[0]}')
    if len(paths) >= _LARGE:
        _logger.info(f'{source}: all {len(paths)} images found, in {len(listed)} folders ({time.time() - start:.1f}s)')


def _dataset(reader: ListReader, img_mode: Optional[str]):
    return ImageDataset(reader.root, reader=reader, input_img_mode=img_mode or 'RGB')


def _json_list(data: dict, key: str, source: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise ValueError(f'{source}: no "{key}" list (not an iNaturalist 2018 / COCO-style annotation file)')
    return value


def _int_field(entry, key: str, source: str, where: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{source}: {where} has no integer "{key}" ({entry!r:.120})')
    return value


def inat2018_dataset(root: str, split: str, img_mode: Optional[str] = 'RGB', train=None, check_files: bool = True):
    """``--dataset inat2018``: iNaturalist 2018 (Van Horn et al. 2018) in its official layout, the data of
    the paper's Table 3 / 9 (EL_SPEC 6; 8,142 classes, 437,513 training and 24,426 validation images).

    ``root`` holds ``train2018.json`` / ``val2018.json`` (COCO style: ``images`` ``[{id, file_name}]``,
    ``annotations`` ``[{image_id, category_id}]``, ``categories`` ``[{id, ...}]``) and the images at their
    ``file_name`` relative to ``root`` (``train_val2018/Plantae/2491/....jpg``). Samples in the order of
    ``images``; class index = the position of the category id among the sorted category ids (the id itself
    for the official files, whose ids are 0..8141, as Kang et al.'s lists use them); ``class_to_idx`` maps
    ``str(category id)`` to it. ``train``: the training split made by this function, whose classes the
    validation split takes.

    Returns:
        a timm ``ImageDataset`` (``reader``: :class:`ListReader`).

    Raises:
        ValueError: one line: unknown split, a missing or malformed annotation file, an image without or
            with several annotations, an unknown category, a missing image file.
    """
    path = _annotation_file('inat2018', root, split)
    source = os.path.basename(path)
    try:
        with open(path, 'rb') as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f'{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})') from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f'{source}: cannot be read ({" ".join(str(err).split())})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{source}: holds a JSON {type(data).__name__}, not an object with images and annotations')
    images = _json_list(data, 'images', source)
    annotations = _json_list(data, 'annotations', source)
    if not annotations:
        raise ValueError(f'{source}: no annotations (the iNaturalist 2018 test labels are not public)')
    files = {}
    for i, image in enumerate(images):
        image_id = _int_field(image, 'id', source, f'images[{i}]')
        name = image.get('file_name')
        if not isinstance(name, str) or not name:
            raise ValueError(f'{source}: images[{i}] has no "file_name" ({image!r:.120})')
        if image_id in files:
            raise ValueError(f'{source}: image id {image_id} appears twice in "images"')
        files[image_id] = name
    labels = {}
    for i, annotation in enumerate(annotations):
        image_id = _int_field(annotation, 'image_id', source, f'annotations[{i}]')
        category = _int_field(annotation, 'category_id', source, f'annotations[{i}]')
        if image_id not in files:
            raise ValueError(f'{source}: annotations[{i}] is of image id {image_id}, not in "images"')
        if image_id in labels:
            raise ValueError(f'{source}: image id {image_id} ({files[image_id]}) has several annotations')
        labels[image_id] = category
    unlabelled = [image_id for image_id in files if image_id not in labels]
    if unlabelled:
        raise ValueError(f'{source}: {len(unlabelled)} image(s) without an annotation, e.g. id {unlabelled[0]} '
                         f'({files[unlabelled[0]]})')
    if train is not None:
        class_to_idx = dict(train.reader.class_to_idx)
    else:
        categories = data.get('categories') or []
        if not isinstance(categories, list):
            raise ValueError(f'{source}: "categories" is not a list')
        ids = {_int_field(c, 'id', source, f'categories[{i}]') for i, c in enumerate(categories)} \
            or set(labels.values())
        class_to_idx = {str(cid): index for index, cid in enumerate(sorted(ids))}
    samples = []
    for image_id, name in files.items():
        index = class_to_idx.get(str(labels[image_id]))
        if index is None:
            known = 'the training split\'s categories' if train is not None else '"categories"'
            raise ValueError(f'{source}: image {name} has category {labels[image_id]}, not among {known}')
        samples.append((os.path.join(root, name), index))
    if check_files:
        _check_files([p for p, _ in samples], source)
    return _dataset(ListReader(root, samples, class_to_idx, source), img_mode)


def imagenet_lt_dataset(root: str, split: str, img_mode: Optional[str] = 'RGB', train=None,
                        check_files: bool = True):
    """``--dataset imagenet_lt``: ImageNet-LT (Liu et al., CVPR 2019; the long-tailed benchmark of Kang et al.
    2020, EL_SPEC 6) in its list-file layout: ``root`` holds ``ImageNet_LT_train.txt`` / ``_val.txt`` /
    ``_test.txt``, one ``<path relative to root> <class index>`` per line (1,000 classes, 1,280 to 5 training
    images each). Samples in the file's order; ``class_to_idx`` maps ``str(c)`` to ``c`` for the classes
    ``0 .. max label`` of the training file (``train``: the training split made by this function, whose
    classes a validation split takes).

    Returns:
        a timm ``ImageDataset`` (``reader``: :class:`ListReader`).

    Raises:
        ValueError: one line: unknown split, a missing list file, a malformed line (naming its number),
            a label outside the training classes, a missing image file.
    """
    path = _annotation_file('imagenet_lt', root, split)
    source = os.path.basename(path)
    entries = []
    try:
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().rsplit(None, 1)
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f'{source} line {number}: expected "<relative path> <class index>", '
                                     f'got {line.strip()[:120]!r}')
                entries.append((parts[0], int(parts[1]), number))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f'{source}: cannot be read ({" ".join(str(err).split())})') from None
    if not entries:
        raise ValueError(f'{source}: no images listed')
    if train is not None:
        class_to_idx = dict(train.reader.class_to_idx)
    else:
        class_to_idx = {str(c): c for c in range(max(label for _, label, _ in entries) + 1)}
    for name, label, number in entries:
        if label >= len(class_to_idx):
            raise ValueError(f'{source} line {number}: class {label} is not among the training split\'s '
                             f'{len(class_to_idx)} classes')
    samples = [(os.path.join(root, name), label) for name, label, _ in entries]
    if check_files:
        _check_files([p for p, _ in samples], source)
    return _dataset(ListReader(root, samples, class_to_idx, source), img_mode)


def longtail_dataset(name: str, root: str, split: str, img_mode: Optional[str] = 'RGB', train=None):
    """The split ``split`` of ``--dataset name`` (a :data:`LONGTAIL_DATASETS` key, any case):
    :func:`inat2018_dataset` or :func:`imagenet_lt_dataset`."""
    maker = {'inat2018': inat2018_dataset, 'imagenet_lt': imagenet_lt_dataset}[name.lower()]
    return maker(root, split, img_mode=img_mode, train=train)


def is_longtail_dataset(name: Optional[str]) -> bool:
    """Whether ``--dataset name`` is one of this module's (:data:`LONGTAIL_DATASETS`)."""
    return (name or '').lower() in LONGTAIL_DATASETS
