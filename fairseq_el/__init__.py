"""fairseq plugin for the Encouraging Loss (Zhao et al., AAAI 2022).

Load it into the stock fairseq command-line tools with ``--user-dir``::

    fairseq-train DATA --user-dir "$(python -m fairseq_el --user-dir)" \\
        --criterion encouraging_label_smoothed_cross_entropy --log-end 0.5 ...

Importing this package registers the criterion and applies the fixes of
:mod:`fairseq_el.compat`: fairseq checkpoints load under
``torch.load(weights_only=True)`` (torch >= 2.6), every example is batched
again under ``fairseq-fixed``, and every checkpoint fairseq reads must first
pass a ``weights_only=True`` read (a file that would run code is refused).

The one exception is ``python -m fairseq_el[.module]``: the package is then
only the container of a command (``--user-dir``, data preparation, averaging,
evaluation), which must start at once, so fairseq is not imported here; the
criterion is still reachable by name (imported on first use), and the modules
that need fairseq import it themselves.
"""
import os
import sys

__all__ = [
    "EncouragingLabelSmoothedCrossEntropyConfig",
    "EncouragingLabelSmoothedCrossEntropyCriterion",
    "compat",
    "register",
    "user_dir",
]


def user_dir() -> str:
    """The path to pass to fairseq's ``--user-dir``."""
    return os.path.dirname(os.path.abspath(__file__))


def _run_as_own_command() -> bool:
    """True while ``python -m fairseq_el`` or ``python -m fairseq_el.<module>``
    imports this package on its way to the command (``sys.argv[0]`` is ``-m``
    exactly while Python locates the main module)."""
    if not sys.argv or sys.argv[0] != "-m":
        return False
    orig = list(getattr(sys, "orig_argv", ()))
    if "-m" not in orig:
        return False
    i = orig.index("-m")
    name = orig[i + 1] if i + 1 < len(orig) else ""
    return name == __name__ or name.startswith(__name__ + ".")


def register() -> None:
    """Register the criterion with fairseq and apply :mod:`fairseq_el.compat`
    (what ``--user-dir`` does; idempotent)."""
    try:
        import fairseq  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "fairseq_el needs fairseq: install the project with its 'fairseq' extra (see README.md)"
        ) from err
    import importlib

    # import_module, not ``from . import``: that would consult __getattr__ below first
    compat = importlib.import_module(__name__ + ".compat")
    criterion = importlib.import_module(__name__ + ".criterion")
    importlib.import_module(__name__ + ".companion_criterion")  # the paper's companion losses (EL_SPEC 2.5)
    compat.install()
    globals().update(
        compat=compat,
        EncouragingLabelSmoothedCrossEntropyConfig=criterion.EncouragingLabelSmoothedCrossEntropyConfig,
        EncouragingLabelSmoothedCrossEntropyCriterion=criterion.EncouragingLabelSmoothedCrossEntropyCriterion,
    )


def __getattr__(name):
    if name in ("compat", "EncouragingLabelSmoothedCrossEntropyConfig",
                "EncouragingLabelSmoothedCrossEntropyCriterion"):
        register()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _run_as_own_command():
    register()
