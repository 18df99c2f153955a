"""timm_el.rebalance and its hooks in ``timm-el-train``: DRW (Cao et al. 2019), cRT (Kang et al. 2020) and the
many / medium / few-shot accuracies, on small ImageFolders of real MNIST digits (CPU, timm's ``test_resnet``).

The runs train in this process (``el_train.main``) with spies on ``train_one_epoch`` and ``validate``: the loss
weights each epoch trains with, the labels of the batches it trains on, which modules are in training mode,
and what validation reports, next to numbers computed here from the class counts.
"""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encouraging_loss.tools.results import read_record
from timm_el import checkpoints as el_checkpoints
from timm_el import longtail
from timm_el import train as el_train
from timm_el.rebalance import (
    ClassBalancedSampler,
    DeferredReweighting,
    class_balanced_weights,
    prepare_crt_model,
    with_sampler,
)
from timm_el.train_args import UsageError

from timm_cli import read_summary

SKEW = [40, 12, 6, 2]  # training images per class of the skewed folder (60: 5 batches of 12)
FLAGS = ["--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "12", "--lr", "0.05",
         "--warmup-epochs", "0", "--no-aug", "-j", "0", "--log-interval", "5", "--seed", "1", "--val-split", "val",
         "--sched", "step", "--decay-epochs", "100"]


# ----------------------------------------------------------------------------- data and runs


@pytest.fixture(scope="module")
def balanced(mnist_folder_of) -> Path:
    """Digits 0-3: ``train/`` 40 of each, ``val/`` the next 4 of each."""
    return mnist_folder_of(40, 4, classes=4, val_from="train")


@pytest.fixture(scope="module")
def skewed(balanced, tmp_path_factory) -> Path:
    """The balanced folder with the first SKEW[c] training images of digit c (val/ as it is)."""
    root = tmp_path_factory.mktemp("skewed")
    shutil.copytree(balanced / "val", root / "val")
    for c, n in enumerate(SKEW):
        (root / "train" / str(c)).mkdir(parents=True)
        for path in sorted((balanced / "train" / str(c)).iterdir())[:n]:
            shutil.copy(path, root / "train" / str(c) / path.name)
    return root


class Spy:
    """Records, per epoch, the training loss's ``weight``, the batches' labels, the modules in training mode
    (observed while the first batch is drawn) and the parameters that need gradients; and each validation's
    shot-group arguments, metrics, and the per-class accuracy computed here from the model's predictions."""

    def __init__(self, monkeypatch):
        self.weights, self.labels, self.training, self.grads, self.evals = {}, {}, {}, {}, []
        train_one_epoch, validate = el_train.train_one_epoch, el_train.validate

        def spy_train(epoch, model, loader, optimizer, loss_fn, args, device, **kw):
            weight = getattr(loss_fn, "weight", None)
            self.weights[epoch] = None if weight is None else weight.clone()
            self.labels[epoch] = seen = []
            self.grads[epoch] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            spy = self

            class Recording:
                sampler = getattr(loader, "sampler", None)

                def __len__(self):
                    return len(loader)

                def __iter__(self):
                    for x, y in loader:
                        if epoch not in spy.training:
                            spy.training[epoch] = sorted(n for n, m in model.named_modules() if m.training)
                        seen.append(y.clone())
                        yield x, y

            return train_one_epoch(epoch, model, Recording(), optimizer, loss_fn, args, device, **kw)

        def spy_validate(model, loader, args, device, *a, **kw):
            metrics = validate(model, loader, args, device, *a, **kw)
            preds, targets = [], []
            with torch.no_grad():
                for x, y in loader:
                    preds.append(model(x).argmax(-1))
                    targets.append(y)
            self.evals.append((kw.get("train_counts"), kw.get("shot_thresholds"), metrics,
                               torch.cat(preds), torch.cat(targets)))
            return metrics

        monkeypatch.setattr(el_train, "train_one_epoch", spy_train)
        monkeypatch.setattr(el_train, "validate", spy_validate)


class Lines(logging.Handler):
    """The messages of the training log, the setup's too (log.txt starts with the run directory)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(*argv, log: Lines = None):
    """``el_train.main(argv)`` in this process (its log messages into ``log``), its console logging undone
    afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logger = logging.getLogger("timm_el.train")
    if log is not None:
        logger.addHandler(log)
    try:
        return el_train.main([str(a) for a in argv])
    finally:
        logger.removeHandler(log)
        root.handlers[:] = handlers
        root.setLevel(level)
        el_train._logging_ready = False


@pytest.fixture(scope="module")
def drw_run(skewed, tmp_path_factory):
    """CE with DRW from epoch 1 and the shot groups (thresholds 20 5: many {0}, medium {1, 2}, few {3}), two
    epochs, then resumed for a third: ``(run directory, spy of the first two epochs, spy of the resumed one)``."""
    out = tmp_path_factory.mktemp("drw")
    flags = [skewed, *FLAGS, "--loss", "ce", "--drw-epoch", "1", "--shot-groups", "--shot-thresholds", "20", "5",
             "--output", out, "--experiment", "drw"]
    log = Lines()
    with pytest.MonkeyPatch.context() as mp:
        first = Spy(mp)
        assert main(*flags, "--epochs", "2", log=log) == 0
    run = out / "drw"
    shutil.copytree(run, out / "drw-two-epochs")
    with pytest.MonkeyPatch.context() as mp:
        resumed = Spy(mp)
        assert main(*flags, "--epochs", "3", "--resume", run / "last.pth.tar", log=log) == 0
    first.log = resumed.log = "\n".join(log.lines)
    return run, first, resumed


# ----------------------------------------------------------------------------- DRW


def test_class_balanced_weights_formula():
    counts = [100, 10, 1, 0]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in counts[:3]]  # Cao et al.'s per_cls_weights
    expected = [w / sum(raw) * 4 for w in raw] + [0.0]
    weights = class_balanced_weights(counts, beta)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights.sum().item() == pytest.approx(4.0)
    assert class_balanced_weights([5, 50, 500], 0.0).tolist() == [1.0, 1.0, 1.0]
    near_one = class_balanced_weights([1, 2, 4], 1 - 1e-12)  # -> inverse frequency 4 : 2 : 1
    assert (near_one / near_one[2]).tolist() == pytest.approx([4, 2, 1], rel=1e-6)
    for bad in ({"counts": [3, 4], "beta": 1.0}, {"counts": [3, 4], "beta": -0.1}, {"counts": [0, 0]},
                {"counts": [3, -1]}):
        with pytest.raises(ValueError):
            class_balanced_weights(**bad)


def test_deferred_reweighting_sets_the_loss_weight():
    drw = DeferredReweighting(2, 0.99, [30, 3])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    logits, target = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 0, 1, 0])
    assert not drw.apply(loss_fn, 1) and loss_fn.weight is None
    assert drw.apply(loss_fn, 2) and torch.equal(loss_fn.weight, class_balanced_weights([30, 3], 0.99))
    assert not drw.apply(loss_fn, 3)  # stays on
    expected = F.cross_entropy(logits, target, weight=drw.weights, label_smoothing=0.1)
    assert loss_fn(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert drw.apply(loss_fn, 0) and loss_fn.weight is None  # an earlier epoch: off again


def test_drw_switches_at_its_epoch_and_after_resume(drw_run):
    run, first, resumed = drw_run
    w = class_balanced_weights(SKEW, 0.9999)
    assert first.weights[0] is None
    assert torch.equal(first.weights[1], w)
    assert list(resumed.weights) == [2] and torch.equal(resumed.weights[2], w)  # on again after --resume
    log = first.log
    assert "Training loss (--loss ce): CrossEntropyLoss()" in log
    assert "DRW: class-balanced loss weights (effective number, beta 0.9999) from epoch 1 on: 4 classes" in log
    assert log.count("Epoch 1: DRW class-balanced loss weights on (beta 0.9999, from epoch 1).") == 1
    assert log.count("Epoch 2: DRW class-balanced loss weights on") == 1
    assert "Epoch 0: DRW" not in log
    args = el_train.yaml.safe_load((run / "args.yaml").read_text())
    assert (args["drw_epoch"], args["drw_beta"], args["crt_from"]) == (1, 0.9999, "")
    record = json.loads((run / "eval" / "last.json").read_text())
    assert record["info"]["drw"] == {"epoch": 1, "beta": 0.9999} and "crt" not in record["info"]


@pytest.mark.parametrize("loss", ["ce", "encouraging", "focal", "halted_focal", "mse"])
@pytest.mark.parametrize("mixup", [False, True])
def test_every_loss_takes_the_drw_weights(tmp_path, loss, mixup):
    args = el_train.parse_args([str(tmp_path), *FLAGS, "--loss", loss, "--drw-epoch", "0", "--smoothing", "0",
                                *(["--mixup", "0.2"] if mixup else [])])
    loss_fn = el_train.create_train_loss(args, mixup_active=mixup)
    assert loss_fn.weight is None
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=g)
    target = torch.softmax(torch.randn(8, 4, generator=g), -1) if mixup else torch.tensor([0, 1, 2, 3, 0, 0, 1, 0])
    before = loss_fn(logits, target).item()
    drw = DeferredReweighting(0, 0.999, SKEW)
    assert drw.apply(loss_fn, 0)
    after = loss_fn(logits, target).item()
    assert after != pytest.approx(before)
    if loss == "ce":
        assert type(loss_fn) is torch.nn.CrossEntropyLoss
        assert after == pytest.approx(F.cross_entropy(logits, target, weight=drw.weights).item(), rel=1e-6)


# ----------------------------------------------------------------------------- shot groups


def _by_hand(pred, target, counts, many, few):
    """Kang et al.'s shot accuracies written out: the mean of the per-class accuracies in each group."""
    acc = {c: (pred[target == c] == c).float().mean().item() * 100 for c in target.unique().tolist()}
    groups = {"many": [c for c in acc if counts[c] > many], "few": [c for c in acc if counts[c] < few]}
    groups["medium"] = [c for c in acc if c not in groups["many"] + groups["few"]]
    return {g: sum(acc[c] for c in cs) / len(cs) if cs else None for g, cs in groups.items()}


def test_shot_groups_in_validation_summary_and_records(drw_run):
    run, first, resumed = drw_run
    evals = first.evals + resumed.evals
    assert len(evals) == 3
    for counts, thresholds, metrics, pred, target in evals:
        assert list(counts) == SKEW and list(thresholds) == [20, 5]  # the training counts of the folder
        expected = _by_hand(pred, target, SKEW, 20, 5)
        for group in ("many", "medium", "few"):
            assert metrics[group] == pytest.approx(expected[group], abs=1e-9), group
        assert metrics["top1"] == pytest.approx((pred == target).float().mean().item() * 100, abs=1e-4)
    columns, rows = read_summary(run)
    assert columns[:8] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "eval_many",
                           "eval_medium", "eval_few"]
    for row, (_, _, metrics, _, _) in zip(rows, evals):
        assert [float(row[f"eval_{g}"]) for g in ("many", "medium", "few")] == \
            pytest.approx([metrics[g] for g in ("many", "medium", "few")])
    for name in ("last", "best"):
        record = read_record(run / "eval" / f"{name}.json")
        row = rows[record.info["epoch"]]
        assert record.metrics == pytest.approx({k: float(row[f"eval_{k}"])
                                                for k in ("top1", "top5", "many", "medium", "few")})
        assert record.info["shot_groups"] == {"many_above": 20, "few_below": 5, "many_classes": 1,
                                              "medium_classes": 2, "few_classes": 1}
    log = first.log
    assert "Shot groups by the training images per class (many > 20, few < 5): 1 many, 2 medium, 1 few" in log
    last = evals[-1][2]
    assert (f"top-5 {last['top5']:.3f}, many {last['many']:.3f} medium {last['medium']:.3f} "
            f"few {last['few']:.3f}") in log


def test_shot_groups_stay_off_on_balanced_data_without_the_flag(drw_run):
    # the DRW run's own flags turn them on; a plain run's summary has no such columns (test_train checks those)
    args = el_train.parse_args([str(drw_run[0]), *FLAGS])
    assert not args.shot_groups and args.shot_thresholds == [100, 20] and not el_train._long_tailed(args)
    assert el_train._long_tailed(el_train.parse_args([str(drw_run[0]), *FLAGS, "--long-tail-ratio", "10"]))


# ----------------------------------------------------------------------------- cRT


def test_class_balanced_sampler_draws_classes_uniformly():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 4 + [3] * 1)
    sampler = ClassBalancedSampler(labels, seed=3)
    assert len(sampler) == 100
    sampler.set_epoch(0)
    draws = np.array(list(sampler))
    assert np.bincount(labels[draws]).tolist() == [25, 25, 25, 25]
    assert np.bincount(draws[labels[draws] == 2], minlength=99)[95:99].tolist() in ([6, 6, 6, 7], [6, 6, 7, 6],
                                                                                   [6, 7, 6, 6], [7, 6, 6, 6])
    assert (draws[labels[draws] == 3] == 99).all()
    assert len(set(draws[labels[draws] == 0])) == 25  # 25 different images of the large class
    # a function of (seed, epoch) alone: what a resumed run draws
    again = ClassBalancedSampler(labels, seed=3)
    again.set_epoch(5)
    list(again)
    again.set_epoch(0)
    assert list(again) == draws.tolist()
    sampler.set_epoch(1)
    assert list(sampler) != draws.tolist()
    assert list(ClassBalancedSampler(labels, seed=4)) != draws.tolist()
    # two processes take every other draw of the same sequence
    ranks = [ClassBalancedSampler(labels, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [50, 50]
    merged = np.empty(100, dtype=np.int64)
    merged[0::2], merged[1::2] = list(ranks[0]), list(ranks[1])
    assert merged.tolist() == draws.tolist()


def test_with_sampler_keeps_timms_loader(skewed):
    from timm.data import create_dataset, create_loader
    dataset = create_dataset("", root=str(skewed), split="train", is_training=True, input_img_mode="L")
    labels = longtail.dataset_labels(dataset)
    for prefetcher in (True, False):
        loader = create_loader(dataset, input_size=(1, 28, 28), batch_size=12, is_training=True, no_aug=True,
                               mean=(0.5,), std=(0.5,), num_workers=0, use_prefetcher=prefetcher,
                               device=torch.device("cpu"), persistent_workers=False)
        sampler = ClassBalancedSampler(labels, seed=0)
        balanced = with_sampler(loader, sampler)
        assert balanced.sampler is sampler and len(balanced) == 5
        if prefetcher:
            assert balanced is loader  # the PrefetchLoader (normalisation on the device) is kept
        seen = torch.cat([y for _, y in balanced])
        assert torch.bincount(seen).tolist() == [15, 15, 15, 15]
        assert seen.tolist() == labels[list(sampler)].tolist()


def test_prepare_crt_model_freezes_all_but_the_classifier():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=4, drop_rate=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = prepare_crt_model(model)
    assert trainable == ["fc.weight", "fc.bias"]
    assert not torch.equal(model.fc.weight, before["fc.weight"])  # re-initialised
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    model.train()
    assert [n for n, m in model.named_modules() if m.training] == ["fc"]
    x = torch.randn(8, 1, 28, 28)
    out1, out2 = model(x), model(x)
    assert torch.equal(out1, out2)  # no dropout, BatchNorm on its running statistics
    out1.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["fc.weight", "fc.bias"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))


@pytest.fixture(scope="module")
def crt_run(drw_run, balanced, tmp_path_factory):
    """cRT from the DRW run (its last checkpoint) on the balanced folder made long-tailed with
    ``--long-tail-ratio 20`` (its own training data: 40, 14, 5, 2 images; thresholds 30 10: many {0}, medium
    {1}, few {2, 3}): two epochs, then resumed for a third."""
    source = drw_run[0]
    out = tmp_path_factory.mktemp("crt")
    flags = [balanced, *FLAGS, "--long-tail-ratio", "20", "--crt-from", source, "--loss", "encouraging",
             "--lr", "0.5", "--shot-thresholds", "30", "10", "--output", out]
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    log = Lines()
    with pytest.MonkeyPatch.context() as mp:
        first = Spy(mp)
        assert main(*flags, "--epochs", "2", log=log) == 0
    run = out / f"{source.name}-crt"
    with pytest.MonkeyPatch.context() as mp:
        resumed = Spy(mp)
        assert main(*flags, "--epochs", "3", "--resume", run / "last.pth.tar", log=log) == 0
    first.log = resumed.log = "\n".join(log.lines)
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before  # the source run untouched
    return source, run, first, resumed


def test_crt_freezes_features_and_retrains_the_classifier(crt_run):
    source, run, first, resumed = crt_run
    src = el_checkpoints._load_checkpoint_meta(source / "last.pth.tar")["state_dict"]
    for name in ("checkpoint-0", "last"):  # after one epoch, after the resumed third
        trained = el_checkpoints._load_checkpoint_meta(run / f"{name}.pth.tar")["state_dict"]
        assert set(trained) == set(src)
        frozen = [k for k in src if not k.startswith("fc.")]
        assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
        for key in frozen:  # weights and BatchNorm buffers bit-identical to the source
            assert torch.equal(trained[key], src[key]), key
        assert not torch.equal(trained["fc.weight"], src["fc.weight"])
        assert not torch.equal(trained["fc.bias"], src["fc.bias"])
    for spy in (first, resumed):
        for epoch in spy.training:
            assert spy.training[epoch] == ["fc"]  # everything else in eval mode while training
            assert spy.grads[epoch] == ["fc.bias", "fc.weight"]
    log = first.log
    assert f"cRT from {source / 'last.pth.tar'}: classifier fc.weight, fc.bias re-initialised" in log
    args = el_train.yaml.safe_load((run / "args.yaml").read_text())
    assert args["crt_from"] == str(source / "last.pth.tar")
    record = json.loads((run / "eval" / "last.json").read_text())
    assert record["info"]["crt"] == {"from": str(source / "last.pth.tar")} and record["loss"] == "el"
    assert set(record["metrics"]) == {"top1", "top5", "many", "medium", "few"}


def test_crt_samples_class_balanced_batches(crt_run):
    _, run, first, resumed = crt_run
    counts = longtail.long_tail_counts(40, 20, 4)  # the training data after --long-tail-ratio 20
    assert counts == [40, 14, 5, 2]
    seen = {**first.labels, **resumed.labels}
    assert sorted(seen) == [0, 1, 2]
    for epoch, batches in seen.items():
        labels = torch.cat(batches)
        assert len(labels) == 60  # 5 batches of 12 from the 61 draws (the last one dropped with the tail)
        per_class = torch.bincount(labels, minlength=4).tolist()
        assert max(per_class) - min(per_class) <= 1, (epoch, per_class)
    assert not torch.equal(torch.cat(seen[0]), torch.cat(seen[1]))  # a new order every epoch
    for counts_seen, _, metrics, _, _ in first.evals + resumed.evals:  # the shot groups of its own training data
        assert list(counts_seen) == counts and "few" in metrics


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--drw-beta", "0.9"], "--drw-beta applies with --drw-epoch only (deferred re-weighting), got --drw-beta 0.9"),
    (["--drw-epoch", "-1"], "--drw-epoch must be an integer >= 0, got -1"),
    (["--drw-epoch", "5", "--epochs", "5"], "--drw-epoch 5 is not before --epochs 5: the re-weighting would never "
                                            "start"),
    (["--drw-epoch", "1", "--drw-beta", "1"], "--drw-beta must be in [0, 1), got 1.0"),
    (["--shot-thresholds", "10", "20"], "--shot-thresholds must be two integers MANY FEW with 0 <= FEW <= MANY, "
                                        "got [10, 20]"),
    (["--crt-from", "nowhere"], "--crt-from: no such run directory or checkpoint: 'nowhere'"),
    (["--crt-from", "."], "--crt-from '.': no last.pth.tar in this run directory"),
])
def test_flag_errors(tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        el_train.parse_args([str(tmp_path), *FLAGS, *flags])
    assert str(err.value).startswith(message)


def test_crt_flag_errors(drw_run, balanced, tmp_path, capsys):
    source = drw_run[0]
    base = [str(balanced), *FLAGS, "--crt-from", str(source)]
    for extra, message in (
            (["--drw-epoch", "1"], "--crt-from cannot be used with --drw-epoch: cRT balances the classes by "
                                   "sampling"),
            (["--adv-train", "fgsm"], "--crt-from cannot be used with --adv-train"),
            (["--pretrained"], "--crt-from cannot be used with --pretrained"),
            (["--model", "resnet10t"], f"--crt-from {str(source)!r} was trained with --model test_resnet, not "
                                       f"--model resnet10t")):
        with pytest.raises(UsageError) as err:
            el_train.parse_args(base + extra)
        assert str(err.value).startswith(message), err.value
    # another number of classes: found when the model is built, one line, exit status 2, nothing written
    three = tmp_path / "three"
    for split in ("train", "val"):
        for c in range(3):
            shutil.copytree(balanced / split / str(c), three / split / str(c))
    with pytest.raises(SystemExit) as exit_info:
        main(three, *FLAGS, "--crt-from", source, "--output", tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"timm-el-train: error: --crt-from {str(source / 'last.pth.tar')!r}: its classifier fc.weight has "
                   f"shape (4, 96), this run's (3, 96) (3 classes: the data or --num-classes)")
    assert not (tmp_path / "out").exists()
    # a resumed run keeps its DRW epoch
    copy = drw_run[0].parent / "drw-two-epochs"
    with pytest.raises(UsageError) as err:
        el_train.parse_args([str(balanced), *FLAGS, "--drw-epoch", "0", "--resume", str(copy / "last.pth.tar")])
    assert str(err.value) == (f"--resume {str(copy / 'last.pth.tar')!r} was trained with --drw-epoch 1, not "
                              f"--drw-epoch 0")
