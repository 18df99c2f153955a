"""Average the parameters of fairseq checkpoints (the paper's "average the
last 10 checkpoints" before decoding, EL_SPEC section 4).

    python -m fairseq_el.average_checkpoints --run-dir RUN --last 10 --epochs --output RUN/checkpoint_avg_last10.pt
    python -m fairseq_el.average_checkpoints --run-dir RUN --last 5 --updates --output RUN/checkpoint_avg_upd5.pt
    python -m fairseq_el.average_checkpoints --inputs a.pt b.pt c.pt --output avg.pt

How (our own code, not fairseq's ``scripts/average_checkpoints.py``):

* one input checkpoint is in memory at a time: each is loaded, checked
  against the first and added into a float64 accumulator, then released;
* the mean (sum / n, in float64) is written in float32 for half-precision
  parameters (float16, bfloat16: what ``fairseq-train --fp16`` / ``--bf16``
  saves), as fairseq's ``scripts/average_checkpoints.py`` does, and in the
  parameter's own dtype otherwise (float32, float64, complex); with
  ``keep_dtype`` (``--keep-dtype``) every mean is cast back to its input dtype
  (a float16 mean then differs from the exact one by up to half a float16 ulp).
  Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are
  not averaged: the last input's value is kept;
* inputs whose model configuration, parameter names, shapes or dtypes differ
  are refused, naming the first difference: which checkpoint, which key,
  both values;
* the output is the last input (its ``cfg`` / ``args``, so stock
  ``fairseq-generate`` loads it) with the averaged model, without optimizer
  state; its ``extra_state["averaged_checkpoints"]`` lists the averaged files;
* an existing output is never overwritten unless ``force``; the file is
  written through a temporary name, so a killed run leaves no half file.

Checkpoints are read with ``torch.load(weights_only=True)`` passed explicitly
(:func:`fairseq_el.compat.read_checkpoint`, with the types fairseq
checkpoints hold allowed), so a file that would run code when unpickled is
refused whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. A bad input is
named in one line with what is wrong with it: not found, not a checkpoint,
truncated, refused, no model in it, or parameters that differ from the
first input's.
"""
import argparse
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from encouraging_loss.tools.cli import HelpFormatter, Parser
from encouraging_loss.tools.files import FileProblem, atomic_path, check_writable_dir, os_error_line

__all__ = [
    "CheckpointMismatch",
    "KINDS",
    "output_dtype",
    "average_checkpoints",
    "find_checkpoints",
    "model_config",
    "main",
]

#: ``--epochs``: checkpointE.pt; ``--updates``: checkpoint_E_U.pt
KINDS = {
    "epochs": re.compile(r"^checkpoint(?P<epoch>\d+)\.pt$"),
    "updates": re.compile(r"^checkpoint_(?P<epoch>\d+)_(?P<update>\d+)\.pt$"),
}

#: legacy (``args``-only) checkpoints: the keys that describe the model
_LEGACY_MODEL_KEY = re.compile(
    r"^(arch|(encoder|decoder)_.*|share_.*|activation_.*|adaptive_.*|.*dropout|layernorm_embedding|"
    r"no_token_positional_embeddings|no_scale_embedding|cross_self_attention|no_cross_attention|"
    r"tie_adaptive_weights|max_(source|target)_positions|quant_noise_.*)$"
)


class CheckpointMismatch(ValueError):
    """The inputs cannot be averaged; the message names the first difference."""


def output_dtype(dtype, keep_dtype: bool = False):
    """The dtype the mean of parameters of ``dtype`` is written in: float32 for float16 and
    bfloat16 unless ``keep_dtype``, else ``dtype`` itself."""
    import torch

    if not keep_dtype and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def find_checkpoints(run_dir, last: int, kind: str = "epochs", upper_bound: Optional[int] = None) -> List[str]:
    """The ``last`` checkpoints of a fairseq run directory with the highest
    epoch (``kind="epochs"``: ``checkpointE.pt``) or update count
    (``kind="updates"``: ``checkpoint_E_U.pt``), oldest first; with
    ``upper_bound``, only those at or below that epoch / update count.

    Raises ``FileNotFoundError`` for a missing directory and ``ValueError``
    when fewer than ``last`` are there (the message lists what was found)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such directory")
    pattern = KINDS[kind]
    found = []
    for name in os.listdir(run_dir):
        match = pattern.match(name)
        if match is None:
            continue
        number = int(match.group("update" if kind == "updates" else "epoch"))
        if upper_bound is not None and number > upper_bound:
            continue
        found.append((number, name))
    found.sort()
    if len(found) < last:
        what = "epoch checkpoints (checkpointE.pt)" if kind == "epochs" else "update checkpoints (checkpoint_E_U.pt)"
        bound = f" at or below {upper_bound}" if upper_bound is not None else ""
        listed = ", ".join(name for _, name in found) if found else "none"
        raise ValueError(f"asked for the last {last} {what}{bound} in {run_dir}, found {len(found)}: {listed}")
    return [os.path.join(run_dir, name) for _, name in found[-last:]]


def _load(path, i: int = 0):
    """A checkpoint under ``weights_only=True`` (:func:`fairseq_el.compat.read_checkpoint`),
    memory-mapped where the file format allows (tensors are then read from disk as they are used,
    so the optimizer state a training checkpoint carries is never read). Raises
    :class:`~encouraging_loss.tools.files.FileProblem` naming the file."""
    from fairseq_el.compat import read_checkpoint

    return read_checkpoint(path, f"checkpoint {i + 1}")


def _as_dict(cfg_part) -> Optional[Dict[str, object]]:
    if cfg_part is None:
        return None
    if isinstance(cfg_part, argparse.Namespace):
        return dict(vars(cfg_part))
    if isinstance(cfg_part, dict):
        return dict(cfg_part)
    try:  # an omegaconf DictConfig (checkpoints written by other tools)
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg_part, resolve=False)
    except Exception:  # pragma: no cover - unknown container
        return {"repr": repr(cfg_part)}


def model_config(state) -> Dict[str, object]:
    """The settings that define a checkpoint's model, as a flat dict.

    fairseq 0.12 stores ``cfg["model"]``: for ``--arch`` models built from
    legacy arguments it is the whole ``argparse.Namespace`` of the run
    (optimizer, data, checkpointing flags included); the keys that belong to
    another config group (``cfg["optimization"]``, ``cfg["checkpoint"]``, ...)
    or name one (``optimizer``, ``criterion``, ...) are dropped, so a run
    resumed with, say, a longer ``--max-update`` still averages. A
    dataclass model config is compared whole. A legacy checkpoint with only
    ``args`` is compared on the architecture keys (``arch``, ``encoder_*``,
    ``decoder_*``, ``share_*``, dropouts, ...)."""
    cfg = state.get("cfg")
    if cfg is not None:
        cfg = _as_dict(cfg)
        model = cfg.get("model")
        if isinstance(model, argparse.Namespace):
            values = dict(vars(model))
            other = set()
            for group, part in cfg.items():
                if group == "model":
                    continue
                other.add(group)
                part = _as_dict(part) if not isinstance(part, (str, int, float, bool)) else None
                if isinstance(part, dict):
                    other.update(part)
            return {k: v for k, v in values.items() if k not in other}
        model = _as_dict(model)
        if model is not None:
            return model
    args = state.get("args")
    if isinstance(args, argparse.Namespace):
        return {k: v for k, v in vars(args).items() if _LEGACY_MODEL_KEY.match(k)}
    return {}


def _describe(i: int, path) -> str:
    return f"checkpoint {i + 1} ({path})"


def _fmt(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_config(ref, ref_path, cfg, i, path) -> None:
    for key in list(ref) + [k for k in cfg if k not in ref]:
        if key not in cfg:
            raise CheckpointMismatch(
                f"model configuration differs: {_describe(i, path)} has no {key!r}, "
                f"{_describe(0, ref_path)} has {key}={_fmt(ref[key])}")
        if key not in ref:
            raise CheckpointMismatch(
                f"model configuration differs: {_describe(i, path)} has {key}={_fmt(cfg[key])}, "
                f"{_describe(0, ref_path)} has no {key!r}")
        if cfg[key] != ref[key]:
            raise CheckpointMismatch(
                f"model configuration differs: {key}={_fmt(cfg[key])} in {_describe(i, path)}, "
                f"{key}={_fmt(ref[key])} in {_describe(0, ref_path)}")


def _check_params(ref, ref_path, model, i, path) -> None:
    missing = [k for k in ref if k not in model]
    extra = [k for k in model if k not in ref]
    if missing:
        also = f"; it has {len(extra)} parameter(s) that one lacks, first {extra[0]!r}" if extra else ""
        raise CheckpointMismatch(
            f"parameter names differ: {_describe(i, path)} has no parameter {missing[0]!r}, "
            f"which {_describe(0, ref_path)} has{also}")
    if extra:
        raise CheckpointMismatch(
            f"parameter names differ: {_describe(i, path)} has parameter {extra[0]!r}, "
            f"which {_describe(0, ref_path)} lacks")
    for key, (shape, dtype) in ref.items():
        tensor = model[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointMismatch(
                f"parameter shapes differ: {key!r} is {tuple(tensor.shape)} in {_describe(i, path)}, "
                f"{shape} in {_describe(0, ref_path)}")
        if tensor.dtype != dtype:
            raise CheckpointMismatch(
                f"parameter dtypes differ: {key!r} is {tensor.dtype} in {_describe(i, path)}, "
                f"{dtype} in {_describe(0, ref_path)}")


def average_checkpoints(
    paths: Sequence,
    output=None,
    force: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    keep_dtype: bool = False,
) -> dict:
    """Average the model parameters of ``paths`` and write them to ``output``
    (module docstring: how, what is checked, what the output holds).

    The mean of float16 and bfloat16 parameters is written in float32 unless
    ``keep_dtype``, which casts every mean back to its input's dtype.

    Returns a summary: ``{"output", "inputs", "n", "num_updates",
    "n_tensors", "n_averaged", "widened", "seconds"}``; ``widened`` counts
    the half-precision tensors written as float32. With ``output=None`` nothing is
    written and the summary also holds ``"state"`` (the output checkpoint as
    a dict).

    Raises ``FileNotFoundError`` (an input is missing), ``FileExistsError``
    (``output`` exists and not ``force``), ``ValueError`` (no inputs, an input
    given twice, the output among the inputs),
    :class:`~encouraging_loss.tools.files.FileProblem` (an input that is not a readable,
    safe checkpoint; the message names it) and :class:`CheckpointMismatch`.
    """
    import torch

    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoints to average")
    real = [os.path.realpath(p) for p in paths]
    for i, p in enumerate(real):
        if p in real[:i]:
            raise ValueError(f"{paths[i]} is given twice")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such file")
    if output is not None:
        output = os.fspath(output)
        if os.path.realpath(output) in real:
            raise ValueError(f"the output {output} is one of the inputs")
        if os.path.exists(output) and not force:
            raise FileExistsError(f"{output} exists; pass force=True (--force) to overwrite it")
    say = progress or (lambda message: None)
    start = time.time()
    n = len(paths)
    acc: Dict[str, "torch.Tensor"] = {}
    ref_params: Dict[str, tuple] = {}
    ref_config: Dict[str, object] = {}
    num_updates = []
    last_state = None
    for i, path in enumerate(paths):
        state = _load(path, i)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointMismatch(f"{_describe(i, path)} holds no 'model' state dict; is it a fairseq checkpoint?")
        model = state["model"]
        odd = next((k for k, v in model.items() if not isinstance(v, torch.Tensor)), None)
        if odd is not None:
            raise CheckpointMismatch(f"{_describe(i, path)}: its 'model' holds {type(model[odd]).__name__} under "
                                     f"{odd!r}, not a tensor; is it a fairseq checkpoint?")
        config = model_config(state)
        if i == 0:
            ref_config = config
            ref_params = {k: (tuple(v.shape), v.dtype) for k, v in model.items()}
        else:
            _check_config(ref_config, paths[0], config, i, path)
            _check_params(ref_params, paths[0], model, i, path)
        for key, tensor in model.items():
            if tensor.is_floating_point() or tensor.is_complex():
                wide = torch.complex128 if tensor.is_complex() else torch.float64
                if key in acc:
                    acc[key].add_(tensor.to(wide))
                else:
                    acc[key] = tensor.to(wide, copy=True)
        history = state.get("optimizer_history") or [{}]
        num_updates.append(history[-1].get("num_updates"))
        say(f"[{i + 1}/{n}] added {path} (num_updates {num_updates[-1]})")
        if i == n - 1:
            last_state = state
        del state, model  # one input checkpoint in memory at a time
    averaged = {}
    n_averaged = n_widened = 0
    views = {}  # tied parameters (shared embeddings) stay one tensor in the output
    for key, tensor in last_state["model"].items():
        if key in acc:
            dtype = output_dtype(tensor.dtype, keep_dtype)
            mean = acc.pop(key).div_(n).to(dtype)
            n_averaged += 1
            n_widened += dtype != tensor.dtype
            view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tensor.stride(), tensor.dtype)
            if view in views and torch.equal(views[view], mean):
                mean = views[view]
            views.setdefault(view, mean)
            averaged[key] = mean
        else:
            averaged[key] = tensor  # integer counters: the last input's value
    out = {k: v for k, v in last_state.items() if k not in ("model", "last_optimizer_state")}
    out["model"] = averaged
    extra = dict(out.get("extra_state") or {})
    extra.pop("metrics", None)  # the last input's meters; they describe no averaged model
    extra["averaged_checkpoints"] = [os.path.abspath(p) for p in paths]
    out["extra_state"] = extra
    summary = {
        "output": output,
        "inputs": [os.path.abspath(p) for p in paths],
        "n": n,
        "num_updates": num_updates,
        "n_tensors": len(averaged),
        "n_averaged": n_averaged,
        "widened": n_widened,
    }
    if output is None:
        summary["state"] = out
    else:
        directory = os.path.dirname(os.path.abspath(output))
        os.makedirs(directory, exist_ok=True)
        with atomic_path(output) as tmp:
            torch.save(out, tmp)
        say(f"wrote {output}")
    summary["seconds"] = round(time.time() - start, 3)
    return summary


def main(argv=None) -> int:
    parser = Parser(
        prog="python -m fairseq_el.average_checkpoints",
        description="Average the parameters of fairseq checkpoints in float64, one input in memory at a "
        "time: the last N epoch or update checkpoints of a run, or an explicit list. Refuses inputs "
        "whose model configuration, parameter names, shapes or dtypes differ. Half-precision "
        "parameters (float16, bfloat16: fairseq-train --fp16/--bf16) are written in float32, as fairseq's "
        "scripts/average_checkpoints.py does, unless --keep-dtype. The output keeps the "
        "last input's configuration (stock fairseq-generate loads it; pass --user-dir "
        "\"$(python -m fairseq_el --user-dir)\") and no optimizer state.",
        formatter_class=HelpFormatter,
    )
    src = parser.add_argument_group("inputs (either --run-dir with --last, or --inputs)")
    src.add_argument("--run-dir", default=None, help="a fairseq --save-dir")
    src.add_argument("--last", type=int, default=None, help="average the N checkpoints with the highest epoch / update")
    kind = src.add_mutually_exclusive_group()
    kind.add_argument("--epochs", dest="kind", action="store_const", const="epochs",
                      help="pick epoch checkpoints, checkpointE.pt (the default)")
    kind.add_argument("--updates", dest="kind", action="store_const", const="updates",
                      help="pick update checkpoints, checkpoint_E_U.pt (--save-interval-updates)")
    src.add_argument("--upper-bound", type=int, default=None,
                     help="ignore checkpoints above this epoch (--epochs) or update count (--updates)")
    src.add_argument("--inputs", nargs="+", default=None, metavar="CKPT", help="explicit checkpoint files")
    parser.add_argument("--output", required=True, help="the averaged checkpoint to write")
    parser.add_argument("--keep-dtype", action="store_true",
                        help="write every mean in its input's dtype; by default the mean of float16 and "
                             "bfloat16 parameters is written in float32 (no rounding to half precision; "
                             "the file is then about twice as large)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(kind=None)
    args = parser.parse_args(argv)

    if args.inputs is not None:
        for flag in ("run_dir", "last", "upper_bound", "kind"):
            if getattr(args, flag) is not None:
                name = {"kind": "--epochs/--updates"}.get(flag, "--" + flag.replace("_", "-"))
                parser.error(f"{name} goes with --run-dir, not with --inputs")
        paths = args.inputs
    else:
        if args.run_dir is None:
            parser.error("give --run-dir RUN --last N (--epochs or --updates), or --inputs CKPT [CKPT ...]")
        if args.last is None:
            parser.error(f"--run-dir {args.run_dir} needs --last N")
        if args.last < 1:
            parser.error(f"--last must be >= 1, got {args.last}")
        if args.upper_bound is not None and args.upper_bound < 0:
            parser.error(f"--upper-bound must be >= 0, got {args.upper_bound}")
        try:
            paths = find_checkpoints(args.run_dir, args.last, args.kind or "epochs", args.upper_bound)
        except FileNotFoundError:
            parser.error(f"--run-dir {args.run_dir}: no such directory")
        except ValueError as err:
            parser.error(f"--last {args.last}: {err}")
    if os.path.exists(args.output) and not args.force:
        parser.error(f"--output {args.output} exists; pass --force to overwrite it")
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output}: is a folder")
    try:  # before reading any input: averaging can take minutes
        check_writable_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    except FileProblem as err:
        parser.error(str(err))
    progress = None if args.quiet else (lambda message: print(message, flush=True))
    try:
        summary = average_checkpoints(paths, args.output, force=args.force, progress=progress,
                                      keep_dtype=args.keep_dtype)
    except FileNotFoundError as err:
        parser.error(f"--inputs: {err}")
    except FileExistsError:
        parser.error(f"--output {args.output} exists; pass --force to overwrite it")
    except FileProblem as err:
        parser.error(f"refusing to average: {err}")
    except CheckpointMismatch as err:
        parser.error(f"refusing to average: {err}")
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(os_error_line(err, args.output))
    except Exception as err:  # unreadable input (not a checkpoint, truncated, disallowed type)
        parser.error(f"could not average: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if not args.quiet:
        widened = (f"; {summary['widened']} half-precision tensors written as float32 (--keep-dtype keeps "
                   f"their dtype)" if summary["widened"] else "")
        print(f"averaged {summary['n']} checkpoints ({summary['n_averaged']} tensors{widened}) in "
              f"{summary['seconds']:.1f}s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
