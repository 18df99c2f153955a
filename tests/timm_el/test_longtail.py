"""timm_el.longtail: the labels and class counts of a dataset without decoding its images, the exponential
long-tailed profile of ``--long-tail-ratio`` (Cao et al. 2019) on the training split only, and the
iNaturalist 2018 / ImageNet-LT loaders on tiny files written here in the official formats; ``timm-el-train``
end to end on each (1 epoch)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset

from timm_el import train as el_train
from timm_el.data import CheckedImageDataset
from timm_el.longtail import (
    LongTailSubset,
    class_counts,
    dataset_labels,
    default_long_tail_max,
    describe_profile,
    imagenet_lt_dataset,
    inat2018_dataset,
    long_tail_counts,
    long_tail_indices,
    long_tail_subset,
)
from timm_el.mnist_ood import write_idx
from timm_el.train_args import UsageError, parse_args

from timm_cli import TINY, read_summary, run_cli

# the tiny long-tailed layouts: images per class in the training and validation files
TRAIN_PER_CLASS, VAL_PER_CLASS = (8, 4, 2), 2


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)


def _write_inat(root: Path) -> Path:
    """iNaturalist 2018's layout: train2018.json / val2018.json (COCO style) and
    train_val2018/<supercategory>/<category id>/<image>.jpg; the category ids are 0..2, image ids count on
    over both files as in the official ones; the images are listed class after class, class 2 first."""
    categories = [{"id": c, "name": f"species {c}", "supercategory": "Plantae"} for c in range(3)]
    image_id = 100
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", (VAL_PER_CLASS,) * 3)):
        images, annotations = [], []
        for c in (2, 0, 1):
            for i in range(per_class[c]):
                name = f"train_val2018/Plantae/{c}/{split}_{i:02d}.jpg"
                _image(root / name, image_id)
                images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
                annotations.append({"id": image_id + 7, "image_id": image_id, "category_id": c})
                image_id += 1
        (root / f"{split}2018.json").write_text(json.dumps(
            {"info": {"year": 2018}, "images": images, "annotations": annotations, "categories": categories,
             "licenses": []}))
    return root


def _write_imagenet_lt(root: Path) -> Path:
    """ImageNet-LT's layout: ImageNet_LT_{train,val,test}.txt, lines "<path relative to root> <label>",
    the images at train/<wnid>/<wnid>_<n>.JPEG and val/ILSVRC2012_val_<n>.JPEG."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", (VAL_PER_CLASS,) * 3), ("test", (1, 1, 1))):
        lines = []
        for c, wnid in enumerate(wnids):
            for i in range(per_class[c]):
                name = f"train/{wnid}/{wnid}_{i}.JPEG" if split == "train" else \
                    f"{split}/ILSVRC2012_{split}_{c:04d}{i:02d}.JPEG"
                _image(root / name, 1000 * c + i + hash(split) % 97)
                lines.append(f"{name} {c}\n")
        (root / f"ImageNet_LT_{split}.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def inat_source(tmp_path_factory) -> Path:
    return _write_inat(tmp_path_factory.mktemp("inat2018"))


@pytest.fixture(scope="module")
def imagenet_lt_source(tmp_path_factory) -> Path:
    return _write_imagenet_lt(tmp_path_factory.mktemp("imagenet_lt"))


@pytest.fixture(scope="module")
def torchvision_mnist(shared_data, tmp_path_factory) -> Path:
    """torchvision's MNIST layout (ROOT/MNIST/raw/, uncompressed idx files) of the first 300 training and 50
    test images: what ``--dataset torch/mnist`` reads."""
    from timm_el import load_mnist

    root = tmp_path_factory.mktemp("tv")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix, limit in (("train", "train", 300), ("test", "t10k", 50)):
        images, labels = load_mnist(shared_data, split, limit=limit)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


def _args(data, *flags):
    return parse_args([str(data), "--model", "test_resnet", "--val-split", "val", "--device", "cpu", *map(str, flags)])


# ----------------------------------------------------------------------------- the profile


def test_long_tail_counts_are_cao_et_al_profile():
    # Cao et al. 2019's CIFAR-10-LT at ratio 100 (their get_img_num_per_cls): 12,406 images
    assert long_tail_counts(5000, 100, 10) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for n_max, ratio, classes in ((500, 100.0, 100), (60, 10.0, 10), (7, 3.5, 4), (12, 1.0, 3)):
        expected = [int(n_max * (1 / ratio) ** (c / (classes - 1))) for c in range(classes)]
        counts = long_tail_counts(n_max, ratio, classes)
        assert counts == expected and counts[0] == n_max
        assert all(a >= b for a, b in zip(counts, counts[1:]))  # non-increasing in the class index
    assert long_tail_counts(12, 1, 3) == [12, 12, 12]
    for bad in ((10, 0.5, 3), (10, float("nan"), 3), (0, 10, 3), (10, 10, 1)):
        with pytest.raises(ValueError):
            long_tail_counts(*bad)


def test_default_long_tail_max_keeps_the_profile():
    assert default_long_tail_max([5000] * 10, 100) == 5000  # Cao et al.'s CIFAR-10: img_max
    mnist_train = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    for ratio in (1, 10, 100, 256.5):
        n_max = default_long_tail_max(mnist_train, ratio)
        assert all(q <= a for q, a in zip(long_tail_counts(n_max, ratio, 10), mnist_train))
        assert any(q > a for q, a in zip(long_tail_counts(n_max + 1, ratio, 10), mnist_train))  # the largest such
    assert default_long_tail_max(mnist_train, 100) == 5923  # the zeros (class 0) are the fewest
    assert default_long_tail_max([10, 30, 8], 4) == 10 and default_long_tail_max([20, 30, 4], 4) == 16


def test_long_tail_indices_seeded_per_class():
    labels = np.repeat(np.arange(4), [30, 20, 10, 5])
    quotas = [12, 6, 10, 8]  # class 3 has only 5: all of them
    first = long_tail_indices(labels, quotas, seed=0)
    assert np.array_equal(first, np.sort(first)) and len(set(first.tolist())) == len(first)
    assert np.bincount(labels[first], minlength=4).tolist() == [12, 6, 10, 5]
    assert np.array_equal(first, long_tail_indices(labels, quotas, seed=0))
    other = long_tail_indices(labels, quotas, seed=1)
    assert np.bincount(labels[other], minlength=4).tolist() == [12, 6, 10, 5]
    assert not np.array_equal(first, other)
    # a class's choice does not depend on the other classes' quotas
    changed = long_tail_indices(labels, [3, 6, 10, 8], seed=0)
    assert np.array_equal(changed[labels[changed] == 1], first[labels[first] == 1])


def test_describe_profile():
    line = describe_profile([5000, 2997, 50], ["cat", "dog", "emu"])
    assert line == ("3 classes, 8047 images; largest class 'cat' 5000 images, smallest 'emu' 50; "
                    "imbalance ratio 100")


# ----------------------------------------------------------------------------- labels without images


def test_dataset_labels_of_timm_torchvision_and_subsets(tiny_source, torchvision_mnist, monkeypatch):
    from torchvision.datasets import ImageFolder

    def no_images(*args, **kwargs):
        raise AssertionError("an image was opened")

    folder = create_dataset("", root=str(tiny_source), split="train")
    mnist = create_dataset("torch/mnist", root=str(torchvision_mnist), split="train")
    monkeypatch.setattr(Image, "open", no_images)  # labels come from the indexes, no image is decoded
    expected = np.repeat(np.arange(3), 12)
    assert dataset_labels(folder).tolist() == expected.tolist()
    checked = CheckedImageDataset.wrap(folder, strict=False, what="train")
    assert dataset_labels(checked).dtype == np.int64 and dataset_labels(checked).tolist() == expected.tolist()
    assert dataset_labels(ImageFolder(str(tiny_source / "train"))).tolist() == expected.tolist()
    assert dataset_labels(torch.utils.data.Subset(checked, [35, 0, 13])).tolist() == [2, 0, 1]
    assert class_counts(folder, 4) == [12, 12, 12, 0]
    assert dataset_labels(mnist).tolist() == mnist.targets.tolist()
    assert class_counts(mnist, 10) == np.bincount(mnist.targets.numpy(), minlength=10).tolist()
    with pytest.raises(ValueError, match="sample 24 has label 2, outside the 2 classes"):
        class_counts(folder, 2)
    with pytest.raises(TypeError, match="no reader, targets or labels"):
        dataset_labels([(None, 0)])


def test_subsets_keep_their_kind_and_classes(tiny_source, torchvision_mnist):
    folder = create_dataset("", root=str(tiny_source), split="train")
    subset, quotas, kept, clipped = long_tail_subset(folder, 4.0, 3, seed=0)
    assert quotas == kept == [12, 6, 3] and clipped == []
    assert type(subset) is ImageDataset and subset.reader is not folder.reader and len(folder) == 36
    assert class_counts(subset, 3) == [12, 6, 3] and len(subset) == 21
    assert subset.reader.class_to_idx == folder.reader.class_to_idx
    assert set(subset.filenames()) < set(folder.filenames())
    assert subset[20][1] == 2 and subset[20][0].size == (28, 28)

    mnist = create_dataset("torch/mnist", root=str(torchvision_mnist), split="train")
    available = class_counts(mnist, 10)
    subset, quotas, kept, clipped = long_tail_subset(mnist, 10.0, 10, n_max=20, seed=3)
    assert isinstance(subset, LongTailSubset) and quotas == long_tail_counts(20, 10.0, 10) and clipped == []
    assert class_counts(subset, 10) == quotas == kept
    assert subset.classes == mnist.classes and subset.class_to_idx == mnist.class_to_idx
    subset.transform = np.asarray  # timm's create_loader sets the dataset's transform
    assert mnist.transform is np.asarray and subset[0][0].shape == (28, 28)
    mnist.transform = None
    # by default n_max is the largest that no class falls short of
    subset, quotas, kept, clipped = long_tail_subset(mnist, 2.0, 10, seed=0)
    assert quotas == kept == class_counts(subset, 10) and clipped == []
    assert quotas == long_tail_counts(default_long_tail_max(available, 2.0), 2.0, 10)
    # clipped: n_max the largest class's count, class 0 has fewer: all of class 0 is kept
    subset, quotas, kept, clipped = long_tail_subset(mnist, 2.0, 10, n_max=max(available), seed=0)
    assert quotas[0] == max(available) and kept[0] == available[0] < quotas[0]
    assert clipped[0] == (0, quotas[0], available[0]) and class_counts(subset, 10) == kept
    with pytest.raises(ValueError, match=r"--long-tail-max 999 is larger than the largest class of the training "
                                         r"split \('1 - one', 39 images\)"):
        long_tail_subset(mnist, 2.0, 10, n_max=999, classes=mnist.classes)


# ----------------------------------------------------------------------------- --long-tail-ratio in timm-el-train


def test_long_tail_flags_only_change_the_training_split(tiny_source):
    base_train, base_val, classes = el_train._create_datasets(_args(tiny_source), 1)
    train, val, same_classes = el_train._create_datasets(_args(tiny_source, "--long-tail-ratio", "4"), 1)
    assert same_classes == classes == ["0", "1", "2"]
    assert isinstance(train, CheckedImageDataset) and isinstance(val, CheckedImageDataset)
    assert class_counts(train, 3) == [12, 6, 3] and len(train.skips) == 21
    assert val.filenames() == base_val.filenames() and len(base_train) == 36
    # the subset depends on --long-tail-seed, not on the training --seed
    names = train.filenames()
    assert el_train._create_datasets(_args(tiny_source, "--long-tail-ratio", "4", "--seed", "7"), 1)[0] \
        .filenames() == names
    other = el_train._create_datasets(_args(tiny_source, "--long-tail-ratio", "4", "--long-tail-seed", "5"), 1)[0]
    assert class_counts(other, 3) == [12, 6, 3] and other.filenames() != names
    capped = el_train._create_datasets(_args(tiny_source, "--long-tail-ratio", "3", "--long-tail-max", "9"), 1)[0]
    assert class_counts(capped, 3) == [9, 5, 3]


@pytest.mark.parametrize("flags, message", [
    (["--long-tail-ratio", "0.5"], "--long-tail-ratio must be a number >= 1 (n_max / n_min), got 0.5"),
    (["--long-tail-ratio", "inf"], "--long-tail-ratio must be a number >= 1 (n_max / n_min), got inf"),
    (["--long-tail-ratio", "10", "--long-tail-max", "0"], "--long-tail-max must be an integer >= 1, got 0"),
    (["--long-tail-ratio", "10", "--long-tail-seed", "-1"], "--long-tail-seed must be an integer >= 0, got -1"),
    (["--long-tail-max", "5"], "--long-tail-max applies with --long-tail-ratio only, got --long-tail-max 5"),
    (["--long-tail-seed", "1"], "--long-tail-seed applies with --long-tail-ratio only, got --long-tail-seed 1"),
    (["--dataset", "inat2018", "--class-map", "map.txt"], "--class-map cannot be used with --dataset inat2018"),
])
def test_flag_errors(tiny_source, flags, message):
    with pytest.raises(UsageError) as err:
        _args(tiny_source, *flags)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--long-tail-ratio", "2", "--long-tail-max", "13"],
     "--long-tail-max 13 is larger than the largest class of the training split ('0', 12 images)"),
    (["--long-tail-ratio", "13"], "--long-tail-ratio 13 leaves the last class '2' no image (n_max 12 / 13 < 1): "
                                  "the ratio can be at most n_max"),
])
def test_profile_errors(tiny_source, flags, message):
    with pytest.raises(UsageError) as err:
        el_train._create_datasets(_args(tiny_source, *flags), 1)
    assert str(err.value) == message


def test_resume_keeps_the_subset(tiny_source, tmp_path):
    import argparse

    checkpoint = tmp_path / "last.pth.tar"
    saved = argparse.Namespace(model="test_resnet", loss="ce", long_tail_ratio=4.0, long_tail_max=None,
                               long_tail_seed=0)
    torch.save({"state_dict": {}, "epoch": 1, "args": saved}, checkpoint)
    assert _args(tiny_source, "--resume", checkpoint, "--long-tail-ratio", "4").long_tail_seed == 0
    for flags, message in ((["--long-tail-ratio", "5"],
                            "was trained with --long-tail-ratio 4.0, not --long-tail-ratio 5.0"),
                           ([], "was trained with --long-tail-ratio 4.0, not without --long-tail-ratio"),
                           (["--long-tail-ratio", "4", "--long-tail-seed", "1"],
                            "was trained with --long-tail-seed 0, not --long-tail-seed 1")):
        with pytest.raises(UsageError) as err:
            _args(tiny_source, "--resume", checkpoint, *flags)
        assert str(err.value) == f"--resume {str(checkpoint)!r} {message}"


# ----------------------------------------------------------------------------- iNaturalist 2018, ImageNet-LT


def test_inat2018_loader(inat_source):
    train = inat2018_dataset(str(inat_source), "train", img_mode="L")
    val = inat2018_dataset(str(inat_source), "validation", img_mode="L", train=train)
    assert type(train) is ImageDataset and train.reader.class_to_idx == {"0": 0, "1": 1, "2": 2}
    assert dataset_labels(train).tolist() == [2] * 2 + [0] * 8 + [1] * 4  # the order of "images"
    assert class_counts(train, 3) == [8, 4, 2] and class_counts(val, 3) == [2, 2, 2]
    assert train.filename(0) == "train_val2018/Plantae/2/train_00.jpg"
    image, target = train[0]
    assert target == 2 and image.mode == "L" and image.size == (8, 8)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(inat_source / train.filename(0)).convert("L")))


def test_imagenet_lt_loader(imagenet_lt_source):
    train = imagenet_lt_dataset(str(imagenet_lt_source), "train")
    test = imagenet_lt_dataset(str(imagenet_lt_source), "test", train=train)
    assert type(train) is ImageDataset and train.reader.class_to_idx == {"0": 0, "1": 1, "2": 2}
    assert class_counts(train, 3) == [8, 4, 2] and dataset_labels(test).tolist() == [0, 1, 2]
    assert train.filename(9) == "train/n01443537/n01443537_1.JPEG"
    image, target = train[9]
    assert target == 1 and image.mode == "RGB" and image.size == (8, 8)


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "data"))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "val2018.json").unlink(), "annotation file not found: {root}/val2018.json"),
    (lambda root: (root / "train2018.json").write_text('{"images": [1, '),
     "train2018.json: not valid JSON (Expecting value at line 1 column 16)"),
    (lambda root: (root / "train2018.json").write_text('[]'),
     "train2018.json: holds a JSON list, not an object with images and annotations"),
    (lambda root: (root / "train2018.json").write_text('{"images": []}'),
     'train2018.json: no "annotations" list (not an iNaturalist 2018 / COCO-style annotation file)'),
    (lambda root: (root / "train_val2018/Plantae/0/train_03.jpg").unlink(),
     "1 image(s) listed in train2018.json not found, e.g. "
     "{root}/train_val2018/Plantae/0/train_03.jpg"),
])
def test_inat2018_errors(inat_source, tmp_path, damage, message):
    root = _copy(inat_source, tmp_path)
    damage(root)
    with pytest.raises(ValueError) as err:
        for split in ("train", "val"):
            inat2018_dataset(str(root), split)
    assert str(err.value) == message.format(root=root)


def test_inat2018_annotation_errors(inat_source, tmp_path):
    root = _copy(inat_source, tmp_path)
    data = json.loads((root / "train2018.json").read_text())
    data["annotations"].pop(3)
    (root / "train2018.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"train2018.json: 1 image\(s\) without an annotation, e.g. id 103 "
                                         r"\(train_val2018/Plantae/0/train_01.jpg\)$"):
        inat2018_dataset(str(root), "train")
    with pytest.raises(ValueError, match=r"no split 'test' in --dataset inat2018 \(splits: train, val; "):
        inat2018_dataset(str(root), "test")
    data = json.loads((inat_source / "val2018.json").read_text())
    data["annotations"][0]["category_id"] = 7
    (root / "val2018.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="val2018.json: image train_val2018/Plantae/2/val_00.jpg has category 7, "
                                         "not among \"categories\""):
        inat2018_dataset(str(root), "val")


def test_imagenet_lt_errors(imagenet_lt_source, tmp_path):
    root = _copy(imagenet_lt_source, tmp_path)
    lines = (root / "ImageNet_LT_train.txt").read_text().splitlines()
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines[:4] + ["train/x.JPEG"] + lines[4:]) + "\n")
    with pytest.raises(ValueError) as err:
        imagenet_lt_dataset(str(root), "train")
    assert str(err.value) == ("ImageNet_LT_train.txt line 5: expected \"<relative path> <class index>\", got "
                              "'train/x.JPEG'")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    train = imagenet_lt_dataset(str(root), "train")
    (root / "ImageNet_LT_val.txt").write_text("val/a.JPEG 3\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_val.txt line 1: class 3 is not among the training split's 3 "):
        imagenet_lt_dataset(str(root), "val", train=train)
    (root / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(ValueError, match="annotation file not found: .*ImageNet_LT_test.txt"):
        imagenet_lt_dataset(str(root), "test", train=train)
    (root / lines[2].split()[0]).unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) listed in ImageNet_LT_train.txt not found, e.g. .*_2.JPEG"):
        imagenet_lt_dataset(str(root), "train")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("layout", ["inat2018", "imagenet_lt", "long_tail_ratio"])
def test_train_one_epoch(layout, inat_source, imagenet_lt_source, tiny_source, tmp_path):
    data, flags = {"inat2018": (inat_source, ["--dataset", "inat2018", "-b", "4"]),
                   "imagenet_lt": (imagenet_lt_source, ["--dataset", "imagenet_lt", "-b", "4"]),
                   "long_tail_ratio": (tiny_source, ["--long-tail-ratio", "4"])}[layout]
    proc = run_cli(data, *TINY, *flags, "--epochs", "1", "--output", tmp_path, "--experiment", "run", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    if layout == "long_tail_ratio":
        assert ("Long-tailed training split 'train' (--long-tail-ratio 4, n_max 12, --long-tail-seed 0; 36 images "
                "before): 3 classes, 21 images; largest class '0' 12 images, smallest '2' 3; imbalance ratio 4.") in log
    else:
        assert ("Training split 'train': 3 classes, 14 images; largest class '0' 8 images, smallest '2' 2; "
                "imbalance ratio 4.") in log
    _, rows = read_summary(tmp_path / "run")
    assert len(rows) == 1 and 0 <= float(rows[0]["eval_top1"]) <= 100


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("flags, damage, message", [
    (["--dataset", "imagenet_lt"], "ImageNet_LT_val.txt",
     "--dataset imagenet_lt in {root!r}, split 'val': annotation file not found: {root}/ImageNet_LT_val.txt"),
    (["--dataset", "imagenet_lt", "--val-split", "valid"], None,
     "--dataset imagenet_lt in {root!r}, split 'valid': no split 'valid' in --dataset imagenet_lt (splits: train, "
     "val, test; validation = val)"),
    (["--dataset", "imagenet_lt", "--long-tail-ratio", "9"], None,
     "--long-tail-ratio 9 leaves the last class '2' no image (n_max 8 / 9 < 1): the ratio can be at most n_max"),
])
def test_train_error_lines(imagenet_lt_source, tmp_path, capsys, flags, damage, message):
    root = _copy(imagenet_lt_source, tmp_path)
    if damage:
        (root / damage).unlink()
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(root), *TINY, *flags, "--epochs", "1", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "timm-el-train: error: " + message.format(root=str(root))
    assert not (tmp_path / "out").exists()


def test_large_index_is_announced(inat_source, monkeypatch, caplog):
    import logging

    from timm_el import longtail

    monkeypatch.setattr(longtail, "_LARGE", 10)
    with caplog.at_level(logging.INFO, logger="timm_el.longtail"):
        inat2018_dataset(str(inat_source), "train")
    assert "train2018.json: checking that its 14 images exist ..." in caplog.text
    assert "train2018.json: all 14 images found, in 3 folders" in caplog.text
