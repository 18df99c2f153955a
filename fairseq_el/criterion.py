"""``encouraging_label_smoothed_cross_entropy``: fairseq's label-smoothed
cross-entropy plus the bonus of the Encouraging Loss (Zhao et al., "Well-
Classified Examples are Underestimated in Classification with Deep Neural
Networks", AAAI 2022; EL_SPEC 2.3).

The loss is computed by :mod:`encouraging_loss` from the decoder's logits; this
file only maps fairseq's flags and samples onto it and logs the result.
"""
import argparse
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from encouraging_loss.bonus import BONUS_KINDS, BONUS_SCHEDULES, BonusConfig, bonus_rho_at, check_schedule
from encouraging_loss.checks import DEFAULT_IMPL, IMPLS, check_probability, check_settings
from encouraging_loss.functional import el_checked
from encouraging_loss.ops.fused_linear import linear_el_checked

CRITERION = "encouraging_label_smoothed_cross_entropy"

#: config field -> the flag a user types (for error messages)
FLAG_NAMES = {
    "kind": "--bonus",
    "log_end": "--log-end",
    "bonus_start": "--bonus-start",
    "gamma": "--bonus-gamma",
    "rho": "--bonus-rho",
    "smoothing": "--label-smoothing",
    "bonus_smoothing": "--bonus-smoothing",
    "impl": "--el-impl",
    "defer_start": "--defer-start",
    "schedule": "--bonus-schedule",
    "max_epoch": "--max-epoch",
    "exp_rate": "--bonus-schedule-rate",
    "fused_projection": "--el-fused-projection",
}


@dataclass
class EncouragingLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    log_end: float = field(
        default=0.5,
        metadata={
            "help": "conservative bonus: log(1-p) up to p=LOG_END, its tangent above; "
            "1 gives the normal bonus log(1-p). In (0, 1]; the paper uses 0.5 for translation"
        },
    )
    bonus: ChoiceEnum(BONUS_KINDS) = field(
        default="log",
        metadata={"help": "bonus kind: log (normal/conservative/aggressive), power (-p**gamma) or cosine"},
    )
    bonus_start: float = field(
        default=0.0,
        metadata={"help": "aggressive bonus: reward only p >= BONUS_START (0 = off), in [0, 1)"},
    )
    bonus_gamma: float = field(default=1.0, metadata={"help": "exponent of the power bonus, > 0"})
    bonus_rho: float = field(default=1.0, metadata={"help": "weight of the bonus term (0 = plain label-smoothed CE)"})
    bonus_smoothing: Optional[float] = field(
        default=None,
        metadata={"help": "label smoothing of the bonus term, in [0, 1) (default: --label-smoothing)"},
    )
    defer_start: int = field(
        default=0,
        metadata={"help": "turn the bonus on only after this many epochs (0 = from the start)"},
    )
    bonus_schedule: ChoiceEnum(BONUS_SCHEDULES) = field(
        default="none",
        metadata={"help": "ramp of --bonus-rho over epochs, t = epoch / --max-epoch: linear t, "
                  "cosine (cos(pi (1 + t)) + 1) / 2, exp exp((t - 1) r); needs --max-epoch"},
    )
    bonus_schedule_rate: float = field(default=5.0, metadata={"help": "r of the exp bonus schedule, > 0"})
    el_impl: ChoiceEnum(IMPLS) = field(
        default=DEFAULT_IMPL,
        metadata={"help": "fused: loss and gradient in one pass straight from the logits (default); "
                  "reference: the plain formula under autograd"},
    )
    el_fused_projection: bool = field(
        default=False,
        metadata={"help": "compute the decoder's output projection and the loss together, chunk by chunk, "
                  "so that the (tokens x vocabulary) logits are never stored in full (memory for large "
                  "vocabularies; shared embeddings included; --el-impl fused only)"},
    )
    el_inplace_backward: bool = field(
        default=False,
        metadata={"help": "CUDA: write the logits' gradient into the logits' own storage in the backward pass "
                  "(no extra memory for it)"},
    )
    max_epoch: int = II("optimization.max_epoch")


def _check_flag(field_name, value):
    """Check one flag's value with the core's check for it (``ValueError`` naming the flag)."""
    if field_name in ("smoothing", "bonus_smoothing"):
        check_probability(value, field_name, FLAG_NAMES)
    elif field_name == "defer_start":
        check_schedule(defer_start=value, names=FLAG_NAMES)
    elif field_name == "exp_rate":
        check_schedule(exp_rate=value, names=FLAG_NAMES)
    else:
        BonusConfig(**{field_name: value}).validate(FLAG_NAMES)


def _checked(parse, field_name):
    """An argparse ``type`` that rejects bad values with the core's message."""

    def parse_and_check(text):
        value = parse(text)
        try:
            _check_flag(field_name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse_and_check.__name__ = parse.__name__
    return parse_and_check


def _check_flag_combinations(args) -> None:
    """The checks that involve several flags (``ValueError`` naming them)."""
    if getattr(args, "criterion", None) != CRITERION:
        return
    if getattr(args, "el_fused_projection", False) and str(getattr(args, "el_impl", DEFAULT_IMPL)) != "fused":
        raise ValueError("--el-fused-projection needs --el-impl fused, got --el-impl reference")
    check_schedule(
        getattr(args, "defer_start", 0), str(getattr(args, "bonus_schedule", "none")),
        getattr(args, "max_epoch", 0) or 0, getattr(args, "bonus_schedule_rate", 5.0), FLAG_NAMES,
    )


def _check_after_parsing(parser) -> None:
    """Make ``parser`` check the flag combinations once all flags are parsed,
    so that a bad combination is a one-line argparse error before training
    starts (fairseq builds the criterion only later)."""
    if getattr(parser, "_el_checks_combinations", False):
        return
    parse_known_args = parser.parse_known_args

    def parse_known_args_and_check(*args, **kwargs):
        namespace, extra = parse_known_args(*args, **kwargs)
        try:
            _check_flag_combinations(namespace)
        except ValueError as err:
            parser.error(str(err))
        return namespace, extra

    parser.parse_known_args = parse_known_args_and_check
    parser._el_checks_combinations = True



def has_adaptive_softmax(model) -> bool:
    return getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None


def decoder_scores_and_target(model, net_output, sample, ignore_prefix_size=0):
    """The decoder's logits as ``(tokens, V)`` (log-probabilities for adaptive
    softmax, which has no plain logits: their softmax is the same) and the
    targets as ``(tokens,)``, the first ``ignore_prefix_size`` positions dropped."""
    if has_adaptive_softmax(model):
        scores = model.get_normalized_probs(net_output, log_probs=True)
    else:
        scores = net_output[0]
    target = model.get_targets(sample, net_output)
    if ignore_prefix_size > 0:
        scores = scores[:, ignore_prefix_size:, :]
        target = target[:, ignore_prefix_size:]
    return scores.reshape(-1, scores.size(-1)), target.reshape(-1)


@register_criterion(CRITERION, dataclass=EncouragingLabelSmoothedCrossEntropyConfig)
class EncouragingLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus the Encouraging Loss bonus.

    Sums over non-padding target tokens; ``sample_size`` is the number of
    target tokens (sentences with ``--sentence-avg``). Logs ``loss``,
    ``nll_loss`` and ``ppl`` like ``label_smoothed_cross_entropy`` and the
    bonus term as ``bonus`` (base 2, per sample-size unit, ``<= 0``).

    Label smoothing follows EL_SPEC 2.3: weight ``1 - eps + eps / V`` on the
    target and ``eps / V`` on every class (fairseq's own criterion spreads
    ``eps`` over the ``V - 1`` other classes instead).
    """

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        log_end=0.5,
        bonus="log",
        bonus_start=0.0,
        bonus_gamma=1.0,
        bonus_rho=1.0,
        bonus_smoothing=None,
        defer_start=0,
        bonus_schedule="none",
        bonus_schedule_rate=5.0,
        max_epoch=0,
        el_impl=DEFAULT_IMPL,
        el_fused_projection=False,
        el_inplace_backward=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        # the same checks as the command line's, for configs that come another way (hydra, Python)
        self.el_impl = str(el_impl)
        self.bonus_cfg, self.eps, self.bonus_smoothing, _ = check_settings(
            BonusConfig(str(bonus), log_end, bonus_start, bonus_gamma, bonus_rho), label_smoothing,
            bonus_smoothing, self.padding_idx, "sum", self.el_impl, FLAG_NAMES,
        )
        self.defer_start, self.bonus_schedule, self.max_epoch, self.bonus_schedule_rate = check_schedule(
            defer_start, str(bonus_schedule), max_epoch or 0, bonus_schedule_rate, FLAG_NAMES
        )
        self.el_fused_projection = bool(el_fused_projection)
        self.el_inplace_backward = bool(el_inplace_backward)
        if self.el_fused_projection and self.el_impl != "fused":
            raise ValueError("--el-fused-projection needs --el-impl fused, got --el-impl reference")
        self.epoch = 1
        self.current = self.bonus_cfg
        if self.defer_start > 0 or self.bonus_schedule != "none":
            self._follow_epochs(task)
            self.set_epoch(1)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        checked = {
            "log_end": ("log_end", float),
            "bonus_start": ("bonus_start", float),
            "bonus_gamma": ("gamma", float),
            "bonus_rho": ("rho", float),
            "bonus_smoothing": ("bonus_smoothing", float),
            "label_smoothing": ("smoothing", float),
            "defer_start": ("defer_start", int),
            "bonus_schedule_rate": ("exp_rate", float),
        }
        for action in parser._actions:
            if action.dest in checked:
                name, parse = checked[action.dest]
                action.type = _checked(parse, name)
        _check_after_parsing(parser)

    # -- bonus schedule -------------------------------------------------
    def _follow_epochs(self, task):
        """Hear about each new epoch: the trainer announces it to the task."""
        begin_epoch = task.begin_epoch

        def begin_epoch_and_update_bonus(epoch, model):
            self.set_epoch(epoch)
            return begin_epoch(epoch, model)

        task.begin_epoch = begin_epoch_and_update_bonus

    def set_epoch(self, epoch: int) -> None:
        """Set the bonus weight for ``epoch`` (1-based)."""
        self.epoch = epoch
        rho = bonus_rho_at(
            self.bonus_cfg.rho, epoch, defer_start=self.defer_start, schedule=self.bonus_schedule,
            max_epoch=self.max_epoch, exp_rate=self.bonus_schedule_rate,
        )
        c = self.bonus_cfg
        self.current = BonusConfig(c.kind, c.log_end, c.bonus_start, c.gamma, rho)

    # -- loss -------------------------------------------------------------
    def get_logits_and_target(self, model, net_output, sample):
        """Decoder logits ``(tokens, V)`` and targets, without a log-softmax pass
        (log-probabilities for adaptive softmax, which has no plain logits)."""
        return decoder_scores_and_target(model, net_output, sample, self.ignore_prefix_size)

    def compute_loss(self, model, net_output, sample, reduce=True):
        """Returns ``(loss, nll_loss, bonus)``, summed when ``reduce``."""
        logits, target = self.get_logits_and_target(model, net_output, sample)
        parts = el_checked(
            logits, target, self.current, self.eps, self.bonus_smoothing, self.padding_idx,
            "sum" if reduce else "none", True, self.el_impl, FLAG_NAMES, self.el_inplace_backward,
        )
        return parts.loss, parts.nll_loss, parts.bonus

    @staticmethod
    def output_projection(model):
        """The decoder's output projection (``nn.Linear``) for --el-fused-projection;
        ``ValueError`` for decoders without a plain one (adaptive softmax)."""
        decoder = getattr(model, "decoder", None)
        proj = getattr(decoder, "output_projection", None)
        if has_adaptive_softmax(model) or not isinstance(proj, torch.nn.Linear):
            raise ValueError(
                f"--el-fused-projection needs a decoder whose output layer is a plain projection "
                f"(fairseq's TransformerDecoder); {type(decoder).__name__} has "
                f"{'adaptive softmax' if has_adaptive_softmax(model) else 'no nn.Linear output_projection'}"
            )
        return proj

    def fused_projection_loss(self, model, sample):
        """``(loss, nll_loss, bonus, n_correct, n_total)``, summed, from the decoder's
        features and its output projection without the full logits."""
        proj = self.output_projection(model)
        features, extra = model(**sample["net_input"], features_only=True)
        target = model.get_targets(sample, (features, extra))
        if self.ignore_prefix_size > 0:
            features = features[:, self.ignore_prefix_size:, :]
            target = target[:, self.ignore_prefix_size:]
        parts = linear_el_checked(
            features, proj.weight, proj.bias, target, self.current, self.eps, self.bonus_smoothing,
            self.padding_idx, "sum", True, None, FLAG_NAMES,
        )
        return parts.loss, parts.nll_loss, parts.bonus, parts.n_correct, target.ne(self.padding_idx).sum()

    def compute_accuracy(self, model, net_output, sample):
        logits, target = self.get_logits_and_target(model, net_output, sample)
        mask = target.ne(self.padding_idx)
        n_correct = torch.sum(logits.argmax(1).masked_select(mask).eq(target.masked_select(mask)))
        return n_correct, torch.sum(mask)

    def forward(self, model, sample, reduce=True):
        fused = self.el_fused_projection and reduce
        if fused:
            loss, nll_loss, bonus, n_correct, total = self.fused_projection_loss(model, sample)
        else:
            net_output = model(**sample["net_input"])
            loss, nll_loss, bonus = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "bonus": bonus.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            if not fused:
                n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        bonus_sum = sum(log.get("bonus", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size > 0:
            metrics.log_scalar("bonus", bonus_sum / sample_size / math.log(2), sample_size, round=3)
