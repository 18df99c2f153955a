"""fairseq_el.logs on real fairseq-train logs: json and simple format, captured
console output and --log-file, mid-epoch validations, a resumed run."""
import csv
import subprocess
import sys

import pytest

from fairseq_el.logs import parse_train_log, parse_validations, write_curve

from helpers import BIN, ROOT, TINY_TRANSFORMER, USER_DIR, command_env

TINY = TINY_TRANSFORMER + [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
    "--max-tokens", "2000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5",
    "--no-epoch-checkpoints", "--log-interval", "2",
]


def train(data_bin, save_dir, console_log, *flags):
    proc = subprocess.run([str(BIN / "fairseq-train"), str(data_bin), "--user-dir", USER_DIR, *TINY,
                           "--save-dir", str(save_dir), *map(str, flags)],
                          capture_output=True, text=True, env=command_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    with open(console_log, "a", encoding="utf-8") as f:
        f.write(out)
    return out


@pytest.fixture(scope="module")
def logs(iwslt14_slice, tmp_path_factory):
    """Two epochs in each format (json with a validation every 3 updates, so
    several per epoch), then the json run resumed for a third epoch."""
    root = tmp_path_factory.mktemp("logs")
    data_bin = iwslt14_slice(300, 30, 10) / "bin"
    paths = {k: root / f"{k}.log" for k in ("json_console", "json_file", "simple_console", "simple_file")}
    train(data_bin, root / "ckpt_json", paths["json_console"], "--max-epoch", "2", "--save-interval-updates", "3",
          "--log-format", "json", "--log-file", paths["json_file"])
    train(data_bin, root / "ckpt_simple", paths["simple_console"], "--max-epoch", "2",
          "--log-format", "simple", "--log-file", paths["simple_file"])
    paths["resumed_file"] = root / "resumed.log"
    paths["resumed_file"].write_text(paths["json_file"].read_text())
    train(data_bin, root / "ckpt_json", root / "resumed_console.log", "--max-epoch", "3",
          "--save-interval-updates", "3", "--log-format", "json", "--log-file", paths["resumed_file"])
    return paths


def test_the_formats_are_what_the_parser_expects(logs):
    json_console = logs["json_console"].read_text()
    assert '| INFO | valid | {"epoch": 1, "valid_loss": "' in json_console
    assert '| INFO | train | {"epoch": 1, "train_loss": "' in json_console
    simple_console = logs["simple_console"].read_text()
    assert "| INFO | valid | epoch 001 | valid on 'valid' subset | loss " in simple_console
    assert "| INFO | train | epoch 001 | loss " in simple_console
    # --log-file holds the bare messages
    assert any(line.startswith('{"epoch": 1, "valid_loss"') for line in logs["json_file"].read_text().splitlines())
    assert any(line.startswith("epoch 001 | loss ") for line in logs["simple_file"].read_text().splitlines())


@pytest.mark.parametrize("name", ["json_console", "json_file", "simple_console", "simple_file"])
def test_every_format_gives_numeric_rows_per_epoch(logs, name):
    rows = parse_train_log(logs[name])
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert list(row)[0] == "epoch"
        for key in ("valid_loss", "valid_nll_loss", "valid_ppl", "train_loss", "train_nll_loss", "train_bonus",
                    "train_wall", "wall"):
            assert isinstance(row[key], float) or isinstance(row[key], int), (key, row)
        assert isinstance(row["num_updates"], int) and row["num_updates"] > 0
        assert 0 < row["valid_nll_loss"] < 20
        assert not any(k.startswith("valid_valid") or k.startswith("train_train") or k == "valid_num_updates"
                       for k in row), row
    assert rows[1]["num_updates"] > rows[0]["num_updates"]
    assert rows[1]["valid_nll_loss"] < rows[0]["valid_nll_loss"]


def test_formats_agree(logs):
    """Same data and seed: the epoch-end validation and the training summary
    are the same numbers whichever format or file they come from (the json
    run's extra mid-epoch validations do not change training)."""
    names = ("json_console", "json_file", "simple_console", "simple_file")
    parsed = {name: parse_train_log(logs[name]) for name in names}
    keys = ("epoch", "num_updates", "valid_loss", "valid_nll_loss", "valid_ppl", "train_loss", "train_nll_loss")
    reference = [{k: r[k] for k in keys} for r in parsed["simple_console"]]
    for name, rows in parsed.items():
        assert [{k: r[k] for k in keys} for r in rows] == reference, name


def test_mid_epoch_validations_and_the_epoch_end_one(logs):
    every = parse_validations(logs["json_console"])
    rows = parse_train_log(logs["json_console"])
    assert len(every) > len(rows)  # --save-interval-updates 3 validates inside the epochs
    assert all(v["subset"] == "valid" for v in every)
    for row in rows:
        of_epoch = [v for v in every if v["epoch"] == row["epoch"]]
        assert len(of_epoch) >= 2
        assert of_epoch[-1]["valid_nll_loss"] == row["valid_nll_loss"]
        assert of_epoch[-1]["num_updates"] == row["num_updates"]


def test_a_resumed_run_appending_to_its_log(logs):
    rows = parse_train_log(logs["resumed_file"])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    first = parse_train_log(logs["json_file"])
    assert rows[:2] == first
    assert rows[2]["num_updates"] > rows[1]["num_updates"]


def test_write_curve_and_cli(logs, tmp_path):
    out = tmp_path / "curve" / "valid.csv"
    rows = write_curve(logs["json_console"], out)
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert next(iter(table[0])) == "epoch"
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert [float(r["valid_nll_loss"]) for r in table] == [r["valid_nll_loss"] for r in rows]
    cli_out = tmp_path / "cli.csv"
    proc = subprocess.run([sys.executable, "-m", "fairseq_el.logs", str(logs["simple_file"]), "--csv", str(cli_out)],
                          capture_output=True, text=True, cwd=ROOT, env=command_env())
    assert proc.returncode == 0, proc.stderr
    assert "2 epochs" in proc.stdout
    with open(cli_out, newline="") as f:
        cli_table = list(csv.DictReader(f))
    assert [float(r["valid_nll_loss"]) for r in cli_table] == [float(r["valid_nll_loss"]) for r in table]


def test_cli_refuses_what_is_not_a_log(tmp_path):
    not_a_log = tmp_path / "notes.txt"
    not_a_log.write_text("hello\nworld\n")
    for args, needle in (([str(not_a_log)], "no epoch summary"), ([str(tmp_path / "missing.log")], "no such file")):
        proc = subprocess.run([sys.executable, "-m", "fairseq_el.logs", *args],
                              capture_output=True, text=True, cwd=ROOT, env=command_env())
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="no epoch summary"):
        parse_train_log(not_a_log)
