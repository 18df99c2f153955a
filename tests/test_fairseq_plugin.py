"""The fairseq plugin's pieces, in-process: batching fix, flags, schedule."""
import subprocess
import sys

import numpy as np
import pytest

fairseq = pytest.importorskip("fairseq")


def test_batch_by_size_keeps_every_example():
    from fairseq.data import data_utils

    import fairseq_el  # noqa: F401  (installs the wrapper)
    from fairseq_el.compat import keep_every_example

    assert getattr(data_utils.batch_by_size, "_el_keeps_every_example", False)
    original = data_utils.batch_by_size.__wrapped__
    sizes = np.random.RandomState(0).randint(5, 40, size=100)
    indices = np.argsort(sizes, kind="mergesort").astype(np.int64)
    kwargs = dict(num_tokens_fn=lambda i: int(sizes[i]), max_tokens=300, required_batch_size_multiple=8)
    dropped = original(indices, **kwargs)
    kept = data_utils.batch_by_size(indices, **kwargs)
    n_dropped = sum(map(len, dropped))
    assert n_dropped < 100, "fairseq-fixed no longer drops the last batch: the fix may be removable"
    assert sorted(np.concatenate(kept).tolist()) == list(range(100))
    assert len(kept) == len(dropped) + 1
    assert [b.tolist() for b in kept[:-1]] == [b.tolist() for b in dropped]
    assert keep_every_example(data_utils.batch_by_size) is data_utils.batch_by_size  # idempotent


def _criterion(**overrides):
    from argparse import Namespace

    import fairseq_el  # noqa: F401
    from fairseq.tasks.translation import TranslationConfig, TranslationTask
    from fairseq.data import Dictionary

    from fairseq_el.criterion import EncouragingLabelSmoothedCrossEntropyCriterion

    d = Dictionary()
    task = TranslationTask(TranslationConfig(), d, d)
    args = dict(sentence_avg=False, label_smoothing=0.1)
    args.update(overrides)
    return EncouragingLabelSmoothedCrossEntropyCriterion(task, **args), task


def test_defaults_match_the_paper_translation_runs():
    from fairseq_el.criterion import EncouragingLabelSmoothedCrossEntropyConfig

    cfg = EncouragingLabelSmoothedCrossEntropyConfig()
    assert cfg.log_end == 0.5 and cfg.bonus == "log" and cfg.bonus_rho == 1.0 and cfg.bonus_smoothing is None


def test_defer_start_and_schedule_follow_the_epochs():
    crit, task = _criterion(defer_start=2, bonus_schedule="linear", max_epoch=10, bonus_rho=2.0)
    assert crit.current.rho == 0.0
    task.begin_epoch(2, None)
    assert crit.current.rho == 0.0
    task.begin_epoch(3, None)
    assert crit.current.rho == pytest.approx(2.0 * 3 / 10)
    task.begin_epoch(10, None)
    assert crit.current.rho == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(log_end=1.5), "--log-end must be in (0, 1], got 1.5"),
        (dict(log_end=0.0), "--log-end must be in (0, 1], got 0.0"),
        (dict(bonus_start=1.0), "--bonus-start must be in [0, 1), got 1.0"),
        (dict(bonus="nope"), "--bonus must be one of log, power, cosine, got 'nope'"),
        (dict(label_smoothing=1.0), "--label-smoothing must be in [0, 1), got 1.0"),
        (dict(bonus_smoothing=-0.1), "--bonus-smoothing must be in [0, 1), got -0.1"),
        (dict(bonus_schedule="cosine"), "--bonus-schedule cosine ramps the bonus over epochs and needs --max-epoch > 0"),
        (dict(defer_start=-1), "--defer-start must be >= 0, got -1"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as err:
        _criterion(**kwargs)
    assert message in str(err.value)


def test_user_dir_entry_point_prints_the_package_dir():
    out = subprocess.run([sys.executable, "-m", "fairseq_el", "--user-dir"], capture_output=True, text=True, check=True)
    import fairseq_el

    assert out.stdout.strip() == fairseq_el.user_dir()


def test_criterion_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "fairseq_el", "--criterion-help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--log-end", "--bonus ", "--bonus-start", "--bonus-rho", "--bonus-smoothing", "--defer-start",
                 "--bonus-schedule", "--label-smoothing"):
        assert flag in out
