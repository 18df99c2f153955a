"""Fine-tune (or train from scratch) a causal language model with cross-entropy or the Encouraging Loss.

    python -m transformers_el.train --model gpt2 --train-file train.txt --validation-file valid.txt \\
        --loss encouraging --log-end 0.75 [--fused-projection] \\
        -- --output_dir runs/clm-el --max_steps 1000 --per_device_train_batch_size 8 --learning_rate 5e-5

A small command on ``transformers.Trainer`` (issue 22): the text files are tokenized with the model's
tokenizer, concatenated and cut into blocks of ``--block-size`` tokens (as ``run_clm.py``'s ``group_texts``
does), and the model learns to predict each next token, with token-level EL (EL_SPEC 2.2-2.3, the paper's
translation setting: classification over the vocabulary) through :class:`transformers_el.loss.EncouragingLMLoss`
as ``Trainer(compute_loss_func=...)``, or, with ``--fused-projection``, through
:func:`transformers_el.fused.enable_fused_el` (output projection and EL together, the logits never stored).
Everything after ``--`` is ``transformers.TrainingArguments`` (``--output_dir`` required; ``--max_steps``,
``--num_train_epochs``, ``--learning_rate``, ``--per_device_train_batch_size``, ``--gradient_accumulation_steps``,
``--save_steps``, ``--eval_strategy``, ``--bf16``, ...), parsed by ``HfArgumentParser`` as ``run_clm.py`` does.

The evaluation loss is always the next-token cross-entropy (the library's own loss), whatever the training
loss, so that ``eval_loss`` and ``perplexity = exp(eval_loss)`` compare CE and EL runs. At the end the model and
tokenizer are saved in the output folder with ``curve.csv`` (train / eval loss per logged step) and
``result.json``, an ``el-result/1`` record (task ``clm/<model or config name>``, loss ``ce`` or ``el``, metrics
``eval_loss``, ``perplexity``, ``train_loss``) that ``el-results`` reads. An existing, non-empty output folder
is refused unless ``-- --resume_from_checkpoint DIR/checkpoint-N`` (or ``last``: the newest checkpoint there)
continues a run, or ``--overwrite-output-dir`` trains into it again.
"""
import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from encouraging_loss.tools.cli import Parser, split_extra
from encouraging_loss.tools.el_flags import add_el_flags, check_el_flags
from encouraging_loss.tools.files import FileProblem, atomic_write, write_json

PROG = "python -m transformers_el.train"
SCHEMA = "el-result/1"
#: --loss -> the loss label of the result records
RECORD_LOSS = {"ce": "ce", "encouraging": "el"}
CHECKPOINT = "last"
CURVE_COLUMNS = ("step", "epoch", "train_loss", "eval_loss", "learning_rate", "bonus_rho")
#: run_clm.py's spelling of the overwrite flag (a TrainingArguments field before transformers 5), accepted after --
HF_OVERWRITE_FLAG = "--overwrite_output_dir"
#: the largest eval loss whose exponential is recorded as such (exp(230) ~ 1e100, the records' metric limit)
MAX_LOG_PERPLEXITY = 230.0


class UsageError(ValueError):
    """A bad flag, an unreadable input or a refused output folder; reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


_positive_int.__name__ = "a positive integer"


def build_parser() -> Parser:
    p = Parser(prog=PROG, allow_abbrev=False,
               usage=f"{PROG} (--model NAME_OR_PATH | --config JSON) --train-file TXT [options] "
                     f"-- --output_dir DIR [TrainingArguments flags]",
               description="Fine-tune (or train from scratch) a causal LM on text files with next-token "
                           "cross-entropy or the token-level Encouraging Loss (Zhao et al., AAAI 2022; "
                           "EL_SPEC 2.2-2.3), "
                           "on transformers' Trainer. The text is tokenized, concatenated and cut into blocks of "
                           "--block-size tokens (as run_clm.py). Everything after -- is transformers' "
                           "TrainingArguments (--output_dir required). The evaluation loss is always next-token "
                           "cross-entropy; OUTPUT_DIR/result.json is an el-result/1 record for el-results.",
               epilog=f"example: {PROG} --model gpt2 --train-file train.txt --validation-file valid.txt "
                      "--loss encouraging --log-end 0.75 --fused-projection -- --output_dir runs/gpt2-el "
                      "--max_steps 1000 --per_device_train_batch_size 8 --learning_rate 5e-5. Continue a stopped "
                      "run with the same command plus -- --resume_from_checkpoint last.")
    m = p.add_argument_group("model and data")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME_OR_PATH",
                     help="a pretrained causal LM to fine-tune (Hub name or local folder, AutoModelForCausalLM)")
    src.add_argument("--config", metavar="JSON",
                     help="a model config file (with model_type, e.g. a small GPT-2 or Llama) for a model trained "
                          "from scratch; needs --tokenizer")
    m.add_argument("--tokenizer", metavar="NAME_OR_PATH", default=None,
                   help="tokenizer (AutoTokenizer) if not --model's")
    m.add_argument("--train-file", required=True, metavar="TXT", help="training text, UTF-8")
    m.add_argument("--validation-file", metavar="TXT", default=None,
                   help="validation text (default: the last --validation-split-percentage %% of the training blocks)")
    m.add_argument("--validation-split-percentage", type=float, default=5.0, metavar="PCT",
                   help="without --validation-file: the share of the training blocks held out, in (0, 50]")
    m.add_argument("--block-size", type=_positive_int, default=128, metavar="N",
                   help="tokens per training sequence (the text is concatenated and cut into blocks of N)")
    m.add_argument("--task", default=None, help="task name of the result record (default: clm/<model or config name>)")
    m.add_argument("--overwrite-output-dir", action="store_true",
                   help="train into an existing, non-empty --output_dir (files there are overwritten)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", choices=tuple(RECORD_LOSS), default="ce",
                    help="next-token cross-entropy (the library's loss) or the Encouraging Loss (EL_SPEC 2.2-2.3)")
    lo.add_argument("--smoothing", type=float, default=0.0, metavar="EPS",
                    help="label smoothing of the training loss, in [0, 1) (default: 0; use this, not "
                         "--label_smoothing_factor)")
    lo.add_argument("--fused-projection", action="store_true",
                    help="compute the output projection and the loss together in training (transformers_el.fused), "
                         "so the (tokens x vocabulary) logits are never stored; evaluation and generation unchanged")
    add_el_flags(lo)
    return p


def _flag_given(extra: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def check_args(args) -> Optional[dict]:
    """Check what argparse cannot; the Encouraging Loss keyword arguments (``None`` with ``--loss ce``)."""
    if args.config is not None and args.tokenizer is None:
        raise UsageError("--config needs --tokenizer (a model trained from scratch has no tokenizer of its own)")
    if not (0.0 <= args.smoothing < 1.0):
        raise UsageError(f"--smoothing must be in [0, 1), got {args.smoothing!r}")
    if not (0.0 < args.validation_split_percentage <= 50.0):
        raise UsageError(f"--validation-split-percentage must be in (0, 50], got {args.validation_split_percentage!r}")
    for flag, path in (("--train-file", args.train_file), ("--validation-file", args.validation_file),
                       ("--config", args.config)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    return check_el_flags(args, args.loss == "encouraging", loss_flag=f"--loss {args.loss}",
                          smoothing=args.smoothing, error=UsageError)


def parse_training_args(extra: Sequence[str]):
    """``TrainingArguments`` from the flags after ``--`` (``HfArgumentParser``, as ``run_clm.py``); each problem
    one line. Returns ``(training_args, overwrite)``, ``overwrite`` true when run_clm.py's
    ``--overwrite_output_dir`` was given (it is not a TrainingArguments field in transformers 5)."""
    from transformers import HfArgumentParser, TrainingArguments

    extra = list(extra)
    overwrite = False
    if HF_OVERWRITE_FLAG in extra and "overwrite_output_dir" not in TrainingArguments.__dataclass_fields__:
        extra.remove(HF_OVERWRITE_FLAG)
        overwrite = True
    if not _flag_given(extra, "--output_dir"):
        raise UsageError("-- --output_dir DIR is required (the checkpoints, the model and result.json go there)")
    if _flag_given(extra, "--label_smoothing_factor"):
        raise UsageError("--label_smoothing_factor: use --smoothing (before --), which smooths CE and EL alike")

    def error(message):
        raise UsageError(f"TrainingArguments (after --): {message}")

    parser = HfArgumentParser(TrainingArguments)
    parser.error = error  # argparse's usage dump -> one line
    try:
        training_args, rest = parser.parse_args_into_dataclasses(args=extra, return_remaining_strings=True,
                                                                 look_for_args_file=False)
    except (ValueError, TypeError) as err:  # TrainingArguments.__post_init__ checks
        raise UsageError(f"TrainingArguments (after --): {str(err).splitlines()[0] if str(err) else err!r}") from None
    if rest:
        raise UsageError(f"TrainingArguments (after --): unknown flag or stray value {rest[0]!r}")
    return training_args, overwrite or getattr(training_args, "overwrite_output_dir", False)


def resolve_resume(training_args, overwrite: bool):
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets (a checkpoint folder or ``None``); refuses a
    non-empty output folder without a resume or overwrite, and a resume that names nothing."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None:
        if resume.lower() in ("last", "true"):
            last = get_last_checkpoint(str(out)) if out.is_dir() else None
            if last is None:
                raise UsageError(f"--resume_from_checkpoint {resume}: no checkpoint-N folder in --output_dir {out}")
            return last
        if not os.path.isdir(resume):
            raise UsageError(f"--resume_from_checkpoint {resume}: no such folder")
        return resume
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        last = get_last_checkpoint(str(out))
        hint = (f"add -- --resume_from_checkpoint {last} to continue it, or " if last else "") + \
            "--overwrite-output-dir to train into it again"
        raise UsageError(f"--output_dir {out} exists and is not empty; {hint}")
    return None


# ----------------------------------------------------------------------------- data


def _read_text(path: str, flag: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read: {err.strerror or err}") from None


def tokenize_file(tokenizer, path: str, flag: str, say=print, batch_lines: int = 2000):
    """The token ids of the text file's lines, concatenated (a 1-D int64 tensor), as ``run_clm.py`` reads a
    text file (one example per line, the tokenizer's own special tokens)."""
    import torch

    lines = _read_text(path, flag)
    parts, count = [], 0
    every = max(batch_lines, len(lines) // 10)  # a progress line per tenth of a large file
    next_report = every
    for start in range(0, len(lines), batch_lines):
        ids: List[int] = []
        for seq in tokenizer(lines[start:start + batch_lines])["input_ids"]:
            ids.extend(seq)
        parts.append(torch.tensor(ids, dtype=torch.long))  # a tensor per batch: 8 bytes a token, not a list's 36
        count += len(ids)
        done = min(start + batch_lines, len(lines))
        if len(lines) > 2 * batch_lines and done >= next_report:
            say(f"{path}: tokenized {done} of {len(lines)} lines ({count} tokens)")
            next_report += every
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def group_blocks(ids, block_size: int):
    """``ids`` cut into consecutive blocks of ``block_size`` tokens, the remainder dropped (``run_clm.py``'s
    ``group_texts``): a ``(blocks, block_size)`` tensor."""
    n = (ids.numel() // block_size) * block_size
    return ids[:n].view(-1, block_size)


class BlockDataset:
    """Causal LM examples: each block is the input and its own label (the model shifts the labels)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        row = self.blocks[i]
        return {"input_ids": row, "labels": row}


def load_blocks(args, tokenizer, say=print):
    """(train blocks, eval blocks) from ``--train-file`` and ``--validation-file`` (or the held-out share)."""
    train = group_blocks(tokenize_file(tokenizer, args.train_file, "--train-file", say), args.block_size)
    if args.validation_file is not None:
        valid = group_blocks(tokenize_file(tokenizer, args.validation_file, "--validation-file", say),
                             args.block_size)
        if valid.shape[0] == 0:
            raise UsageError(f"--validation-file {args.validation_file}: fewer tokens than one block "
                             f"(--block-size {args.block_size})")
    else:
        n_valid = max(1, int(train.shape[0] * args.validation_split_percentage / 100.0))
        if train.shape[0] < n_valid + 1:
            raise UsageError(f"--train-file {args.train_file}: {train.shape[0]} blocks of {args.block_size} tokens, "
                             f"too few to hold out a validation block; give --validation-file or more text")
        train, valid = train[:-n_valid], train[-n_valid:]
    if train.shape[0] == 0:
        raise UsageError(f"--train-file {args.train_file}: fewer tokens than one block (--block-size "
                         f"{args.block_size})")
    return train, valid


# ----------------------------------------------------------------------------- model and loss


def load_model_and_tokenizer(args):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"--tokenizer {source}: cannot load a tokenizer: {str(err).splitlines()[0]}") from None
    try:
        if args.config is not None:
            config = AutoConfig.from_pretrained(args.config)
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError, KeyError) as err:
        flag, value = ("--config", args.config) if args.config is not None else ("--model", args.model)
        raise UsageError(f"{flag} {value}: cannot load a causal LM: {str(err).splitlines()[0]}") from None
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only {vocab}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and args.block_size > limit:
        raise UsageError(f"--block-size {args.block_size} is longer than the model's {limit} positions")
    return model, tokenizer


class BonusSchedule:
    """Sets the bonus weight in force on the training loss at each optimizer step: ``bonus_rho_at(rho, epoch,
    defer_start)`` (EL_SPEC 2.1; the bonus off for the first ``--defer-start`` epochs), ``epoch`` being the
    1-based epoch the step belongs to. A ``transformers.TrainerCallback`` (made by :func:`schedule_callback`)."""

    def __init__(self, set_rho, rho: float, defer_start: int):
        self.set_rho, self.rho, self.defer_start = set_rho, rho, defer_start
        self.current = None

    def rho_in_epoch(self, epoch: int) -> float:
        from encouraging_loss import bonus_rho_at

        return bonus_rho_at(self.rho, max(1, epoch), defer_start=self.defer_start)

    def rho_after(self, epoch_float: float) -> float:
        """The weight that was in force in the step that ended at ``state.epoch == epoch_float``."""
        return self.rho_in_epoch(math.ceil(epoch_float - 1e-6))

    def update(self, epoch_float: float) -> None:
        rho = self.rho_in_epoch(math.floor((epoch_float or 0.0) + 1e-6) + 1)
        if rho != self.current:
            self.set_rho(rho)
            self.current = rho


def schedule_callback(schedule: BonusSchedule):
    from transformers import TrainerCallback

    class BonusScheduleCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            schedule.update(state.epoch or 0.0)

        def on_step_begin(self, args, state, control, **kwargs):
            schedule.update(state.epoch or 0.0)

    return BonusScheduleCallback()


def make_trainer_class():
    from transformers import Trainer

    class ELTrainer(Trainer):
        """``Trainer`` whose evaluation loss is the library's own (next-token cross-entropy) even when the
        training loss is ``compute_loss_func``: ``eval_loss`` and the perplexity then compare CE and EL runs."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training or self.compute_loss_func is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            saved, self.compute_loss_func = self.compute_loss_func, None
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                self.compute_loss_func = saved

    return ELTrainer


def setup_loss(args, el_kwargs: Optional[dict], model):
    """The training loss: ``(compute_loss_func or None, set_rho or None, description)``.

    ``--loss ce`` without smoothing: the model's own loss; with ``--smoothing``: EL at ``bonus_rho=0`` (that is
    label-smoothed CE). ``--fused-projection``: :func:`transformers_el.fused.enable_fused_el` on the model (the
    model's training forward returns the loss), else :class:`transformers_el.loss.EncouragingLMLoss`.
    """
    kwargs = dict(el_kwargs) if el_kwargs is not None else (
        {"bonus_rho": 0.0, "smoothing": args.smoothing} if (args.smoothing or args.fused_projection) else None)
    if kwargs is None:
        return None, None, "cross-entropy (the model's own loss)"
    what = "Encouraging Loss" if el_kwargs is not None else f"cross-entropy, label smoothing {args.smoothing}"
    if args.fused_projection:
        from .fused import enable_fused_el, fused_el_settings

        try:
            enable_fused_el(model, **kwargs)
        except ValueError as err:
            raise UsageError(f"--fused-projection: {err}") from None

        def set_rho(rho):
            fused_el_settings(model).bonus_rho = rho

        return None, set_rho, f"{what}, fused with the output projection"
    from .loss import EncouragingLMLoss

    loss = EncouragingLMLoss(**kwargs)

    def set_rho(rho):
        loss.bonus_rho = rho

    return loss, set_rho, f"{what}, from the logits"


# ----------------------------------------------------------------------------- results


def write_curve(path: Path, log_history: Sequence[dict], schedule: Optional[BonusSchedule]) -> None:
    """``curve.csv``: one row per logged step (train loss, learning rate, eval loss where evaluated; an
    evaluation at a logged step shares its row), in step order, with the bonus weight in force."""
    rows = {}
    for entry in log_history:
        if "train_runtime" in entry or ("loss" not in entry and "eval_loss" not in entry):
            continue
        row = rows.setdefault(entry.get("step", 0), {"step": entry.get("step", 0)})
        epoch = float(entry.get("epoch") or 0.0)
        row["epoch"] = f"{epoch:.6f}"
        row["bonus_rho"] = schedule.rho_after(epoch) if schedule is not None else 0.0
        for key, column in (("loss", "train_loss"), ("eval_loss", "eval_loss"), ("learning_rate", "learning_rate")):
            if key in entry:
                row[column] = entry[key]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows[step] for step in sorted(rows))
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def task_name(args) -> str:
    if args.task:
        return args.task
    if args.config is not None:
        return "clm/" + Path(args.config).stem
    name = args.model.rstrip("/\\")
    return "clm/" + (Path(name).name if os.path.isdir(name) else name)


def perplexity(eval_loss: float) -> float:
    """``exp(eval_loss)``, the per-token perplexity (capped at ``exp(230)``, within the records' limit)."""
    return math.exp(min(eval_loss, MAX_LOG_PERPLEXITY))


# ----------------------------------------------------------------------------- main


def run(args, el_kwargs: Optional[dict], training_args, resume, say=print) -> dict:
    """Train, evaluate, save; the ``el-result/1`` record (also written to ``output_dir/result.json``)."""
    from transformers import default_data_collator, set_seed

    out = Path(training_args.output_dir)
    set_seed(training_args.seed)  # before the model: a model from --config starts from this seed
    model, tokenizer = load_model_and_tokenizer(args)
    train_blocks, eval_blocks = load_blocks(args, tokenizer, say)
    say(f"data: {train_blocks.shape[0]} training and {eval_blocks.shape[0]} validation blocks of "
        f"{args.block_size} tokens")
    compute_loss_func, set_rho, what = setup_loss(args, el_kwargs, model)
    schedule = None
    callbacks = []
    if el_kwargs is not None:
        schedule = BonusSchedule(set_rho, el_kwargs["bonus_rho"], args.defer_start)
        callbacks.append(schedule_callback(schedule))
    say(f"training loss: {what}" + (f"; {el_kwargs}" if el_kwargs is not None else "")
        + (f"; resuming from {resume}" if resume else ""))
    trainer = make_trainer_class()(
        model=model, args=training_args, train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks), data_collator=default_data_collator, processing_class=tokenizer,
        compute_loss_func=compute_loss_func, callbacks=callbacks)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    trainer.save_model()
    metrics = trainer.evaluate()
    eval_loss = float(metrics["eval_loss"])
    ppl = perplexity(eval_loss)
    write_curve(out / "curve.csv", trainer.state.log_history, schedule)
    record = {
        "schema": SCHEMA, "task": task_name(args), "loss": RECORD_LOSS[args.loss], "seed": training_args.seed,
        "run": out.name, "checkpoint": CHECKPOINT,
        "metrics": {"eval_loss": eval_loss, "perplexity": ppl, "train_loss": float(result.training_loss)},
        "info": {
            "model": args.model, "config": args.config, "tokenizer": args.tokenizer or args.model,
            "train_file": args.train_file, "validation_file": args.validation_file, "block_size": args.block_size,
            "train_blocks": int(train_blocks.shape[0]), "eval_blocks": int(eval_blocks.shape[0]),
            "el": el_kwargs, "defer_start": getattr(args, "defer_start", None) if el_kwargs else None,
            "smoothing": args.smoothing, "fused_projection": args.fused_projection,
            "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "train_wall_s": round(wall, 1),
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "resumed_from": resume, "eval_loss_is": "next-token cross-entropy",
        },
        "curve": "curve.csv",
    }
    write_json(out / "result.json", record)
    say(f"eval loss {eval_loss:.4f}, perplexity {ppl:.2f} ({eval_blocks.numel()} validation tokens); "
        f"train loss {result.training_loss:.4f}; {out / 'result.json'}")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = split_extra(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        hint = "; TrainingArguments flags go after --" if unknown[0].startswith("--") and "_" in unknown[0] else ""
        parser.error(f"unrecognized argument {unknown[0]!r}{hint}")
    try:
        el_kwargs = check_args(args)
        training_args, overwrite = parse_training_args(extra)
        resume = resolve_resume(training_args, overwrite or args.overwrite_output_dir)
        run(args, el_kwargs, training_args, resume, say=lambda line: print(line, flush=True))
    except (UsageError, FileProblem) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; -- --resume_from_checkpoint last continues from the last saved checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
