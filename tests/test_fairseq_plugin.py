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
        (dict(defer_start=-1), "--defer-start must be an integer >= 0, got -1"),
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
    out = subprocess.run([sys.executable, "-m", "fairseq_el", "--criterion-help", "halted_focal_cross_entropy"],
                         capture_output=True, text=True, check=True).stdout
    assert "--criterion halted_focal_cross_entropy" in out and "--halt-point" in out and "--focal-gamma" in out
    assert "--log-end" not in out
    bad = subprocess.run([sys.executable, "-m", "fairseq_el", "--criterion-help", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'nope'" in bad.stderr


def test_user_dir_prints_at_once_without_importing_fairseq():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fairseq_el", "--user-dir"],
                          capture_output=True, text=True, check=True)
    import fairseq_el

    assert proc.stdout == fairseq_el.user_dir() + "\n"
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "fairseq_el" in imported
    assert not [m for m in imported if m == "fairseq" or m.startswith("fairseq.")], "fairseq was imported"
    assert not [m for m in imported if m == "torch"], "torch was imported"
    assert not [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


def test_plugin_package_registers_when_imported():
    """Imported the ordinary way (fairseq's --user-dir, a script), the package registers the criterion."""
    code = ("import fairseq_el; from fairseq.criterions import CRITERION_REGISTRY; "
            "print('encouraging_label_smoothed_cross_entropy' in CRITERION_REGISTRY, "
            "fairseq_el.EncouragingLabelSmoothedCrossEntropyCriterion.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "EncouragingLabelSmoothedCrossEntropyCriterion"]


BAD_FLAGS = [
    (["--bonus-schedule-rate", "nan"], "argument --bonus-schedule-rate: --bonus-schedule-rate must be a finite number > 0, got nan"),
    (["--bonus-schedule-rate=-1e9"],
     "argument --bonus-schedule-rate: --bonus-schedule-rate must be a finite number > 0, got -1000000000.0"),
    (["--defer-start", "-1"], "argument --defer-start: --defer-start must be an integer >= 0, got -1"),
    (["--bonus-schedule", "linear"],
     "--bonus-schedule linear ramps the bonus over epochs and needs --max-epoch > 0, got 0"),
    (["--bonus-schedule", "exp", "--max-epoch", "0"],
     "--bonus-schedule exp ramps the bonus over epochs and needs --max-epoch > 0, got 0"),
    (["--log-end", "nan"], "argument --log-end: --log-end must be in (0, 1], got nan"),
    (["--bonus-gamma", "inf"], "argument --bonus-gamma: --bonus-gamma must be a finite number > 0, got inf"),
    (["--bonus-rho=-0.5"], "argument --bonus-rho: --bonus-rho must be a finite number >= 0, got -0.5"),
    (["--label-smoothing", "1"], "argument --label-smoothing: --label-smoothing must be in [0, 1), got 1.0"),
]
ARGS = ["DATA", "--arch", "transformer_iwslt_de_en", "--criterion", "encouraging_label_smoothed_cross_entropy"]


def _parse(argv):
    import fairseq_el  # noqa: F401
    from fairseq import options

    return options.parse_args_and_arch(options.get_training_parser(), input_args=argv)


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_fairseq_parser_refuses_bad_flags_before_training(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(ARGS + flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {message}"), err[-1]


def test_fairseq_parser_accepts_good_combinations():
    args = _parse(ARGS + ["--bonus-schedule", "exp", "--max-epoch", "5", "--bonus-schedule-rate", "2",
                          "--defer-start", "1"])
    assert (args.bonus_schedule, args.max_epoch, args.bonus_schedule_rate, args.defer_start) == ("exp", 5, 2.0, 1)
    # other criteria are not checked by ours
    other = _parse(["DATA", "--arch", "transformer_iwslt_de_en", "--criterion", "label_smoothed_cross_entropy"])
    assert other.criterion == "label_smoothed_cross_entropy"


@pytest.mark.parametrize("flags", [["--bonus-schedule-rate", "nan"], ["--bonus-schedule", "cosine"]],
                         ids=["rate-nan", "schedule-without-max-epoch"])
def test_stock_fairseq_train_stops_with_one_line(flags, tmp_path):
    """The stock CLI, before it touches the data directory (which does not exist)."""
    from pathlib import Path

    import fairseq_el

    tool = Path(sys.executable).parent / "fairseq-train"
    proc = subprocess.run(
        [str(tool), str(tmp_path / "no-data"), "--user-dir", fairseq_el.user_dir(), *ARGS[1:], *flags,
         "--save-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fairseq-train: error: ")
    assert "--bonus-schedule" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ckpt").exists()
