"""Benchmark of a whole causal-LM training step: cross-entropy, EL from the logits, EL fused with the projection.

    python -m transformers_el.benchmark [--device cpu|cuda] [--vocab 32000,128256] [--seq 256,512,1024]
                                        [--batch 4] [--out bench.csv|bench.json] [--quick]

Each case is one forward + backward of a small Llama-style model (``LlamaForCausalLM``, ``--hidden`` 256,
``--layers`` 2, untied embeddings) on ``--batch`` x seq random tokens (default 2 x 256 and 512 on CPU,
4 x 256, 512 and 1024 on CUDA), the parameters' gradients allocated
anew (as after ``Trainer``'s ``zero_grad``), with three losses (issue 22, point 3):

* ``ce``: the library's default, ``model(input_ids, labels=labels).loss`` (``ForCausalLMLoss``), the yardstick:
  every time and memory figure is also given as a ratio to it, measured in the same run;
* ``el``: the logits path, ``EncouragingLMLoss(...)(model(input_ids), labels)`` as ``Trainer(compute_loss_func=...)``
  computes it;
* ``el_fused``: :func:`transformers_el.fused.enable_fused_el` on the model, whose training forward computes the
  output projection and EL together (the (tokens x vocabulary) logits never stored).

Time: the median over the timed steps (``--repeats``, and on CPU the step whose memory is measured). Peak
memory: on CPU the growth of the resident set's high-water mark during one step, each case in a fresh
subprocess (the mark reset just before the step, :func:`encouraging_loss.tools.benchmark.reset_rss_high_water`;
glibc's ``malloc`` told to give large blocks back to the system at once, so that the mark follows what the
step holds); on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the step (the model).
The model's parameters are in the baseline; the gradients, activations, logits and loss temporaries are in
the peak.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from encouraging_loss.tools.cli import Parser, check_choice, list_of
from encouraging_loss.tools.files import atomic_write, write_json

PROG = "python -m transformers_el.benchmark"
IMPLS = ("ce", "el", "el_fused")
#: Llama 2's and Llama 3's vocabularies
VOCABS = (32000, 128256)
#: the default sequence lengths and batch: on CPU what finishes in minutes on one thread, on CUDA issue 22's
SIZES = {"cpu": ((256, 512), 2), "cuda": ((256, 512, 1024), 4)}
QUICK = {"vocab": [1000], "seq": [32], "batch": 2, "hidden": 32, "layers": 1, "repeats": 1}
#: the EL settings of every EL case: the conservative bonus of the paper's translation runs (EL_SPEC 2.3)
EL_SETTINGS = {"log_end": 0.75, "bonus_rho": 1.0}
#: glibc: blocks above this size are mmap'ed and returned to the system when freed (the threshold fixed,
#: not raised by the first large free), so the resident set follows the live tensors
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
CSV_COLUMNS = ("device", "dtype", "vocab", "batch", "seq", "tokens", "impl", "time_ms", "time_vs_ce", "mem_mib",
               "mem_vs_ce")


class UsageError(ValueError):
    """A bad flag; one line, exit status 2."""


# ----------------------------------------------------------------------------- one case


def build_model(vocab: int, hidden: int, layers: int, seq: int, dtype, device: str, seed: int = 0):
    """The benchmark's model: a Llama-style causal LM (``intermediate = 8/3 hidden``, head dim 64, untied
    embeddings), random weights from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq, 64), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    return model


def make_step(impl: str, model):
    """``step(input_ids, labels)``: one forward + backward of ``model`` with the loss ``impl``."""
    if impl == "ce":
        def step(ids, labels):
            model(input_ids=ids, labels=labels).loss.backward()
    elif impl == "el":
        from .loss import EncouragingLMLoss

        loss_fn = EncouragingLMLoss(**EL_SETTINGS)

        def step(ids, labels):
            loss_fn(model(input_ids=ids), labels).backward()
    elif impl == "el_fused":
        from .fused import enable_fused_el

        enable_fused_el(model, **EL_SETTINGS)

        def step(ids, labels):
            model(input_ids=ids, labels=labels).loss.backward()
    else:
        raise ValueError(f"unknown case {impl!r} ({', '.join(IMPLS)})")
    return step


def _inputs(vocab, batch, seq, device, seed=1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return ids, ids.clone()


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_case(impl: str, vocab: int, batch: int, seq: int, *, hidden: int, layers: int, dtype: str,
                 device: str, repeats: int) -> dict:
    """Peak extra memory (MiB) of one training step and its median time (ms), in this process.

    A warm-up step of the full size first (imports, lazy initialisation, the one-off compilation of the fused
    EL's CPU back end for this vocabulary, CUDA autotuning; its memory is given back to the system before the
    measurement in the subprocesses, see ``CHILD_ENV``), then the step whose peak memory is measured, then
    ``repeats`` timed steps. On CPU the measured step is timed too (a step like the others: reading the
    high-water mark costs nothing)."""
    import torch

    from encouraging_loss.tools.benchmark import reset_rss_high_water, rss_high_water_kb

    torch_dtype = getattr(torch, dtype)
    model = build_model(vocab, hidden, layers, seq, torch_dtype, device)
    step = make_step(impl, model)
    ids, labels = _inputs(vocab, batch, seq, device)
    step(ids, labels)  # warm-up
    model.zero_grad(set_to_none=True)
    _sync(device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(ids, labels)
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        reset_rss_high_water()
        base = rss_high_water_kb()
        t0 = time.perf_counter()
        step(ids, labels)
        times.append(time.perf_counter() - t0)
        mem = (rss_high_water_kb() - base) / 1024.0
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        step(ids, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del model, step
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"time_ms": statistics.median(times) * 1e3, "mem_mib": mem, "steps_timed": len(times)}


def measure_case_subprocess(impl: str, vocab: int, batch: int, seq: int, args) -> dict:
    """:func:`measure_case` in a fresh interpreter (CPU memory: nothing else has raised the high-water mark)."""
    cmd = [sys.executable, "-m", "transformers_el.benchmark", "--_case", impl, "--vocab", str(vocab),
           "--seq", str(seq), "--batch", str(batch), "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            return json.loads(line[5:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"case {impl} vocab {vocab} seq {seq} failed (exit {proc.returncode}): {tail}")


# ----------------------------------------------------------------------------- all cases


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def run(args) -> List[dict]:
    """Every (vocabulary, sequence length) with every case of ``args.impls``; the rows with ratios to ``ce``."""
    rows = []
    subprocesses = args.device == "cpu" and not args.in_process
    for vocab in args.vocab:
        for seq in args.seq:
            group = {}
            for impl in args.impls:
                if subprocesses:
                    res = measure_case_subprocess(impl, vocab, args.batch, seq, args)
                else:
                    res = measure_case(impl, vocab, args.batch, seq, hidden=args.hidden, layers=args.layers,
                                       dtype=args.dtype, device=args.device, repeats=args.repeats)
                rec = {"device": args.device, "dtype": args.dtype, "vocab": vocab, "batch": args.batch, "seq": seq,
                       "tokens": args.batch * seq, "impl": impl, **res}
                group[impl] = rec
                _progress(f"vocab {vocab}, {args.batch}x{seq} tokens, {impl}: {rec['time_ms']:.1f} ms, "
                          f"{rec['mem_mib']:.1f} MiB")
            base = group.get("ce")
            for rec in group.values():
                rec["time_vs_ce"] = rec["time_ms"] / base["time_ms"] if base else None
                rec["mem_vs_ce"] = rec["mem_mib"] / base["mem_mib"] if base and base["mem_mib"] > 0 else None
                rows.append(rec)
    return rows


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (ratios to ``ce`` of the same vocabulary and shape)."""
    lines = ["| vocab | batch x seq | loss | step ms | time vs CE | peak MiB | memory vs CE |",
             "|---:|---:|:---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vocab']} | {r['batch']}x{r['seq']} | {r['impl']} | {r['time_ms']:.1f} | "
                     f"{_ratio(r['time_vs_ce'])} | {r['mem_mib']:.1f} | {_ratio(r['mem_vs_ce'])} |")
    return "\n".join(lines)


def write_out(path: Path, rows: Sequence[dict], meta: dict) -> None:
    if path.suffix.lower() == ".json":
        write_json(path, {"meta": meta, "rows": list(rows)})
        return
    buf_lines = [",".join(CSV_COLUMNS)]
    for r in rows:
        buf_lines.append(",".join("" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                                  for c in CSV_COLUMNS))
    with atomic_write(path) as f:
        f.write("\n".join(buf_lines) + "\n")


def cpu_or_gpu_name(device: str) -> str:
    import torch

    from encouraging_loss.tools.benchmark import cpu_name

    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


# ----------------------------------------------------------------------------- command line


def build_parser() -> Parser:
    p = Parser(prog=PROG, allow_abbrev=False,
               description="Peak memory and time of a causal-LM training step (forward + backward) with the "
                           "library's cross-entropy, the Encouraging Loss from the logits, and EL fused with the "
                           "output projection, as ratios to cross-entropy.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--vocab", type=list_of(int, "an integer"), default=",".join(map(str, VOCABS)), metavar="V,...",
                   help="vocabulary sizes")
    p.add_argument("--seq", type=list_of(int, "an integer"), default=None, metavar="T,...",
                   help="sequence lengths (default: 256,512 on CPU, 256,512,1024 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 2 on CPU, 4 on CUDA)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the model")
    p.add_argument("--impls", type=list_of(str, "a name"), default=",".join(IMPLS), metavar="NAME,...",
                   help="cases; ce is the yardstick of the ratios")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per case after the measured one, median (default: 2 CPU, 10 CUDA; on CPU the "
                        "measured step is timed too)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: measure in this process, not a fresh subprocess per case (memory less exact)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (vocab 1000, 2x32 tokens, hidden 32, 1 layer, 1 repeat, in-process)")
    p.add_argument("--out", metavar="PATH", default=None, help="also write the rows to PATH (.csv or .json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--_case", dest="_case", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args) -> None:
    import torch

    check_choice("--impls", args.impls, IMPLS, error=UsageError)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    seqs, batch = SIZES[args.device]
    args.seq = list(seqs) if args.seq is None else args.seq
    args.batch = batch if args.batch is None else args.batch
    for flag, values in (("--vocab", args.vocab), ("--seq", args.seq)):
        if not values or any(v <= 0 for v in values):
            raise UsageError(f"{flag} must be positive integers, got {values!r}")
    for flag in ("batch", "hidden", "layers", "repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag} must be a positive integer, got {value!r}")
    if args.hidden >= 64 and args.hidden % 64 != 0:
        raise UsageError(f"--hidden {args.hidden}: must be a multiple of 64 (heads of 64), or less than 64 (one head)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 2
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() not in (".csv", ".json"):
            raise UsageError(f"--out {args.out}: give a .csv or .json file")
        if out.exists() and not args.force:
            raise UsageError(f"--out {args.out} exists; give --force to overwrite it")
        if not out.parent.is_dir():
            raise UsageError(f"--out {args.out}: no folder {out.parent}")


def apply_quick(args, argv: Sequence[str]) -> None:
    """``--quick``: the tiny sizes, where the corresponding flag was not given."""
    given = {a.split("=")[0] for a in argv}
    for name, value in QUICK.items():
        if f"--{name}" not in given:
            setattr(args, name, value)
    args.in_process = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.quick:
            apply_quick(args, argv)
        check_args(args)
    except UsageError as err:
        parser.error(str(err))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._case:
        res = measure_case(args._case, args.vocab[0], args.batch, args.seq[0], hidden=args.hidden,
                           layers=args.layers, dtype=args.dtype, device=args.device, repeats=args.repeats)
        print("CASE " + json.dumps(res), flush=True)
        return 0
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_or_gpu_name(args.device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "model": f"LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, untied embeddings",
        "dtype": args.dtype, "repeats": args.repeats, "el": EL_SETTINGS,
        "memory": ("cuda max_memory_allocated" if args.device == "cuda" else
                   "RSS high-water mark growth, " + ("in process" if args.in_process else "subprocess per case")),
        "command": "python -m transformers_el.benchmark " + " ".join(argv),
    }
    import transformers

    meta["transformers"] = transformers.__version__
    _progress(f"{meta['device']}, {meta['threads']} threads, {args.dtype}; {meta['model']}")
    try:
        rows = run(args)
    except RuntimeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(f"{meta['device']} ({args.device}, {meta['threads']} threads), torch {meta['torch']}, transformers "
          f"{meta['transformers']}, {args.dtype}; {meta['model']}; EL log_end {EL_SETTINGS['log_end']}; memory: "
          f"{meta['memory']}; time: median of {rows[0]['steps_timed'] if rows else args.repeats} steps\n")
    print(markdown_table(rows))
    if args.out is not None:
        write_out(Path(args.out), rows, meta)
        _progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
