"""The Encouraging Loss flags of a command line, for the adapters' commands (framework-free).

:func:`add_el_flags` adds ``--log-end``, ``--bonus``, ``--bonus-start``, ``--bonus-gamma``,
``--bonus-rho``, ``--bonus-smoothing`` and ``--defer-start`` to an argparse parser (or group);
:func:`check_el_flags` checks them with the core's checks (:class:`~encouraging_loss.bonus.BonusConfig`,
:func:`~encouraging_loss.checks.check_probability`) and returns the keyword arguments of
:class:`~encouraging_loss.EncouragingLoss`. A flag left out is ``None`` on the command line, so that it
can be refused when the command trains without the Encouraging Loss (``--loss ce``), and gets its
default only with the loss that uses it. Errors are ``error(one line naming the flag and the value)``.
"""
from typing import Mapping, Optional

from ..bonus import BonusConfig, as_integer
from ..checks import check_probability

__all__ = ["EL_FLAG_DEFAULTS", "EL_FLAG_NAMES", "add_el_flags", "check_el_flags", "el_flag_values"]

#: the defaults of the flags (dests) when the Encouraging Loss is used: a conservative bonus (EL_SPEC 2.1)
#: with the end point of the paper's image recipes.
EL_FLAG_DEFAULTS = {
    "log_end": 0.75,
    "bonus": "log",
    "bonus_start": 0.0,
    "bonus_gamma": 1.0,
    "bonus_rho": 1.0,
    "bonus_smoothing": None,
    "defer_start": 0,
}
#: the core's parameter names -> the flags, for the core's error messages.
EL_FLAG_NAMES = {
    "kind": "--bonus", "log_end": "--log-end", "bonus_start": "--bonus-start", "gamma": "--bonus-gamma",
    "rho": "--bonus-rho", "smoothing": "--smoothing", "bonus_smoothing": "--bonus-smoothing",
    "defer_start": "--defer-start",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_el_flags(group, defaults: Optional[Mapping] = None) -> None:
    """Add the Encouraging Loss flags to ``group`` (a parser or an argument group), each ``None`` when
    not given; ``defaults`` (dest -> value) overrides :data:`EL_FLAG_DEFAULTS` in the help text."""
    d = {**EL_FLAG_DEFAULTS, **(defaults or {})}
    group.add_argument("--log-end", type=float, default=None, metavar="LE",
                       help=f"conservative bonus: log(1 - p) up to p = LE, its tangent above; in (0, 1], "
                            f"1 = the normal bonus (default: {d['log_end']})")
    group.add_argument("--bonus", default=None, metavar="KIND",
                       help=f"bonus kind: log, power or cosine (default: {d['bonus']})")
    group.add_argument("--bonus-start", type=float, default=None, metavar="S",
                       help=f"aggressive bonus: reward only p >= S, in [0, 1) (default: {d['bonus_start']})")
    group.add_argument("--bonus-gamma", type=float, default=None, metavar="G",
                       help=f"exponent of the power bonus, > 0 (default: {d['bonus_gamma']})")
    group.add_argument("--bonus-rho", type=float, default=None, metavar="RHO",
                       help=f"weight of the bonus, >= 0; 0 trains as cross-entropy (default: {d['bonus_rho']})")
    group.add_argument("--bonus-smoothing", type=float, default=None, metavar="EPS",
                       help="label smoothing of the bonus term, in [0, 1) (default: --smoothing)")
    group.add_argument("--defer-start", type=int, default=None, metavar="N",
                       help=f"bonus off for the first N epochs (default: {d['defer_start']})")


def el_flag_values(args) -> dict:
    """The flags' values as given (dest -> value, ``None`` = not given)."""
    return {dest: getattr(args, dest, None) for dest in EL_FLAG_DEFAULTS}


def check_el_flags(args, uses_el: bool, *, loss_flag: str = "--loss ce", smoothing: float = 0.0,
                   defaults: Optional[Mapping] = None, error=ValueError) -> Optional[dict]:
    """Check the flags of :func:`add_el_flags` on ``args`` (a namespace).

    Without the Encouraging Loss (``uses_el`` false) a given flag is an error naming it and
    ``loss_flag`` (what was chosen instead), and the result is ``None``. With it, the flags not given
    take their defaults (written back into ``args``) and everything is checked with the core's checks;
    the result is ``EncouragingLoss``'s keyword arguments (``log_end``, ``bonus``, ``bonus_start``,
    ``bonus_gamma``, ``bonus_rho``, ``smoothing``, ``bonus_smoothing``), and ``args.defer_start`` is an
    integer >= 0. Every error is ``error(message)``, the message one line naming the flag.
    """
    d = {**EL_FLAG_DEFAULTS, **(defaults or {})}
    if not uses_el:
        given = [_flag(dest) for dest, value in el_flag_values(args).items() if value is not None]
        if given:
            raise error(f"{given[0]} applies to the Encouraging Loss only, not {loss_flag}")
        return None
    for dest, value in el_flag_values(args).items():
        if value is None:
            setattr(args, dest, d[dest])
    try:
        cfg = BonusConfig(kind=args.bonus, log_end=args.log_end, bonus_start=args.bonus_start,
                          gamma=args.bonus_gamma, rho=args.bonus_rho).validate(EL_FLAG_NAMES)
        bonus_smoothing = check_probability(args.bonus_smoothing, "bonus_smoothing", EL_FLAG_NAMES,
                                            allow_none=True)
        eps = check_probability(smoothing, "smoothing", EL_FLAG_NAMES)
    except ValueError as err:
        raise error(str(err)) from None
    defer = as_integer(args.defer_start)
    if defer is None or defer < 0:
        raise error(f"--defer-start must be an integer >= 0, got {args.defer_start!r}")
    args.log_end, args.bonus_start, args.bonus_gamma, args.bonus_rho = cfg.log_end, cfg.bonus_start, cfg.gamma, cfg.rho
    args.bonus_smoothing, args.defer_start = bonus_smoothing, defer
    return dict(log_end=cfg.log_end, bonus=cfg.kind, bonus_start=cfg.bonus_start, bonus_gamma=cfg.gamma,
                bonus_rho=cfg.rho, smoothing=eps, bonus_smoothing=bonus_smoothing)

