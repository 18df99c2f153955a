"""encouraging_loss.tools.cli: what every command shares."""
import argparse

import pytest

from encouraging_loss.tools.cli import Parser, check_choice, list_of, seed_number, split_extra


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
