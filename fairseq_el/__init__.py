"""fairseq plugin for the Encouraging Loss (Zhao et al., AAAI 2022).

Load it into the stock fairseq command-line tools with ``--user-dir``::

    fairseq-train DATA --user-dir "$(python -m fairseq_el --user-dir)" \\
        --criterion encouraging_label_smoothed_cross_entropy --log-end 0.5 ...

Importing this package registers the criterion and applies two compatibility
fixes (see :mod:`fairseq_el.compat`): fairseq checkpoints load under
``torch.load(weights_only=True)`` (torch >= 2.6) and every example is batched
again under ``fairseq-fixed``.
"""
try:
    import fairseq  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "fairseq_el needs fairseq: install the project with its 'fairseq' extra (see README.md)"
    ) from err

from . import compat

compat.install()

from .criterion import (  # noqa: E402
    EncouragingLabelSmoothedCrossEntropyConfig,
    EncouragingLabelSmoothedCrossEntropyCriterion,
)

__all__ = [
    "EncouragingLabelSmoothedCrossEntropyConfig",
    "EncouragingLabelSmoothedCrossEntropyCriterion",
    "compat",
    "user_dir",
]


def user_dir() -> str:
    """The path to pass to fairseq's ``--user-dir``."""
    import os

    return os.path.dirname(os.path.abspath(__file__))
