"""Decode a checkpoint with stock ``fairseq-generate`` and score it: the
paper's tokenized BLEU and detokenized sacreBLEU, one JSON record per run
and checkpoint (issue 7, item 4; EL_SPEC section 4: beam 5, ``--remove-bpe``,
tokenized BLEU).

    python -m fairseq_el.evaluate --data PREP_OUT --checkpoint RUN/checkpoint_avg_last10.pt \\
        --tag avg_last10 --loss el --seed 1 --output RUN/eval/avg_last10.json

``PREP_OUT`` is what the data preparation wrote: ``prep.json``, ``bin/``
(binarized) and ``text/``. What happens:

1. ``fairseq-generate BIN --user-dir <fairseq_el> --path CKPT --beam 5
   --gen-subset test --remove-bpe <prep.json remove_bpe> --batch-size 128``
   (``--cpu`` without CUDA; flags after ``--`` are passed on), its whole
   output kept in ``<record>.generate.txt``;
2. the ``H-`` (hypothesis) and ``T-`` (reference) lines, by sentence id;
3. **tokenized BLEU** (the paper's number): for Moses-tokenized data
   (``prep.json moses_tokenized``, IWSLT14) hypotheses and references as
   they are, BLEU with no further tokenization and no smoothing
   (sacrebleu ``tokenize='none'``, = ``multi-bleu.perl``); it equals the
   ``BLEU4`` line fairseq-generate prints (a warning says so when it does
   not, within 0.01). For untokenized data (sentencepiece pipelines) both
   sides are Moses-tokenized with sacremoses first;
4. **detokenized sacreBLEU** with its signature: the hypotheses
   (detokenized with sacremoses for Moses-tokenized data) against the raw
   references named in ``prep.json references[<subset>]``, else against the
   (detokenized) ``T-`` lines; lowercased (``case:lc``) when the data was
   lowercased, since the hypotheses are;
5. the record (schema ``el-result/1``, below) and the hypotheses
   (``<record>.hyp``: the ``H-`` lines in sentence order; ``<record>.detok.hyp``:
   what sacreBLEU scored).

Record::

    {"schema": "el-result/1", "task": ..., "loss": ..., "seed": ..., "run": ..., "checkpoint": TAG,
     "metrics": {"bleu": tokenized BLEU, "sacrebleu": detokenized sacreBLEU},
     "info": {"sacrebleu_signature", "n_sentences", "checkpoint_path", "generate_cmd",
              "hypotheses" (relative to the record), "bleu_fairseq",
              "subset", "data_set" (prep.json's <subset>_set, e.g. IWSLT17.TED.tst2017; null if not recorded)},
     "curve": CSV relative to the record (only with --curve)}

An existing record is never overwritten without ``--force``; when it is
newer than the checkpoint the run is skipped (exit 0). The record and the
hypotheses are written through temporary names, so an interrupted run leaves
no record behind.

The checkpoint is read with ``torch.load(weights_only=True)`` first (passed
explicitly): a file that would run code when unpickled, a truncated file or
one that is not a checkpoint is refused with one line before fairseq-generate
sees it (which the plugin protects the same way, see :mod:`fairseq_el.compat`).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import HelpFormatter, Parser, split_extra
from encouraging_loss.tools.files import FileProblem, atomic_write, write_json

from .prep_common import read_prep_json

__all__ = [
    "SCHEMA",
    "PREP_SCHEMA",
    "GenerateOutput",
    "parse_generate_output",
    "read_prep",
    "tokenized_bleu",
    "detokenized_sacrebleu",
    "score",
    "generate_command",
    "resolve_curve",
    "evaluate",
    "main",
]

SCHEMA = "el-result/1"
PREP_SCHEMA = "el-prep/1"
REMOVE_BPE = ("subword_nmt", "sentencepiece")
#: flags this module sets itself (or that change what H-/T- lines mean); refused after "--"
OWN_FLAGS = ("--path", "--gen-subset", "--remove-bpe", "--post-process", "--beam", "--user-dir",
             "--tokenizer", "--bpe", "--results-path", "--source-lang", "--target-lang", "-s", "-t",
             "--quiet")
FAIRSEQ_TOLERANCE = 0.01

_BLEU_LINE = re.compile(
    r"^Generate (?P<subset>\S+) with beam=(?P<beam>\d+): BLEU(?P<order>\d*) = (?P<bleu>[\d.]+)"
    r"(?:, (?P<prec>[\d./]+) \(BP=(?P<bp>[\d.]+), ratio=(?P<ratio>[\d.]+), syslen=(?P<sys>\d+), "
    r"reflen=(?P<ref>\d+)\))?"
)
_LOADED = re.compile(r"loaded ([\d,]+) examples from: ")


class EvaluationError(RuntimeError):
    """A failure with a one-line message for the command line."""


class GenerateOutput:
    """What :func:`parse_generate_output` reads from fairseq-generate's output."""

    def __init__(self):
        self.hypotheses: Dict[int, str] = {}
        self.references: Dict[int, str] = {}
        self.bleu_fairseq: Optional[float] = None
        #: the rest of fairseq's BLEU line: precisions (%), bp, ratio, sys_len, ref_len
        self.fairseq_stats: Dict[str, object] = {}

    def ids(self) -> List[int]:
        return sorted(self.hypotheses)


def parse_generate_output(lines: Iterable[str]) -> GenerateOutput:
    """Read ``H-<id>\\t<score>\\t<text>`` (the first, best one per id),
    ``T-<id>\\t<text>`` and the ``Generate <subset> with beam=K: BLEU4 = ...``
    line from fairseq-generate's output (a file's lines, stdout and stderr
    together)."""
    out = GenerateOutput()
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("H-"):
            parts = line.split("\t", 2)
            if len(parts) >= 2 and parts[0][2:].isdigit():
                i = int(parts[0][2:])
                if i not in out.hypotheses:  # --nbest > 1: keep the best
                    out.hypotheses[i] = parts[2] if len(parts) == 3 else ""
        elif line.startswith("T-"):
            parts = line.split("\t", 1)
            if parts[0][2:].isdigit():
                out.references[int(parts[0][2:])] = parts[1] if len(parts) == 2 else ""
        elif line.startswith("Generate "):
            match = _BLEU_LINE.match(line)
            if match is not None:
                out.bleu_fairseq = float(match.group("bleu"))
                if match.group("prec"):
                    out.fairseq_stats = {
                        "precisions": [float(p) for p in match.group("prec").split("/")],
                        "bp": float(match.group("bp")),
                        "ratio": float(match.group("ratio")),
                        "sys_len": int(match.group("sys")),
                        "ref_len": int(match.group("ref")),
                    }
    return out


def read_prep(data_dir) -> dict:
    """``DATA/prep.json``, checked: schema, the keys evaluation needs, a
    known ``remove_bpe``. Raises :class:`EvaluationError`."""
    path = os.path.join(data_dir, "prep.json")
    if not os.path.isfile(path):
        raise EvaluationError(f"--data {data_dir}: no prep.json there (run the data preparation first)")
    try:
        prep = read_prep_json(data_dir, "--data")
    except FileProblem as err:
        raise EvaluationError(str(err)) from None
    if prep.get("schema") != PREP_SCHEMA:
        raise EvaluationError(f"--data {data_dir}: prep.json schema is {prep.get('schema')!r}, "
                              f"expected {PREP_SCHEMA!r}")
    for key in ("src", "tgt", "remove_bpe", "moses_tokenized"):
        if key not in prep:
            raise EvaluationError(f"--data {data_dir}: prep.json has no {key!r}")
    for key in ("src", "tgt"):
        if not isinstance(prep[key], str) or not re.fullmatch(r"[\w.-]+", prep[key]):
            raise EvaluationError(f"--data {data_dir}: prep.json {key} is {prep[key]!r}, expected a language code")
    references = prep.get("references")
    if references is not None and not (isinstance(references, dict)
                                       and all(isinstance(v, str) for v in references.values())):
        raise EvaluationError(f"--data {data_dir}: prep.json references is {references!r}, expected an object "
                              f"of file names")
    if not isinstance(prep["remove_bpe"], str) or prep["remove_bpe"] not in REMOVE_BPE:
        raise EvaluationError(f"--data {data_dir}: prep.json remove_bpe is {prep['remove_bpe']!r}, "
                              f"expected one of {', '.join(REMOVE_BPE)}")
    return prep


def _moses_tokenize(lines: Sequence[str], lang: str) -> List[str]:
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, return_str=True, escape=True) for line in lines]


def _moses_detokenize(lines: Sequence[str], lang: str) -> List[str]:
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split(), return_str=True, unescape=True) for line in lines]


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], moses_tokenized: bool = True,
                   lang: str = "en"):
    """The paper's tokenized BLEU: corpus BLEU-4 on whitespace tokens, no
    smoothing, one reference, case as is (``multi-bleu.perl``; fairseq's
    BLEU4). Untokenized text (``moses_tokenized=False``) is first Moses-
    tokenized on both sides. Returns sacrebleu's ``BLEUScore``."""
    from sacrebleu.metrics import BLEU

    hyps, refs = list(hypotheses), list(references)
    if not moses_tokenized:
        hyps, refs = _moses_tokenize(hyps, lang), _moses_tokenize(refs, lang)
    return BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(hyps, [refs])


def detokenized_sacrebleu(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False,
                          lang: str = "en") -> Tuple[object, str]:
    """Standard sacreBLEU (13a tokenization, exp smoothing; ``case:lc``
    with ``lowercase``) of detokenized text; returns ``(score, signature)``."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(lowercase=lowercase, trg_lang=lang)
    result = bleu.corpus_score(list(hypotheses), [list(references)])
    return result, str(bleu.get_signature())


def score(generated: GenerateOutput, prep: dict, raw_references: Optional[Sequence[str]] = None) -> dict:
    """Both BLEU figures of one decoding.

    ``raw_references``: the untokenized references of the whole subset (line
    i = sentence id i), from ``prep.json references``; without them the
    ``T-`` lines (detokenized for Moses-tokenized data) are the sacreBLEU
    references. Returns ``{"bleu", "sacrebleu", "sacrebleu_signature",
    "n_sentences", "bleu_fairseq", "bleu_stats", "hypotheses",
    "hypotheses_detok"}``. Raises :class:`EvaluationError` when the output
    has no hypotheses, a hypothesis has no reference, or the raw references
    do not match the translated sentences."""
    ids = generated.ids()
    if not ids:
        raise EvaluationError("fairseq-generate printed no hypotheses (H- lines)")
    lacking = [i for i in ids if i not in generated.references]
    if lacking:
        raise EvaluationError(f"fairseq-generate printed no reference (T- line) for sentence {lacking[0]} "
                              f"({len(lacking)} of {len(ids)} lack one): does --gen-subset have a target side?")
    tgt = prep.get("tgt", "en")
    moses = bool(prep.get("moses_tokenized"))
    hyps = [generated.hypotheses[i] for i in ids]
    refs = [generated.references[i] for i in ids]
    tok = tokenized_bleu(hyps, refs, moses_tokenized=moses, lang=tgt)
    hyps_detok = _moses_detokenize(hyps, tgt) if moses else hyps
    if raw_references is not None:
        raw = list(raw_references)
        if len(raw) != len(ids) or ids[-1] >= len(raw):
            raise EvaluationError(f"the raw references have {len(raw)} lines, fairseq-generate translated "
                                  f"{len(ids)} sentences (ids {ids[0]}..{ids[-1]})")
        refs_detok = [raw[i] for i in ids]
    else:
        refs_detok = _moses_detokenize(refs, tgt) if moses else refs
    sacre, signature = detokenized_sacrebleu(hyps_detok, refs_detok, lowercase=bool(prep.get("lowercase")), lang=tgt)
    return {
        "bleu": float(tok.score),
        "sacrebleu": float(sacre.score),
        "sacrebleu_signature": signature,
        "n_sentences": len(ids),
        "bleu_fairseq": generated.bleu_fairseq,
        "bleu_stats": {"precisions": [float(p) for p in tok.precisions], "bp": float(tok.bp),
                       "sys_len": int(tok.sys_len), "ref_len": int(tok.ref_len)},
        "hypotheses": hyps,
        "hypotheses_detok": hyps_detok,
    }


def _fairseq_tool(name: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


#: fairseq-generate's length limit for data prepared with ``--smoke`` (prep.json's ``smoke``): a barely trained
#: model may not end its sentences; hypotheses stop at source length x 1.2 + 10 tokens (flags after ``--`` win)
SMOKE_GENERATE = ["--max-len-a", "1.2", "--max-len-b", "10"]


def generate_command(bin_dir, checkpoint, prep: dict, gen_subset: str = "test", beam: int = 5,
                     batch_size: Optional[int] = 128, max_tokens: Optional[int] = None,
                     cpu: Optional[bool] = None, extra: Sequence[str] = ()) -> List[str]:
    """The stock fairseq-generate command line (see the module docstring)."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    user_dir = os.path.dirname(os.path.abspath(__file__))
    cmd = [_fairseq_tool("fairseq-generate"), os.path.abspath(bin_dir), "--user-dir", user_dir,
           "--path", os.path.abspath(checkpoint), "--source-lang", prep["src"], "--target-lang", prep["tgt"],
           "--gen-subset", gen_subset, "--beam", str(beam), "--remove-bpe", prep["remove_bpe"]]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if max_tokens is not None:
        cmd += ["--max-tokens", str(max_tokens)]
    if cpu:
        cmd.append("--cpu")
    if prep.get("smoke"):
        cmd += SMOKE_GENERATE
    return cmd + [str(a) for a in extra]


def _run_generate(cmd: List[str], log_path: str, say) -> List[str]:
    """Run fairseq-generate, its stdout and stderr into ``log_path`` (and
    returned as lines), with a progress line every 15 s."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    lines: List[str] = []
    total = None
    done = 0
    start = last = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", env=env, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if line.startswith("H-"):
                    done += 1
                elif total is None:
                    match = _LOADED.search(line)
                    if match:
                        total = int(match.group(1).replace(",", ""))
                now = time.time()
                if now - last >= 15:
                    last = now
                    say(f"  generate: {done}{'/' + str(total) if total else ''} sentences, {now - start:.0f}s")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = next((line.strip() for line in reversed(lines) if line.strip()), "")
        raise EvaluationError(f"fairseq-generate failed (exit {rc}; full output in {log_path}): {tail[-300:]}")
    say(f"  generate: {done} sentences in {time.time() - start:.0f}s")
    return lines


def _checkpoint_meta(checkpoint, what: str = "--checkpoint") -> dict:
    """Criterion and seed from the checkpoint's config (for --loss / --seed defaults), read with
    ``weights_only=True`` (:func:`fairseq_el.compat.read_checkpoint`). Raises
    :class:`~encouraging_loss.tools.files.FileProblem` (one line, ``WHAT PATH: ...``) for a file that is
    missing, hostile, truncated, not a checkpoint, or a checkpoint without a model."""
    from fairseq_el.compat import read_checkpoint

    state = read_checkpoint(checkpoint, what)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise FileProblem(f"{what} {checkpoint}: holds no 'model' state dict; not a fairseq checkpoint")
    cfg = state.get("cfg") or {}
    args = state.get("args")

    def get(group, key):
        part = cfg.get(group) if isinstance(cfg, dict) else None
        if isinstance(part, dict) and key in part:
            return part[key]
        if part is not None and hasattr(part, key):
            return getattr(part, key)
        return getattr(args, key, None) if args is not None else None

    criterion = get("criterion", "_name") or (getattr(args, "criterion", None) if args is not None else None)
    return {"criterion": criterion, "seed": get("common", "seed")}


def loss_label(criterion: Optional[str]) -> Optional[str]:
    """``el`` for the plugin criterion, ``ce`` for fairseq's (label-smoothed) cross-entropy."""
    if criterion is None:
        return None
    if criterion == "encouraging_label_smoothed_cross_entropy":
        return "el"
    if criterion in ("label_smoothed_cross_entropy", "cross_entropy"):
        return "ce"
    return criterion


def default_tag(checkpoint) -> str:
    """checkpoint_best.pt -> best, checkpoint_avg_last10.pt -> avg_last10, checkpoint7.pt -> epoch7."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    if stem.startswith("checkpoint_"):
        return stem[len("checkpoint_"):] or stem
    if re.fullmatch(r"checkpoint\d+", stem):
        return "epoch" + stem[len("checkpoint"):]
    return stem


def resolve_curve(curve, output) -> Optional[str]:
    """The curve CSV named by ``--curve``: relative to the record's directory
    (what the record will hold), else to the current directory; ``None``
    when it is in neither place."""
    # lexically: the record's directory may not exist yet (eval/../curve.csv)
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(output)), curve))
    if os.path.isfile(beside):
        return beside
    if os.path.isfile(curve):
        return os.path.abspath(curve)
    return None


def _stem(output: str) -> str:
    return output[:-len(".json")] if output.endswith(".json") else output


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")


def evaluate(data, checkpoint, output, *, tag: str, loss: str, seed: int, run: str, task: Optional[str] = None,
             gen_subset: str = "test", beam: int = 5, batch_size: Optional[int] = 128,
             max_tokens: Optional[int] = None, cpu: Optional[bool] = None, extra: Sequence[str] = (),
             curve=None, progress=None) -> dict:
    """Decode, score, write ``output`` (the record), ``<stem>.hyp``,
    ``<stem>.detok.hyp`` and ``<stem>.generate.txt``; returns the record.
    Overwrites whatever is there (the CLI decides about skipping)."""
    say = progress or (lambda message: None)
    prep = read_prep(data)
    bin_dir = os.path.join(data, prep.get("bin", "bin"))
    if not os.path.isdir(bin_dir):
        raise EvaluationError(f"--data {data}: no binarized data at {bin_dir}")
    src, tgt = prep["src"], prep["tgt"]
    if not any(os.path.isfile(os.path.join(bin_dir, f"{gen_subset}.{pair}.{tgt}{ext}"))
               for pair in (f"{src}-{tgt}", f"{tgt}-{src}") for ext in (".idx", "")):  # "": --dataset-impl raw
        raise EvaluationError(f"--gen-subset {gen_subset}: no binarized {gen_subset} split with target side "
                              f"in {bin_dir} (expected {gen_subset}.{src}-{tgt}.{tgt}.idx)")
    raw = None
    ref_name = (prep.get("references") or {}).get(gen_subset)
    if ref_name:
        ref_path = os.path.join(data, ref_name)
        if not os.path.isfile(ref_path):
            raise EvaluationError(f"--data {data}: prep.json names references {ref_name}, not there")
        try:
            # lines end at "\n" only, as the data preparation wrote them
            with open(ref_path, encoding="utf-8", newline="\n") as f:
                raw = [line.rstrip("\n").rstrip("\r") for line in f]
        except (OSError, UnicodeDecodeError) as err:
            raise EvaluationError(f"--data {data}: cannot read the references {ref_path} "
                                  f"({getattr(err, 'strerror', None) or err})") from None
    output = os.fspath(output)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    stem = _stem(output)
    cmd = generate_command(bin_dir, checkpoint, prep, gen_subset=gen_subset, beam=beam, batch_size=batch_size,
                           max_tokens=max_tokens, cpu=cpu, extra=extra)
    say(f"decoding {checkpoint} ({gen_subset}, beam {beam}); output in {stem}.generate.txt")
    lines = _run_generate(cmd, stem + ".generate.txt", say)
    generated = parse_generate_output(lines)
    scores = score(generated, prep, raw)
    if (prep.get("moses_tokenized") and scores["bleu_fairseq"] is not None
            and abs(scores["bleu"] - scores["bleu_fairseq"]) > FAIRSEQ_TOLERANCE):
        print(f"warning: tokenized BLEU {scores['bleu']:.2f} differs from the BLEU4 fairseq-generate printed "
              f"({scores['bleu_fairseq']:.2f})", file=sys.stderr)
    _write_lines(stem + ".hyp", scores["hypotheses"])
    _write_lines(stem + ".detok.hyp", scores["hypotheses_detok"])
    record = {
        "schema": SCHEMA,
        "task": task if task is not None else prep.get("task"),
        "loss": loss,
        "seed": int(seed),
        "run": run,
        "checkpoint": tag,
        "metrics": {"bleu": scores["bleu"], "sacrebleu": scores["sacrebleu"]},
        "info": {
            "sacrebleu_signature": scores["sacrebleu_signature"],
            "n_sentences": scores["n_sentences"],
            "checkpoint_path": os.path.abspath(checkpoint),
            "generate_cmd": cmd,
            "hypotheses": os.path.relpath(stem + ".hyp", out_dir),
            "bleu_fairseq": scores["bleu_fairseq"],
            "subset": gen_subset,
            "data_set": prep.get(f"{gen_subset}_set"),
        },
    }
    if curve is not None:
        record["curve"] = os.path.relpath(os.path.abspath(curve), out_dir)
    write_json(output, record)
    return record


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fairseq_el.evaluate",
        usage="%(prog)s --data PREP_OUT --checkpoint CKPT [options] [-- FAIRSEQ_GENERATE_FLAGS ...]",
        description="Decode a checkpoint with stock fairseq-generate (beam 5) and write one JSON record "
        "(schema el-result/1) with the paper's tokenized BLEU and the detokenized sacreBLEU (with its "
        "signature). Flags after '--' go to fairseq-generate.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True, help="the data preparation's output: prep.json, bin/, text/")
    p.add_argument("--checkpoint", required=True, help="the checkpoint to decode")
    p.add_argument("--output", default=None,
                   help="the record to write (default: CKPT_DIR/eval/TAG.json); hypotheses beside it")
    p.add_argument("--tag", default=None,
                   help="the record's 'checkpoint' label, e.g. avg_last10, best, last "
                   "(default: from the file name: checkpoint_best.pt -> best)")
    p.add_argument("--loss", default=None, help="the record's loss label, e.g. ce or el (default: from the "
                   "checkpoint's criterion: el for the plugin's, ce for fairseq's cross-entropies)")
    p.add_argument("--seed", type=int, default=None, help="the record's seed (default: the checkpoint's --seed)")
    p.add_argument("--run", default=None, help="the record's run label (default: the checkpoint's directory name)")
    p.add_argument("--task", default=None, help="the record's task (default: prep.json task)")
    p.add_argument("--curve", default=None, help="a CSV of per-epoch statistics (python -m fairseq_el.logs) "
                   "to link from the record: a path relative to the record's directory (e.g. ../curve.csv), "
                   "else to the current directory; the record holds it relative to its directory")
    p.add_argument("--gen-subset", default="test", help="the subset to decode")
    p.add_argument("--beam", type=int, default=5, help="beam size")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per batch (0: no limit, use --max-tokens)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="cpu", action="store_const", const=True, default=None,
                        help="decode on CPU (the default when CUDA is not available)")
    device.add_argument("--gpu", dest="cpu", action="store_const", const=False, help="do not pass --cpu")
    p.add_argument("--force", action="store_true", help="overwrite an existing record")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    argv, extra = split_extra(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in extra:
        name = flag.split("=", 1)[0]
        if name in OWN_FLAGS:
            parser.error(f"{name} after '--': evaluate sets it itself (use its own flag, if any)")
    if args.beam < 1:
        parser.error(f"--beam must be >= 1, got {args.beam}")
    if args.batch_size is not None and args.batch_size < 0:
        parser.error(f"--batch-size must be >= 0, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    batch_size = args.batch_size or None
    if batch_size is None and args.max_tokens is None:
        parser.error("--batch-size 0 needs --max-tokens")
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: no such directory")
    try:
        prep = read_prep(args.data)
    except EvaluationError as err:
        parser.error(str(err))
    if not os.path.isdir(os.path.join(args.data, prep.get("bin", "bin"))):
        parser.error(f"--data {args.data}: no {prep.get('bin', 'bin')}/ there (prep.json bin)")
    tag = args.tag or default_tag(args.checkpoint)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval", tag + ".json")
    if os.path.exists(output) and not args.force:
        if os.path.getmtime(output) >= os.path.getmtime(args.checkpoint):
            print(f"{output} exists and is newer than {args.checkpoint}: skipped (--force to redo)")
            return 0
        parser.error(f"--output {output} exists but is older than --checkpoint {args.checkpoint}; "
                     f"pass --force to overwrite it")
    curve = None
    if args.curve is not None:
        curve = resolve_curve(args.curve, output)
        if curve is None:
            parser.error(f"--curve {args.curve}: no such file, neither beside the record "
                         f"({os.path.dirname(os.path.abspath(output))}) nor from the current directory")
    loss, seed = args.loss, args.seed
    # always: the safe read refuses a hostile, truncated or foreign file before fairseq-generate loads it
    try:
        meta = _checkpoint_meta(args.checkpoint)
    except FileProblem as err:
        parser.error(str(err))
    if loss is None or seed is None:
        loss = loss if loss is not None else loss_label(meta["criterion"])
        seed = seed if seed is not None else meta["seed"]
        if loss is None:
            parser.error("--loss: the checkpoint names no criterion; pass --loss")
        if seed is None:
            parser.error("--seed: the checkpoint records no seed; pass --seed")
        if not isinstance(loss, str) or isinstance(seed, bool) or not isinstance(seed, int):
            parser.error(f"--checkpoint {args.checkpoint}: its criterion {loss!r} or seed {seed!r} is not usable "
                         f"as a label; pass --loss and --seed")
    run = args.run or os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    say = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        record = evaluate(args.data, args.checkpoint, output, tag=tag, loss=loss, seed=seed, run=run,
                          task=args.task, gen_subset=args.gen_subset, beam=args.beam, batch_size=batch_size,
                          max_tokens=args.max_tokens, cpu=args.cpu, extra=extra, curve=curve, progress=say)
    except EvaluationError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"--output {output}: {err.strerror or err}"
                     + (f" ({err.filename})" if err.filename and os.fspath(err.filename) != output else ""))
    m = record["metrics"]
    fairseq = record["info"]["bleu_fairseq"]
    on = record["info"]["data_set"] or args.gen_subset
    print(f"{record['run']} {tag} on {on}: BLEU {m['bleu']:.2f} (tokenized"
          + (f"; fairseq BLEU4 {fairseq:.2f}" if fairseq is not None else "")
          + f"), sacreBLEU {m['sacrebleu']:.2f} ({record['info']['sacrebleu_signature']}), "
          f"{record['info']['n_sentences']} sentences -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
