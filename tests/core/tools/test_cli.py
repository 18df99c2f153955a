"""encouraging_loss.tools.cli: what every command shares."""
import argparse

import pytest

from encouraging_loss.tools.cli import Parser, check_choice, flag_groups, list_of, merge_flags, seed_number, split_extra


@pytest.mark.parametrize("argv, own, extra", [
    (["--work", "W"], ["--work", "W"], []),
    (["--work", "W", "--", "--lr", "1", "--", "x"], ["--work", "W"], ["--lr", "1", "--", "x"]),
    (["--"], [], []),
    ([], [], []),
])
def test_split_extra_cuts_at_the_first_double_dash(argv, own, extra):
    assert split_extra(argv) == (own, extra)
    assert split_extra(tuple(argv)) == (own, extra)  # any sequence; lists come back


def test_parser_errors_are_one_line_and_help_shows_only_real_defaults(capsys):
    parser = Parser(prog="el-x")
    parser.add_argument("--n", type=int, default=3, help="count")
    parser.add_argument("--flag", action="store_true", help="a switch")
    text = parser.format_help()
    assert "count (default: 3)" in text and "a switch\n" in text and "(default: False)" not in text
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "el-x: error: argument --n: invalid int value: 'x'\n"


def test_list_of_and_seed_number():
    """Comma- or space-separated lists converted item by item; a bad item is argparse's one-line error."""
    assert list_of(seed_number, "a seed")("1 2,3") == [1, 2, 3]
    assert list_of(str, "a name")("ce,el") == ["ce", "el"]
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a seed"):
        list_of(seed_number, "a seed")("1,x")
    with pytest.raises(ValueError):
        seed_number("-1")


@pytest.mark.parametrize("values, message", [
    ([], "--rows: nothing given (a, b)"),
    (["a", "c"], "--rows: unknown value 'c' (a, b)"),
    (["a", "b", "a"], "--rows: 'a' given twice"),
])
def test_check_choice_one_line_errors(values, message):
    class Problem(Exception):
        pass

    check_choice("--rows", ["b", "a"], ["a", "b"], Problem)
    with pytest.raises(Problem) as err:
        check_choice("--rows", values, ["a", "b"], Problem)
    assert str(err.value) == message


def _training_parser():
    p = argparse.ArgumentParser(prog="train")
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--milestones", type=int, nargs="+")
    p.add_argument("--pair", nargs=2)
    return p


def test_flag_groups_follow_the_parsers_actions():
    """Aliases share a dest, each option takes as many values as its action, negative numbers are values."""
    p = _training_parser()
    tokens = ["-b", "8", "--lr=-1e-3", "--amp", "--milestones", "30", "60", "--pair", "a", "b", "--lr", "-2"]
    assert flag_groups(tokens, p, program="train") == [
        ("batch_size", ["-b", "8"]), ("lr", ["--lr=-1e-3"]), ("amp", ["--amp"]),
        ("milestones", ["--milestones", "30", "60"]), ("pair", ["--pair", "a", "b"]), ("lr", ["--lr", "-2"])]
    assert merge_flags(["-b", "8", "--lr", "1"], ["--batch-size", "4", "--amp"], p, program="train") == \
        ["--batch-size", "4", "--lr", "1", "--amp"]


@pytest.mark.parametrize("tokens, message", [
    (["--nope", "1"], "-- unknown train option --nope"),
    (["--help"], "-- unknown train option --help"),
    (["/data"], "-- unexpected value '/data' (hint)"),
    (["--lr"], "-- --lr needs a value"),
    (["--pair", "a"], "-- --pair needs 2 values"),
    (["--milestones", "--amp"], "-- --milestones needs at least one value"),
])
def test_flag_groups_one_line_errors(tokens, message):
    class Problem(Exception):
        pass

    with pytest.raises(Problem) as err:
        merge_flags([], tokens, _training_parser(), program="train", stray_hint=" (hint)", error=Problem)
    assert str(err.value) == message
