""" Quickstart: cross-entropy and the Encouraging Loss side by side, in a minute on a CPU

``el-quickstart`` (also ``python -m timm_el.quickstart``) trains the same small
network twice, from the same initialisation and on the same batches, once
with cross-entropy and once with the Encouraging Loss (Zhao et al., AAAI
2022; EL_SPEC section 2, ``log_end`` 0.75 as in the paper's image runs), then
compares the two models on held-out data (EL_SPEC section 5):

* accuracy;
* mean margin ``z_y - max_{k != y} z_k`` and mean conditional energy on the
  data ``E(x, y) = -z_y`` (EL should give larger margins and lower energy);
* expected calibration error (15 bins);
* out-of-distribution detection with the minimum conditional energy
  ``min_k -z_k`` as the score (AUROC and FPR at 95% TPR);
* a linear probe on the frozen penultimate features.

Both criteria come from timm's ``create_classification_loss`` with
``loss_type='ce'`` and ``loss_type='encouraging'`` (the hook ``timm_el``
installs), the code path a timm user trains with. The data ships with
scikit-learn (``load_digits``: 1,797 8x8 images of the digits 0-9), so nothing
is downloaded. By default the model learns the digits 0-7 and the digits 8
and 9 are the out-of-distribution set (``--ood heldout``); ``--ood`` picks
another one. Everything is one flag away::

    el-quickstart                                   # digits, small CNN, under a minute on 2 cores
    el-quickstart --quick                           # a few seconds (CI)
    el-quickstart --model mlp --epochs 200
    el-quickstart --model resnet18 --img-size 32    # any timm model that takes 1-channel images
    el-quickstart --dataset mnist --data-dir DATA --ood fashion_mnist    # the paper's OOD pairing
    el-quickstart --dataset DIR                     # a small ImageFolder: DIR/train, DIR/test (or val)

Output (``--out``, default ``./el-quickstart``; a non-empty directory is
refused without ``--force``): the analysis report of
:func:`encouraging_loss.tools.analysis.write_report` (``report.json``,
``report.md``, ``margins.png``, ``energy_per_class.png``, ``reliability.png``,
``ood_scores.png``) and ``quickstart.json`` (the settings, the environment,
the per-epoch training curve and the table). A read-only ``--out`` is refused
before training; the files are written all or nothing (a full disk leaves no
partial file).

Reproducibility: the same flags give the same numbers, to the last bit, with
the same torch build on the same kind of CPU and the same ``--threads``. Another
CPU (other vector instructions, hence other torch kernels), another torch or
another thread count rounds differently from the first steps on, and the
differences grow over the epochs into other numbers (on the digits, measured:
accuracies by up to 3 of the 481 test images, EL's OOD AUROC between 95.4 and
97.9). The run prints and records what it depends on (torch, timm, the CPU and
the kernels torch chose for it, the threads): :func:`environment`.

MNIST against Fashion-MNIST (``--dataset mnist --ood fashion_mnist``) is no
bug but a property of the small built-in ``cnn``: its features (64 channels
averaged over the whole image) and so its logits grow with the lit area of the
image, and a Fashion-MNIST item lights about 2.6 times as many pixels as a
digit; the min-energy AUROC is below 50 (about 30 after 10 epochs on 5,000
images, and after one epoch on all 60,000). The paper's layout (``--model
mnist_cnn``: a feature layer on the flattened 3x3 map) scored 75-84 after one
or two epochs on 5,000 images, and a narrowed copy (widths 16, 32, 64) 98.7
(CE) / 98.9 (EL) after one epoch on 60,000.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from encouraging_loss.tools import analysis
from encouraging_loss.tools.cli import Parser

from . import factory

__all__ = [
    'BUILTIN_MODELS',
    'DATASETS',
    'OOD_SETS',
    'QuickData',
    'SmallCnn',
    'SmallMlp',
    'build_parser',
    'create_model',
    'describe_environment',
    'environment',
    'format_table',
    'load_data',
    'main',
    'run',
    'state_digest',
    'train_model',
]

PROG = 'el-quickstart'

#: the built-in models (anything else goes to ``timm.create_model``).
BUILTIN_MODELS = ('cnn', 'mlp')
#: named datasets; anything else is an ImageFolder directory.
DATASETS = ('digits', 'mnist', 'fashion_mnist')
#: out-of-distribution sets (see ``--ood`` in :func:`build_parser`).
OOD_SETS = ('heldout', 'inverted', 'noise', 'mnist', 'fashion_mnist', 'none')
#: the columns of the table: (key, header, decimals); accuracies, ECE, AUROC and FPR in percent.
COLUMNS = (
    ('accuracy', 'acc %', 2),
    ('margin', 'margin', 2),
    ('energy', 'energy -z_y', 2),
    ('free_energy', 'free energy', 2),
    ('ece', 'ECE %', 2),
    ('auroc', 'OOD AUROC %', 2),
    ('fpr95', 'FPR95 %', 2),
    ('probe', 'probe acc %', 2),
)
#: the settings of --quick and of the full run (flags given explicitly win).
QUICK = {'epochs': 8, 'width': 16, 'probe_epochs': 30}
FULL = {'epochs': 60, 'width': 32, 'probe_epochs': 100}
#: subfolders searched for an MNIST-format dataset under --data-dir.
_IDX_FOLDERS = {'mnist': ('mnist', ''), 'fashion_mnist': ('fashion-mnist', 'fashion_mnist', 'fashionmnist')}
_TEST_SPLITS = ('test', 'val', 'validation', 'valid', 'eval')


class UsageError(ValueError):
    """A bad flag or input; :func:`main` reports it as one line and exits with status 2."""


# ----------------------------------------------------------------------------- models


def _conv_bn_relu(in_chs: int, out_chs: int) -> List[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


class SmallCnn(nn.Module):
    """ The quickstart's default network: a small CNN with a linear classifier.

    Three 3x3 convolutions (``width``, ``width``, ``2 * width`` channels, each
    with BatchNorm and ReLU, a 2x2 max-pool after the second and the third),
    global average pooling, a ``feature_dim`` fully connected layer with ReLU
    and a plain linear classifier. It follows timm's interface
    (``forward_features`` / ``forward_head(x, pre_logits=True)``), so the
    quickstart treats it like any timm model.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2))
        self.pre_logits = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2 * width, feature_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The logits from the feature map (the penultimate feature if ``pre_logits``)."""
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


class SmallMlp(nn.Module):
    """ A two-hidden-layer perceptron (``feature_dim`` units, ReLU) with a linear classifier,
    with the same timm-style interface as :class:`SmallCnn`."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, feature_dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Flatten(1), nn.Linear(in_features, feature_dim), nn.ReLU(inplace=True),
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature."""
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The logits (the feature itself if ``pre_logits``)."""
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def create_model(name: str, num_classes: int, in_chans: int, img_size: int, width: int = 32) -> nn.Module:
    """The network ``--model`` names: a built-in (:data:`BUILTIN_MODELS`) or any timm model.

    timm models are built with ``timm.create_model(name, num_classes=..., in_chans=...)``, with
    ``img_size=...`` too where the model takes it (``mnist_cnn``, vision transformers).
    Raises :class:`UsageError` naming ``--model`` when timm cannot build it.
    """
    if name == 'cnn':
        return SmallCnn(num_classes, in_chans, width=width)
    if name == 'mlp':
        return SmallMlp(num_classes, in_chans * img_size * img_size)
    import timm

    if not timm.is_model(name):
        raise UsageError(f'--model {name}: neither a built-in model ({", ".join(BUILTIN_MODELS)}) nor a timm model '
                         f'(timm.list_models() lists them)')
    kwargs = dict(num_classes=num_classes, in_chans=in_chans)
    try:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # the model has no img_size argument
            return timm.create_model(name, **kwargs)
    except Exception as err:  # noqa: BLE001 -- model constructors raise many kinds
        raise UsageError(f'--model {name}: {_one_line(err)}') from None


def environment() -> Dict[str, object]:
    """What the quickstart's numbers depend on besides its flags (recorded in ``quickstart.json``).

    The runs are deterministic only for one torch build on one kind of CPU with one thread count:
    torch picks its CPU kernels (``cpu_capability``: the vector instructions ATen uses, e.g. AVX2 or
    AVX512, and oneDNN's convolutions) by the CPU, and a floating-point sum split over more threads
    rounds differently; such last-bit differences grow over the epochs into different weights.
    """
    import platform

    import sklearn
    import timm

    from encouraging_loss.tools.benchmark import cpu_name

    capability = getattr(torch.backends, 'cpu', None)
    return {
        'torch': torch.__version__,
        'timm': timm.__version__,
        'numpy': np.__version__,
        'scikit-learn': sklearn.__version__,
        'python': platform.python_version(),
        'machine': platform.machine(),
        'cpu': cpu_name(),
        'cpu_capability': capability.get_cpu_capability() if capability is not None else None,
        'mkldnn': bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        'threads': torch.get_num_threads(),
    }


def describe_environment(env: Dict[str, object]) -> str:
    """One line of :func:`environment`: ``torch ..., timm ..., CPU ... (AVX512), 1 torch thread``."""
    threads = env.get('threads')
    capability = f' ({env["cpu_capability"]})' if env.get('cpu_capability') else ''
    return (f'torch {env.get("torch")}, timm {env.get("timm")}, CPU {env.get("cpu")}{capability}, '
            f'{threads} torch thread{"" if threads == 1 else "s"}')


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes and values), to show two runs start alike."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- data


class QuickData:
    """ The tensors of one quickstart run (images normalised with the training mean and std).

    Attributes:
        train_x, train_y: the in-distribution training images ``(N, C, H, W)`` and labels.
        test_x, test_y: the in-distribution test images and labels.
        ood_x: the out-of-distribution images (None with ``--ood none``).
        classes: the names of the learned classes.
        description: one line saying what the data is.
    """

    def __init__(self, train_x, train_y, test_x, test_y, ood_x, classes, description):
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.ood_x = ood_x
        self.classes = list(classes)
        self.description = description

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0]}' if text else type(err).__name__


def _digits() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """scikit-learn's digits, split 2/3 train, 1/3 test (fixed, stratified), pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.
    y = digits.target.astype(np.int64)
    rng = np.random.RandomState(0)  # the split does not depend on --seed
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(len(idx) * 2 / 3))
        train.extend(idx[:cut])
        test.extend(idx[cut:])
    train, test = np.sort(train), np.sort(test)
    return x[train], y[train], x[test], y[test], [str(c) for c in digits.target_names]


def _idx_root(name: str, data_dir: Optional[str], flag: str) -> Path:
    if not data_dir:
        raise UsageError(f'{flag} {name} needs --data-dir (a folder with the four {name} idx files, '
                         f'or its parent with a {_IDX_FOLDERS[name][0]}/ folder)')
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f'--data-dir {data_dir}: no such directory')
    for sub in _IDX_FOLDERS[name]:
        folder = root / sub if sub else root
        if sub == '' and name == 'mnist' and 'fashion' in root.name.lower():
            continue
        if (folder / 'train-images-idx3-ubyte.gz').is_file() or (folder / 'train-images-idx3-ubyte').is_file():
            return folder
    if name == 'fashion_mnist' and 'fashion' in root.name.lower():
        return root
    raise UsageError(f'{flag} {name}: no idx files (train-images-idx3-ubyte[.gz], ...) in --data-dir {data_dir} '
                     f'or its {"/, ".join(s for s in _IDX_FOLDERS[name] if s)}/ folder')


def _idx_dataset(name: str, data_dir: Optional[str], flag: str, limit: Optional[int], train: bool = True):
    """(train_x, train_y, test_x, test_y, classes) of MNIST or Fashion-MNIST from local idx files, pixels in
    [0, 1] (the in-distribution and the OOD sets alike); ``train=False`` leaves the training split out (None)."""
    from .data import load_mnist

    root = _idx_root(name, data_dir, flag)
    try:
        train_x, train_y = load_mnist(root, 'train', limit=limit) if train else (None, None)
        test_x, test_y = load_mnist(root, 'test')
    except (OSError, ValueError) as err:
        raise UsageError(f'{flag} {name} in {root}: {_one_line(err)}') from None
    return (None if train_x is None else train_x.astype(np.float32) / 255., train_y,
            test_x.astype(np.float32) / 255., test_y, [str(c) for c in range(10)])


def _image_folder(root: str, img_size: Optional[int], in_chans: int):
    """(train_x, train_y, test_x, test_y, classes) of a small ImageFolder ``DIR/train``, ``DIR/test`` (or val)."""
    from timm.data import create_dataset

    base = Path(root)
    if not (base / 'train').is_dir():
        raise UsageError(f'--dataset {root}: expected an ImageFolder with a train/ folder (DIR/train/<class>/*.png)')
    test_split = next((s for s in _TEST_SPLITS if (base / s).is_dir()), None)
    if test_split is None:
        raise UsageError(f'--dataset {root}: no test folder ({", ".join(_TEST_SPLITS)}) beside train/')
    size = img_size or 28
    mode = 'L' if in_chans == 1 else 'RGB'
    arrays, classes = [], None
    for split in ('train', test_split):
        try:
            dataset = create_dataset('', root=str(base / split), split=split, is_training=False, input_img_mode=mode)
        except Exception as err:  # noqa: BLE001 -- timm raises many kinds
            raise UsageError(f'--dataset {root}, {split}/: {_one_line(err)}') from None
        mapping = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or {}
        names = [c for c, _ in sorted(mapping.items(), key=lambda item: item[1])]
        if classes is None:
            classes = names
        elif names != classes:
            raise UsageError(f'--dataset {root}: {split}/ has classes {names[:5]}... unlike train/ ({classes[:5]}...)')
        xs, ys = [], []
        for i in range(len(dataset)):
            image, label = dataset[i]
            image = image.convert(mode).resize((size, size))
            array = np.asarray(image, dtype=np.float32) / 255.
            xs.append(array if array.ndim == 2 else array.transpose(2, 0, 1))
            ys.append(int(label))
        if not xs:
            raise UsageError(f'--dataset {root}: {split}/ holds no images')
        arrays.append((np.stack(xs), np.asarray(ys, dtype=np.int64)))
    (train_x, train_y), (test_x, test_y) = arrays
    return train_x, train_y, test_x, test_y, classes


def _as_nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t[:, None] if t.dim() == 3 else t


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1).contiguous()
    return x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous()


def load_data(dataset: str = 'digits', *, ood: str = 'heldout', heldout: int = 2, data_dir: Optional[str] = None,
              img_size: Optional[int] = None, in_chans: Optional[int] = None, train_size: Optional[int] = None,
              test_size: Optional[int] = None, seed: int = 0) -> Tuple[QuickData, int, int]:
    """The quickstart's data: in-distribution train/test tensors and the out-of-distribution set.

    ``dataset``: 'digits' (scikit-learn, no download), 'mnist' / 'fashion_mnist' (idx files under
    ``data_dir``) or an ImageFolder directory. ``ood``: 'heldout' (the last ``heldout`` classes are
    left out of training and form the OOD set), 'inverted' (the test images with inverted
    intensities, a covariate shift), 'noise' (uniform noise images), 'mnist' / 'fashion_mnist'
    (that dataset's test images, resized; EL_SPEC 5 pairs MNIST with Fashion-MNIST) or 'none'.
    Images are scaled to [0, 1], resized to ``img_size`` (default: the dataset's own), then
    normalised with the mean and std of the training images.

    Returns ``(data, in_chans, img_size)``. Raises :class:`UsageError` naming the flag on bad input.
    """
    if dataset == 'digits':
        train_x, train_y, test_x, test_y, classes = _digits()
    elif dataset in ('mnist', 'fashion_mnist'):
        train_x, train_y, test_x, test_y, classes = _idx_dataset(dataset, data_dir, '--dataset', None)
    else:
        if not os.path.isdir(dataset):
            raise UsageError(f'--dataset {dataset}: neither {", ".join(DATASETS)} nor a directory')
        train_x, train_y, test_x, test_y, classes = _image_folder(dataset, img_size, in_chans or 3)
    train_x, test_x = _as_nchw(train_x), _as_nchw(test_x)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    native_chans, native_size = train_x.shape[1], train_x.shape[-1]
    in_chans = in_chans or native_chans
    img_size = img_size or native_size
    train_x = _match_channels(_resize(train_x, img_size), in_chans)
    test_x = _match_channels(_resize(test_x, img_size), in_chans)
    description = f'{dataset}: {len(classes)} classes, {img_size}x{img_size}x{in_chans}'

    ood_x = None
    if ood == 'heldout':
        if not 1 <= heldout < len(classes) - 1:
            raise UsageError(f'--heldout-classes must be in [1, {len(classes) - 2}] for {len(classes)} classes, '
                             f'got {heldout}')
        keep = len(classes) - heldout
        out_names = classes[keep:]
        ood_x = torch.cat([train_x[train_y >= keep], test_x[test_y >= keep]])
        train_x, train_y = train_x[train_y < keep], train_y[train_y < keep]
        test_x, test_y = test_x[test_y < keep], test_y[test_y < keep]
        classes = classes[:keep]
        description += f'; learns classes {classes[0]}-{classes[-1]}, OOD: held-out classes {", ".join(out_names)}'
    elif ood == 'inverted':
        ood_x = 1. - test_x
        description += '; OOD: the test images with inverted intensities'
    elif ood == 'noise':
        generator = torch.Generator().manual_seed(seed + 1)
        ood_x = torch.rand(test_x.shape, generator=generator)
        description += '; OOD: uniform noise images'
    elif ood in ('mnist', 'fashion_mnist'):
        if ood == dataset:
            raise UsageError(f'--ood {ood} is the training dataset itself')
        _, _, other, _, _ = _idx_dataset(ood, data_dir, '--ood', None, train=False)
        ood_x = _match_channels(_resize(_as_nchw(other), img_size), in_chans)
        description += f'; OOD: {ood} test images'
    elif ood != 'none':
        raise UsageError(f'--ood {ood}: expected one of {", ".join(OOD_SETS)}')
    generator = torch.Generator().manual_seed(seed)
    if train_size is not None and train_size < len(train_y):
        order = torch.randperm(len(train_y), generator=generator)[:train_size].sort().values
        train_x, train_y = train_x[order], train_y[order]
    if test_size is not None and test_size < len(test_y):
        order = torch.randperm(len(test_y), generator=generator)[:test_size].sort().values
        test_x, test_y = test_x[order], test_y[order]
    if test_size is not None and ood_x is not None and test_size < len(ood_x):
        ood_x = ood_x[torch.randperm(len(ood_x), generator=generator)[:test_size].sort().values]
    description += f'; {len(train_y)} train, {len(test_y)} test' + (f', {len(ood_x)} OOD' if ood_x is not None else '')

    mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)

    def norm(x):
        return None if x is None else ((x - mean) / std).contiguous()

    return QuickData(norm(train_x), train_y, norm(test_x), test_y, norm(ood_x), classes, description), in_chans, \
        img_size


# ----------------------------------------------------------------------------- training


def create_loss(loss: str, smoothing: float = 0., log_end: float = 0.75) -> nn.Module:
    """The criterion, from timm's factory: ``loss_type='ce'`` or ``loss_type='encouraging'`` (``timm_el``'s hook,
    Encouraging Loss of EL_SPEC section 2 with the conservative bonus ending at ``log_end``)."""
    import timm.loss

    factory.install()  # idempotent; looked up through the module: the hook timm_el installed
    if loss == 'ce':
        return timm.loss.create_classification_loss(loss_type='ce', smoothing=smoothing)
    return timm.loss.create_classification_loss(loss_type=factory.LOSS_TYPE, smoothing=smoothing, log_end=log_end)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 512, features: bool = False):
    model.eval()
    logits, feats = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if features and hasattr(model, 'forward_features') and hasattr(model, 'forward_head'):
            feature_map = model.forward_features(xb)
            try:
                feats.append(model.forward_head(feature_map, pre_logits=True).flatten(1))
            except TypeError:  # no pre_logits argument
                feats.append(None)
            logits.append(model.forward_head(feature_map))
        elif features:
            feats.append(None)
            logits.append(model(xb))
        else:
            logits.append(model(xb))
    out = torch.cat(logits).float()
    if features:
        return out, (None if any(f is None for f in feats) else torch.cat(feats).float())
    return out


def train_model(model: nn.Module, criterion: nn.Module, data: QuickData, *, epochs: int, batch_size: int, lr: float,
                weight_decay: float, seed: int, name: str = '', say=print) -> List[dict]:
    """Train ``model`` in place: SGD with momentum 0.9 (timm's ``create_optimizer_v2('momentum')``), cosine
    schedule (timm's ``create_scheduler_v2``), batches drawn from a generator seeded with ``seed`` (the same
    order for every criterion). Returns the per-epoch curve (epoch, train loss, test accuracy, lr, seconds)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt='momentum', lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=0, min_lr=0.)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    n = len(data.train_y)
    for epoch in range(epochs):
        start = time.time()
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0., 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = criterion(model(data.train_x[idx]), data.train_y[idx])
            if not torch.isfinite(loss):
                raise UsageError(f'--lr {lr}: the {name} training loss became {loss.item()} at epoch {epoch + 1}; '
                                 f'try a lower --lr')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        lr_now = optimizer.param_groups[0]['lr']
        scheduler.step(epoch + 1)
        accuracy = (_predict(model, data.test_x).argmax(1) == data.test_y).float().mean().item()
        row = {'epoch': epoch + 1, 'train_loss': total / max(count, 1), 'test_accuracy': accuracy, 'lr': lr_now,
               'seconds': time.time() - start}
        curve.append(row)
        say(f'[{name}] epoch {epoch + 1:>3}/{epochs}  loss {row["train_loss"]:.4f}  test acc {accuracy * 100:6.2f}%  '
            f'lr {lr_now:.4f}  {row["seconds"]:.1f}s')
    return curve


# ----------------------------------------------------------------------------- the table


def _get(summary: dict, *path) -> Optional[float]:
    node = summary
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def table_row(summary: dict) -> Dict[str, Optional[float]]:
    """The table's numbers from one summary of :func:`encouraging_loss.tools.analysis.analyze` (percent where the
    summary has percent): accuracy, mean margin, mean conditional energy ``E(x, y) = -z_y`` and mean free
    energy on the test data, ECE, AUROC and FPR95 of the min-energy OOD score, linear-probe accuracy."""
    return {
        'accuracy': _get(summary, 'accuracy'),
        'margin': _get(summary, 'margin', 'mean'),
        'energy': _get(summary, 'energy', 'data', 'target_mean'),
        'free_energy': _get(summary, 'energy', 'data', 'free_mean'),
        'ece': _get(summary, 'ece'),
        'auroc': _get(summary, 'ood', 'min_energy', 'auroc'),
        'fpr95': _get(summary, 'ood', 'min_energy', 'fpr95'),
        'probe': _get(summary, 'probe', 'accuracy'),
    }


def format_table(rows: Dict[str, Dict[str, Optional[float]]]) -> str:
    """A plain-text table, one line per model, the columns of :data:`COLUMNS` that have a number."""
    names = list(rows)
    cols = [c for c in COLUMNS if any(rows[n].get(c[0]) is not None for n in names)]
    first = max(len('model'), *(len(n) for n in names))
    cells = [[f'{rows[n][key]:.{dec}f}' if rows[n].get(key) is not None else '-' for key, _, dec in cols]
             for n in names]
    widths = [max(len(header), *(len(r[i]) for r in cells)) for i, (_, header, _) in enumerate(cols)]
    lines = ['  '.join(['model'.ljust(first)] + [h.rjust(w) for (_, h, _), w in zip(cols, widths)])]
    lines.append('  '.join(['-' * first] + ['-' * w for w in widths]))
    for n, r in zip(names, cells):
        lines.append('  '.join([n.ljust(first)] + [c.rjust(w) for c, w in zip(r, widths)]))
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``el-quickstart``."""
    p = Parser(
        prog=PROG,
        description='Train the same small network with cross-entropy and with the Encouraging Loss (Zhao et al., '
                    'AAAI 2022) through timm\'s create_classification_loss, from the same initialisation, then '
                    'compare accuracy, margins, energy, calibration (ECE), OOD detection and a linear probe. '
                    'Default data: scikit-learn\'s digits (no download).')
    p.add_argument('--quick', action='store_true',
                   help=f'a few seconds: {QUICK["epochs"]} epochs, width {QUICK["width"]} (full run: '
                        f'{FULL["epochs"]} epochs, width {FULL["width"]})')
    p.add_argument('--dataset', default='digits', metavar='NAME|DIR',
                   help='digits (scikit-learn), mnist, fashion_mnist (idx files under --data-dir) or a small '
                        'ImageFolder DIR with train/ and test/ (or val/)')
    p.add_argument('--data-dir', default=None, metavar='DIR',
                   help='folder with the MNIST / Fashion-MNIST idx files (or their parent, with mnist/ and '
                        'fashion-mnist/ folders)')
    p.add_argument('--ood', default='heldout', choices=OOD_SETS,
                   help='out-of-distribution set: heldout (the last --heldout-classes classes are not trained '
                        'on), inverted (test images with inverted intensities), noise, mnist / fashion_mnist '
                        '(needs --data-dir), none')
    p.add_argument('--heldout-classes', type=int, default=2, metavar='N', help='classes held out with --ood heldout')
    p.add_argument('--model', default='cnn', metavar='NAME',
                   help='cnn or mlp (built in), or any timm model (built with in_chans and num_classes)')
    p.add_argument('--width', type=int, default=None, metavar='N', help='channels of the built-in cnn')
    p.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='resize the images to N x N (default: their own size; 28 for an ImageFolder)')
    p.add_argument('--in-chans', type=int, default=None, metavar='N',
                   help='input channels (default: the data\'s; 3 for an ImageFolder)')
    p.add_argument('--train-size', type=int, default=None, metavar='N',
                   help='train on a random N of the training images')
    p.add_argument('--test-size', type=int, default=None, metavar='N',
                   help='evaluate on a random N of the test images and of the OOD images')
    p.add_argument('--epochs', type=int, default=None, metavar='N', help='training epochs of each model')
    p.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size')
    p.add_argument('--lr', type=float, default=0.05, help='learning rate (SGD, momentum 0.9, cosine schedule)')
    p.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay')
    p.add_argument('--smoothing', type=float, default=0., help='label smoothing of both losses')
    p.add_argument('--log-end', type=float, default=factory.EL_KWARGS['log_end'],
                   help='the Encouraging Loss\'s conservative bonus end point, in (0, 1]; 1 = normal bonus')
    p.add_argument('--probe-epochs', type=int, default=None, metavar='N',
                   help='epochs of the linear probe on the frozen features (0: no probe)')
    p.add_argument('--bins', type=int, default=15, metavar='N', help='ECE bins')
    p.add_argument('--seed', type=int, default=0, help='seed of the initialisation and the batch order')
    p.add_argument('--threads', type=int, default=1, metavar='N',
                   help='torch CPU threads; the small default models run fastest on one (and do not stall on a '
                        'busy machine), larger timm models may gain from more; the numbers depend on it (another '
                        'count sums in another order)')
    p.add_argument('--out', default='el-quickstart', metavar='DIR', help='where the report and plots go')
    p.add_argument('--force', action='store_true', help='write into a non-empty --out')
    return p


def _check(args) -> None:
    """Flag values and combinations; raises :class:`UsageError` naming the flag."""
    for name in ('epochs', 'batch_size', 'width', 'img_size', 'in_chans', 'train_size', 'test_size', 'bins',
                 'threads'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    if args.batch_size < 2:
        raise UsageError(f'--batch-size must be >= 2 (BatchNorm), got {args.batch_size}')
    if args.probe_epochs is not None and args.probe_epochs < 0:
        raise UsageError(f'--probe-epochs must be >= 0, got {args.probe_epochs}')
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f'--lr must be a finite number > 0, got {args.lr}')
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f'--weight-decay must be a finite number >= 0, got {args.weight_decay}')
    if not (0 <= args.smoothing < 1):
        raise UsageError(f'--smoothing must be in [0, 1), got {args.smoothing}')
    if not (0 < args.log_end <= 1):
        raise UsageError(f'--log-end must be in (0, 1], got {args.log_end}')
    if args.dataset not in DATASETS and not os.path.isdir(args.dataset):
        raise UsageError(f'--dataset {args.dataset}: neither {", ".join(DATASETS)} nor a directory')
    if args.width is not None and args.model != 'cnn':
        raise UsageError(f'--width applies to --model cnn only, got --model {args.model}')
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f'--out {args.out} exists and is not a directory')
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f'--out {args.out} exists and is not empty (a previous run?); pass --force to overwrite '
                         f'its files or choose another --out')
    try:  # a read-only --out fails now, not after training (creates nothing)
        analysis.check_out_dir(out, '--out')
    except analysis.ReportError as err:
        raise UsageError(str(err)) from None


def run(args, say=print) -> dict:
    """Train CE and EL as ``args`` say, analyse both, write the report; returns ``quickstart.json``'s content."""
    mode = QUICK if args.quick else FULL
    epochs = args.epochs or mode['epochs']
    width = args.width or mode['width']
    probe_epochs = mode['probe_epochs'] if args.probe_epochs is None else args.probe_epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, say, epochs, width, probe_epochs)
    finally:
        torch.set_num_threads(threads)


def _run(args, say, epochs: int, width: int, probe_epochs: int) -> dict:
    started = time.time()
    data, in_chans, img_size = load_data(
        args.dataset, ood=args.ood, heldout=args.heldout_classes, data_dir=args.data_dir, img_size=args.img_size,
        in_chans=args.in_chans, train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    say(data.description)
    env = environment()
    say(f'environment: {describe_environment(env)} (the numbers repeat exactly with these, the flags and the seed '
        f'the same)')
    torch.manual_seed(args.seed)
    template = create_model(args.model, data.num_classes, in_chans, img_size, width=width)
    try:  # a model that cannot take these images fails here, in one line, not after training
        with torch.no_grad():
            template.eval()(data.test_x[:2])
    except Exception as err:  # noqa: BLE001 -- any model, any error
        raise UsageError(f'--model {args.model}: fails on {in_chans}x{img_size}x{img_size} images '
                         f'({_one_line(err)}); try another --img-size') from None
    initial = copy.deepcopy(template.state_dict())
    n_params = sum(p.numel() for p in template.parameters())
    say(f'model {args.model}' + (f' (width {width})' if args.model == 'cnn' else '') +
        f': {n_params:,} parameters; {epochs} epochs, batch {args.batch_size}, lr {args.lr}, '
        f'{torch.get_num_threads()} torch thread{"s" if torch.get_num_threads() != 1 else ""}')
    losses = {'CE': ('ce', 'cross-entropy (timm loss_type=\'ce\')'),
              'EL': ('encouraging', f'Encouraging Loss (timm loss_type=\'encouraging\', log_end {args.log_end})')}
    summaries, raws, curves, rows, seconds, digests = {}, {}, {}, {}, {}, {}
    for name, (loss_type, what) in losses.items():
        say(f'training {name}: {what}')
        t0 = time.time()
        model = template
        model.load_state_dict(initial)  # the same initialisation for both
        digests[name] = {'initial': state_digest(model)}
        criterion = create_loss(loss_type, smoothing=args.smoothing, log_end=args.log_end)
        curves[name] = train_model(model, criterion, data, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                                   weight_decay=args.weight_decay, seed=args.seed, name=name, say=say)
        digests[name]['final'] = state_digest(model)
        logits, features = _predict(model, data.test_x, features=True)
        ood_logits = _predict(model, data.ood_x) if data.ood_x is not None else None
        probe = None
        if probe_epochs and features is not None:
            _, train_features = _predict(model, data.train_x, features=True)
            probe = (train_features, data.train_y)
        summaries[name], raws[name] = analysis.analyze(
            logits, data.test_y, ood_logits=ood_logits, features=features if probe else None, probe=probe,
            n_bins=args.bins, probe_kwargs={'epochs': probe_epochs, 'seed': args.seed})
        rows[name] = table_row(summaries[name])
        seconds[name] = time.time() - t0
        say(f'{name} done in {seconds[name]:.1f}s')
    out = Path(args.out)
    settings = {'dataset': args.dataset, 'ood': args.ood, 'model': args.model, 'width': width,
                'img_size': img_size, 'in_chans': in_chans, 'epochs': epochs, 'batch_size': args.batch_size,
                'lr': args.lr, 'weight_decay': args.weight_decay, 'smoothing': args.smoothing,
                'log_end': args.log_end, 'probe_epochs': probe_epochs, 'bins': args.bins, 'seed': args.seed,
                'quick': bool(args.quick), 'threads': torch.get_num_threads()}
    meta = {'command': PROG, 'data': data.description, 'classes': data.classes, 'settings': settings,
            'environment': env}
    table = format_table(rows)
    result = {
        'data': data.description,
        'settings': settings,
        'environment': env,
        'table': rows,
        'curves': curves,
        'state_sha256': digests,
    }

    def quickstart_json(report_files: Dict[str, Path]) -> Dict[str, str]:
        result['seconds'] = {**seconds, 'total': time.time() - started}
        result['files'] = {k: str(v) for k, v in report_files.items()}
        return {'quickstart.json': json.dumps(result, indent=2) + '\n'}

    try:  # the report and quickstart.json: all of them, or none (a full disk leaves no partial file)
        written = analysis.write_report(summaries, out, raw=raws, force=args.force, meta=meta,
                                        extra=quickstart_json)
    except analysis.ReportError as err:
        raise UsageError(f'--out {args.out}: {err}') from None
    written.pop('quickstart.json', None)
    say('')
    say(table)
    say('')
    say('margin: z_y - max_{k!=y} z_k; energy: -z_y (lower = more confident); OOD: min_k -z_k as the score, '
        'in-distribution = positive')
    say(f'wrote {", ".join(sorted(p.name for p in written.values()))}, quickstart.json to {out} '
        f'({result["seconds"]["total"]:.0f}s in all)')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``el-quickstart`` / ``python -m timm_el.quickstart``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        run(args, say=lambda message: print(message, flush=True))
    except UsageError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print(f'{PROG}: interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
