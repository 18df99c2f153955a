"""encouraging_loss.tools.el_flags: the Encouraging Loss flags of the adapters' commands (--log-end, --bonus,
--bonus-start, --bonus-gamma, --bonus-rho, --bonus-smoothing, --defer-start): None when not given, refused
without EL, defaults written back with EL, every bad value one line naming its flag, and the keyword arguments
of EncouragingLoss (EL_SPEC 2.1-2.3) that the commands build the loss from."""
import argparse

import pytest
import torch

from encouraging_loss import EncouragingLoss, encouraging_loss
from encouraging_loss.tools.cli import Parser
from encouraging_loss.tools.el_flags import (
    EL_FLAG_DEFAULTS,
    EL_FLAG_NAMES,
    add_el_flags,
    check_el_flags,
    el_flag_values,
)

FLAGS = ("--log-end", "--bonus", "--bonus-start", "--bonus-gamma", "--bonus-rho", "--bonus-smoothing",
         "--defer-start")


class FlagError(ValueError):
    """The error class a command passes (``error=``)."""


def parse(*argv, defaults=None, group=False):
    p = Parser(prog="cmd")
    add_el_flags(p.add_argument_group("loss") if group else p, defaults)
    return p.parse_args(list(argv))


def test_every_flag_is_added_and_none_when_not_given():
    args = parse(group=True)
    assert el_flag_values(args) == {dest: None for dest in EL_FLAG_DEFAULTS}
    assert [f"--{dest.replace('_', '-')}" for dest in EL_FLAG_DEFAULTS] == list(FLAGS)


def test_help_shows_the_defaults_and_overridden_ones():
    text = Parser(prog="cmd")
    add_el_flags(text)
    help_text = " ".join(text.format_help().split())
    for shown in ("(default: 0.75)", "(default: log)", "(default: 0.0)", "(default: 1.0)", "(default: 0)",
                  "(default: --smoothing)"):
        assert shown in help_text
    other = Parser(prog="cmd")
    add_el_flags(other, {"log_end": 0.5, "bonus_rho": 2.0})
    other_help = " ".join(other.format_help().split())
    assert "= LE, its tangent above; in (0, 1], 1 = the normal bonus (default: 0.5)" in other_help
    assert "0 trains as cross-entropy (default: 2.0)" in other_help


def test_defaults_with_el_are_returned_and_written_back():
    args = parse()
    kwargs = check_el_flags(args, True)
    assert kwargs == dict(log_end=0.75, bonus="log", bonus_start=0.0, bonus_gamma=1.0, bonus_rho=1.0, smoothing=0.0,
                          bonus_smoothing=None)
    assert {dest: getattr(args, dest) for dest in EL_FLAG_DEFAULTS} == EL_FLAG_DEFAULTS
    assert check_el_flags(args, True) == kwargs  # the written-back values check again to the same


def test_given_values_and_other_defaults():
    args = parse("--log-end", "1", "--bonus-rho", "0.25", "--bonus-smoothing", "0.05", "--defer-start", "3")
    kwargs = check_el_flags(args, True, smoothing=0.1, defaults={"bonus_gamma": 2.0, "log_end": 0.5})
    assert kwargs == dict(log_end=1.0, bonus="log", bonus_start=0.0, bonus_gamma=2.0, bonus_rho=0.25, smoothing=0.1,
                          bonus_smoothing=0.05)
    assert (args.log_end, args.bonus_gamma, args.bonus_rho, args.defer_start) == (1.0, 2.0, 0.25, 3)
    assert all(type(kwargs[k]) is float for k in ("log_end", "bonus_start", "bonus_gamma", "bonus_rho", "smoothing"))
    power = check_el_flags(parse("--bonus", "power", "--bonus-gamma", "3"), True)
    assert (power["bonus"], power["bonus_gamma"]) == ("power", 3.0)


def test_without_el_nothing_is_returned_or_written():
    args = parse()
    assert check_el_flags(args, False) is None
    assert el_flag_values(args) == {dest: None for dest in EL_FLAG_DEFAULTS}


@pytest.mark.parametrize("flag,value", [("--log-end", "0.75"), ("--bonus", "log"), ("--bonus-start", "0"),
                                        ("--bonus-gamma", "1"), ("--bonus-rho", "1"), ("--bonus-smoothing", "0"),
                                        ("--defer-start", "0")])
def test_a_given_flag_without_el_is_refused_even_at_its_default(flag, value):
    with pytest.raises(FlagError) as err:
        check_el_flags(parse(flag, value), False, loss_flag="--loss focal", error=FlagError)
    assert str(err.value) == f"{flag} applies to the Encouraging Loss only, not --loss focal"


@pytest.mark.parametrize("argv,smoothing,message", [
    (["--log-end", "0"], 0.0, "--log-end must be in (0, 1], got 0.0"),
    (["--log-end", "1.5"], 0.0, "--log-end must be in (0, 1], got 1.5"),
    (["--bonus", "square"], 0.0, "--bonus must be one of log, power, cosine, got 'square'"),
    (["--bonus-start", "1"], 0.0, "--bonus-start must be in [0, 1), got 1.0"),
    (["--bonus-start", "-0.1"], 0.0, "--bonus-start must be in [0, 1), got -0.1"),
    (["--bonus-gamma", "0"], 0.0, "--bonus-gamma must be a finite number > 0, got 0.0"),
    (["--bonus-gamma", "inf"], 0.0, "--bonus-gamma must be a finite number > 0, got inf"),
    (["--bonus-rho", "-1"], 0.0, "--bonus-rho must be a finite number >= 0, got -1.0"),
    (["--bonus-rho", "nan"], 0.0, "--bonus-rho must be a finite number >= 0, got nan"),
    (["--bonus-smoothing", "1"], 0.0, "--bonus-smoothing must be in [0, 1), got 1.0"),
    (["--defer-start", "-2"], 0.0, "--defer-start must be an integer >= 0, got -2"),
    ([], 1.0, "--smoothing must be in [0, 1), got 1.0"),
])
def test_each_bad_value_is_one_line_naming_its_flag(argv, smoothing, message):
    with pytest.raises(FlagError) as err:
        check_el_flags(parse(*argv), True, smoothing=smoothing, error=FlagError)
    assert str(err.value) == message
    with pytest.raises(ValueError):  # the default error class
        check_el_flags(parse(*argv), True, smoothing=smoothing)


@pytest.mark.parametrize("value", [1.5, True, "2"])
def test_defer_start_set_by_a_program_must_be_an_integer(value):
    args = argparse.Namespace(**{**{dest: None for dest in EL_FLAG_DEFAULTS}, "defer_start": value})
    with pytest.raises(FlagError, match="^--defer-start must be an integer >= 0, got "):
        check_el_flags(args, True, error=FlagError)


def test_the_core_names_map_to_the_flags_added():
    parser = Parser(prog="cmd")
    add_el_flags(parser)
    parser.add_argument("--smoothing", type=float)  # the command's own flag
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert set(EL_FLAG_NAMES.values()) <= options


@pytest.mark.parametrize("argv,smoothing", [
    ([], 0.0),
    (["--log-end", "0.5", "--bonus-rho", "0.7", "--bonus-smoothing", "0.05"], 0.1),
    (["--bonus", "power", "--bonus-gamma", "2.5"], 0.0),
    (["--bonus-start", "0.3", "--log-end", "1"], 0.2),
    (["--bonus", "cosine", "--bonus-rho", "0.4"], 0.0),
])
def test_the_kwargs_build_the_loss_built_by_hand(argv, smoothing):
    args = parse(*argv)
    kwargs = check_el_flags(args, True, smoothing=smoothing)
    by_hand = EncouragingLoss(log_end=args.log_end, bonus=args.bonus, bonus_start=args.bonus_start,
                              bonus_gamma=args.bonus_gamma, bonus_rho=args.bonus_rho, smoothing=smoothing,
                              bonus_smoothing=args.bonus_smoothing)
    built = EncouragingLoss(**kwargs)
    assert built.cfg == by_hand.cfg and repr(built) == repr(by_hand)
    assert (built.smoothing, built.bonus_smoothing) == (by_hand.smoothing, by_hand.bonus_smoothing)
    torch.manual_seed(0)
    logits, target = torch.randn(9, 5) * 3, torch.randint(0, 5, (9,))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la, lb = built(a, target), by_hand(b, target)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    assert torch.equal(encouraging_loss(logits, target, **kwargs), la.detach())
    if args.bonus_rho > 0:  # the settings reach the loss: it is not cross-entropy
        assert not torch.allclose(la, torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing))
