"""The paper's companion losses as fairseq criteria (Zhao et al., "Well-
Classified Examples are Underestimated in Classification with Deep Neural
Networks", AAAI 2022, appendix; EL_SPEC 2.5):

* ``focal_cross_entropy``: the focal loss ``-(1 - p)**gamma log p``
  (``--focal-gamma``, default 2);
* ``halted_focal_cross_entropy``: the Halted Focal Loss, Eq. 12: focal below
  ``p = --halt-point`` (default 0.5), the cross-entropy shifted to stay
  continuous above;
* ``mse_mirror_bonus``: MSE of the softmax (``--mse-activation sigmoid``: the
  sigmoid) outputs plus the mirror bonus, Table 5 (``--mirror-rho``, default 1,
  0 = plain MSE; ``--mirror-gamma``, default 2); per token, the mean over the
  vocabulary.

Each is summed over non-padding target tokens like the Encouraging Loss
criterion (``sample_size``: the number of target tokens, sentences with
``--sentence-avg``) and logs ``loss``, ``nll_loss`` (the plain ``-log p_y`` of
the softmax) and ``ppl`` like ``label_smoothed_cross_entropy``.
``--label-smoothing eps`` takes the loss against ``(1 - eps) y + eps / V``
(EL_SPEC 2.3). The losses are computed by :mod:`encouraging_loss.companion`;
this file maps fairseq's flags and samples onto it. Bad flag values are
one-line argparse errors naming the flag (exit status 2).
"""
import argparse
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum

from encouraging_loss.checks import check_probability
from encouraging_loss.companion import (
    ACTIVATIONS,
    FocalConfig,
    MirrorMSEConfig,
    check_companion_settings,
    companion_checked,
)

from .criterion import decoder_scores_and_target, has_adaptive_softmax

__all__ = [
    "CRITERIA",
    "FLAG_NAMES",
    "FocalCrossEntropyConfig",
    "FocalCrossEntropyCriterion",
    "HaltedFocalCrossEntropyConfig",
    "HaltedFocalCrossEntropyCriterion",
    "MSEMirrorBonusConfig",
    "MSEMirrorBonusCriterion",
]

#: the criteria registered here.
CRITERIA = ("focal_cross_entropy", "halted_focal_cross_entropy", "mse_mirror_bonus")

#: the core's parameter names -> the flags a user types (for error messages)
FLAG_NAMES = {
    "gamma": "--focal-gamma",
    "halt": "--halt-point",
    "activation": "--mse-activation",
    "mirror_rho": "--mirror-rho",
    "mirror_gamma": "--mirror-gamma",
    "smoothing": "--label-smoothing",
}

# config field -> (the check of its value alone, the core's parameter name)
_CHECKS = {
    "focal_gamma": (lambda v: FocalConfig(gamma=v).validate(FLAG_NAMES), "gamma"),
    "halt_point": (lambda v: FocalConfig(halt=v).validate(FLAG_NAMES), "halt"),
    "mirror_rho": (lambda v: MirrorMSEConfig(mirror_rho=v).validate(FLAG_NAMES), "mirror_rho"),
    "mirror_gamma": (lambda v: MirrorMSEConfig(mirror_gamma=v).validate(FLAG_NAMES), "mirror_gamma"),
    "label_smoothing": (lambda v: check_probability(v, "smoothing", FLAG_NAMES), "smoothing"),
}


@dataclass
class FocalCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    focal_gamma: float = field(
        default=2.0,
        metadata={"help": "focusing exponent gamma of the focal loss -(1-p)**gamma log p, >= 0 (0 = CE)"},
    )


@dataclass
class HaltedFocalCrossEntropyConfig(FocalCrossEntropyConfig):
    halt_point: float = field(
        default=0.5,
        metadata={"help": "halting point h in (0, 1): focal loss below p=h, above it the cross-entropy "
                  "shifted to be continuous at h (Eq. 12; the paper takes 0.5)"},
    )


@dataclass
class MSEMirrorBonusConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mse_activation: ChoiceEnum(ACTIVATIONS) = field(
        default="softmax",
        metadata={"help": "outputs u of the MSE: softmax of the logits, or their sigmoid (MSE + sigmoid)"},
    )
    mirror_rho: float = field(
        default=1.0,
        metadata={"help": "weight of the mirror bonus -(y u**g + (1-y) (1-u)**g), >= 0 (0 = plain MSE)"},
    )
    mirror_gamma: float = field(default=2.0, metadata={"help": "exponent g of the mirror bonus, > 0"})


def _checked(parse, field_name):
    """An argparse ``type`` that rejects bad values with the core's message, naming the flag."""
    check = _CHECKS[field_name][0]

    def parse_and_check(text):
        value = parse(text)
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse_and_check.__name__ = parse.__name__
    return parse_and_check


class _CompanionCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` with the loss of ``self.loss_cfg`` (set by the subclass)."""

    def _setup(self, cfg, label_smoothing):
        # the same checks as the command line's, for configs that come another way (hydra, Python)
        self.loss_cfg, self.eps, _ = check_companion_settings(cfg, label_smoothing, self.padding_idx, "sum",
                                                              FLAG_NAMES)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        for action in parser._actions:
            if action.dest in _CHECKS and action.type in (float, None):
                action.type = _checked(float, action.dest)

    def get_logits_and_target(self, model, net_output, sample):
        """Decoder logits ``(tokens, V)`` and targets (log-probabilities for adaptive
        softmax, which has no plain logits: their softmax is the same)."""
        if has_adaptive_softmax(model) and getattr(self.loss_cfg, "activation", "softmax") != "softmax":
            raise ValueError("--mse-activation sigmoid needs the decoder's logits; adaptive softmax has none")
        return decoder_scores_and_target(model, net_output, sample, self.ignore_prefix_size)

    def compute_loss(self, model, net_output, sample, reduce=True):
        """Returns ``(loss, nll_loss)``, summed over non-padding tokens when ``reduce``."""
        logits, target = self.get_logits_and_target(model, net_output, sample)
        parts = companion_checked(logits, target, self.loss_cfg, self.eps, self.padding_idx,
                                  "sum" if reduce else "none", True, FLAG_NAMES)
        return parts.loss, parts.nll_loss


@register_criterion("focal_cross_entropy", dataclass=FocalCrossEntropyConfig)
class FocalCrossEntropyCriterion(_CompanionCriterion):
    """Focal loss ``-(1 - p_y)**gamma log p_y`` over target tokens (Lin et al., 2017),
    the starting point of the Halted Focal Loss (Eq. 12, Zhao et al., AAAI 2022)."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 focal_gamma=2.0):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self._setup(FocalConfig(gamma=focal_gamma), label_smoothing)


@register_criterion("halted_focal_cross_entropy", dataclass=HaltedFocalCrossEntropyConfig)
class HaltedFocalCrossEntropyCriterion(_CompanionCriterion):
    """Halted Focal Loss, Eq. 12 of Zhao et al., AAAI 2022: focal loss below
    ``p = --halt-point``, the cross-entropy shifted to stay continuous above."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 focal_gamma=2.0, halt_point=0.5):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if halt_point is None:
            raise ValueError("--halt-point must be in (0, 1), got None")
        self._setup(FocalConfig(gamma=focal_gamma, halt=halt_point), label_smoothing)


@register_criterion("mse_mirror_bonus", dataclass=MSEMirrorBonusConfig)
class MSEMirrorBonusCriterion(_CompanionCriterion):
    """MSE of the softmax (or sigmoid) outputs plus the mirror bonus, Table 5 of
    Zhao et al., AAAI 2022: per token the mean over the vocabulary of
    ``y (1 - u)**2 + (1 - y) u**2 - rho (y u**g + (1 - y) (1 - u)**g)``."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 mse_activation="softmax", mirror_rho=1.0, mirror_gamma=2.0):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        cfg = MirrorMSEConfig(activation=str(mse_activation), mirror_rho=mirror_rho, mirror_gamma=mirror_gamma)
        self._setup(cfg, label_smoothing)
