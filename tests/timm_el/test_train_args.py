"""timm_el.train_args: ``timm-el-train``'s flags, ``--config`` files, ``--help`` and the checks that stop a
bad command with one line before anything trains.
"""

import re

import pytest
import torch

from timm_el import train as el_train

from timm_cli import FAST, run_cli


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("loss: encouraging\nlog_end: 0.5\nlr: 0.2\nepochs: 7\ndecay_milestones: [3, 5]\n")
    args = el_train.parse_args([str(tmp_path), "--config", str(config), "--lr", "0.1"])
    assert (args.loss, args.log_end, args.lr, args.epochs, args.decay_milestones) == \
        ("encouraging", 0.5, 0.1, 7, [3, 5])
    assert args.bonus == "log" and args.data_dir == str(tmp_path)


BAD_FLAGS = [
    (["--loss", "encouraging", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    (["--loss", "encouraging", "--bonus", "nope"], "--bonus must be one of log, power, cosine, got 'nope'"),
    (["--smoothing", "1.2"], "--smoothing must be in [0, 1), got 1.2"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
    (["--mixup", "-1"], "--mixup must be a number >= 0, got -1.0"),
    (["--log-end", "0.5"], "--log-end applies to --loss encouraging only, not --loss ce"),
    (["--bonus-schedule", "linear"], "--bonus-schedule applies to --loss encouraging only"),
    (["--loss", "encouraging", "--bonus-schedule", "lin"], "--bonus-schedule must be one of none, linear"),
    (["--loss", "encouraging", "--defer-start", "-1"], "--defer-start must be an integer >= 0, got -1"),
    (["--loss", "encouraging", "--bonus-smoothing", "1"], "--bonus-smoothing must be in [0, 1), got 1.0"),
    (["--loss", "encouraging", "--bonus-gamma", "0"], "--bonus-gamma must be a finite number > 0, got 0.0"),
    (["--resume", "missing.pth.tar"], "--resume: checkpoint not found: 'missing.pth.tar'"),
    (["--model", "no_such_model"], "--model: unknown model 'no_such_model'"),
    (["--opt", "nope"], "--opt: unknown optimizer 'nope'"),
    (["--sched", "nope"], "argument --sched: invalid choice: 'nope'"),
    (["--drop", "1"], "--drop must be in [0, 1), got 1.0"),
    (["--scale", "1", "0.5"], "--scale must be two numbers MIN MAX"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--val-split", ""], "--val-split must name the validation split"),
    (["--val-split", "test"], "--val-split 'test': no such folder in"),
    (["--val-split", "train"], "--val-split 'train': no such folder in"),
    (["--num-classes", "5"], "--num-classes 5 is smaller than the 10 classes of the data"),
    (["--model", "mnist_cnn", "--drop-path", "0.1"], "--model mnist_cnn: "),
    (["--aa", "nope"], "--aa 'nope': "),
    (["-b", "1000"], "--batch-size 1000 is larger than the 600 training images"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_with_one_line(mnist_folder, capsys, restore_logging, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(mnist_folder), *FAST, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("timm-el-train: error: ") and message in err[-1], err
    # one error line, no traceback (errors found while setting up the data and model follow the log lines)
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err), err


@pytest.mark.parametrize("flags, message", [
    (["--loss", "encouraging", "--log-end", "1.5"], "--log-end must be in (0, 1], got 1.5"),
    (["--bonus-rho", "0.5"], "--bonus-rho applies to --loss encouraging only"),
    (["DIR_MISSING"], "--data-dir: directory not found: 'DIR_MISSING'"),
])
def test_bad_flags_from_the_command_line(tmp_path, flags, message, capsys, monkeypatch, restore_logging):
    """The command's main() in-process with a command line's arguments (the command itself, in a fresh python:
    test_train_cli_bad_companion_flag_is_one_line)."""
    monkeypatch.chdir(tmp_path)
    args = [str(tmp_path), *flags] if flags != ["DIR_MISSING"] else flags
    with pytest.raises(SystemExit) as exit_info:
        el_train.main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-el-train: error: ") and message in lines[0], err
    assert out == ""


def test_resume_refuses_another_loss(el_run, mnist_folder, capsys, restore_logging):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(mnist_folder), *FAST, "--loss", "ce", "--resume", str(el_run[0] / "last.pth.tar")])
    assert exit_info.value.code == 2
    assert "was trained with --loss encouraging, not --loss ce" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        el_train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--loss", "--log-end", "--bonus-schedule", "--defer-start", "--model-ema-decay", "--drop-connect",
                 "--decay-epochs", "--opt-eps", "--config", "--resume", "--checkpoint-hist"):
        assert flag in out, flag


def test_reading_a_checkpoint_keeps_the_allow_list_of_others(tmp_path):
    """Loading a checkpoint's metadata must not remove types another library allowed (fairseq_el.compat)."""
    import argparse

    from timm_el import checkpoints

    torch.save({"epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "c.pth.tar")
    torch.serialization.add_safe_globals([argparse.Namespace])
    checkpoints._load_checkpoint_meta(str(tmp_path / "c.pth.tar"))
    assert argparse.Namespace in torch.serialization.get_safe_globals()


CONFIGS = [
    ("list.yaml", "- loss: ce\n- epochs: 3\n", "holds a YAML list, expected a mapping of timm-el-train flags"),
    ("scalar.yaml", "42\n", "holds a YAML number, expected a mapping"),
    ("broken.yaml", "loss: [ce\nepochs: 3\n", "not valid YAML ("),
    ("empty_list.yaml", "[]\n", "holds a YAML list, expected a mapping"),
    ("binary.yaml", b"\xff\xfe\x00binary", "not UTF-8 text (byte 0)"),
    ("nul.yaml", "loss: ce\n\0\0", "holds NUL bytes"),
    ("deep.yaml", "[" * 100_000 + "]" * 100_000, "nested too deeply to be a file of flags"),
]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("name, content, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_file_is_one_line(tiny_source, tmp_path, capsys, name, content, message):
    config = tmp_path / name
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        el_train.main([str(tiny_source), "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"timm-el-train: error: --config {str(config)!r}: ") \
        and message in err[0], err


def _args(tmp_path, *flags):
    return el_train.parse_args([str(tmp_path), "--model", "test_resnet", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--focal-gamma", "1"], "--focal-gamma applies to --loss focal or halted_focal only, not --loss ce"),
    (["--loss", "focal", "--halt-point", "0.3"], "--halt-point applies to --loss halted_focal only, not --loss focal"),
    (["--loss", "encouraging", "--mirror-rho", "0"],
     "--mirror-rho applies to --loss mse or mse_sigmoid only, not --loss encouraging"),
    (["--loss", "halted_focal", "--log-end", "0.5"],
     "--log-end applies to --loss encouraging only, not --loss halted_focal"),
    (["--loss", "halted_focal", "--halt-point", "1"], "--halt-point must be in (0, 1), got 1.0"),
    (["--loss", "focal", "--focal-gamma", "nan"], "--focal-gamma must be a finite number >= 0, got nan"),
    (["--loss", "mse", "--mirror-gamma", "0"], "--mirror-gamma must be a finite number > 0, got 0.0"),
    (["--loss", "mse_sigmoid", "--mirror-rho", "-1"], "--mirror-rho must be a finite number >= 0, got -1.0"),
])
def test_train_refuses_companion_flags_that_do_not_apply(tmp_path, flags, message):
    with pytest.raises(el_train.UsageError, match=re.escape(message)):
        _args(tmp_path, *flags)


def test_train_cli_bad_companion_flag_is_one_line(tmp_path):
    proc = run_cli(tmp_path, "--loss", "focal", "--halt-point", "0.3", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "timm-el-train: error: --halt-point applies to --loss halted_focal only, not --loss focal"]
    assert proc.stdout == ""
