"""The Triton kernels' machine code, without a GPU: instructions per element.

Compiles the stats (forward) and gradient (backward) kernels with Triton's
real compiler for an NVIDIA architecture (default sm_90: H100 / H200), as the
wrappers would launch them for float32 / bfloat16 logits with divisible
strides, disassembles the cubin with the ``nvdisasm`` Triton ships, and counts
SASS instructions. A row's whole vocabulary is laid out in one block (the
gradient kernel's loop runs once), so ``instructions / elements per thread`` is
the code each element costs, the fixed per-row work spread over the row (and
the gradient kernel's zero-fill of ignored rows, code that valid rows skip).
With ``ptxas -v``'s registers and spill bytes, and the bytes of the row read
per element through 16-byte vector loads: the element size when each logit
is read once (4 for float32, 2 for bfloat16; 0 when ``V`` is not a multiple
of 16 and the loads are not vectorised).

A GPU that issues one instruction per lane per cycle on 132 SMs at 1.98 GHz
(H100 / H200) runs about 33 G of them per ms: ``N * V * per-element`` over that
is the kernel's compute floor, beside the memory floor of reading the logits
(and writing the gradient). A proxy, not a timing: ``python -m
encouraging_loss.tools.benchmark --device cuda --tune`` measures.

    el-kernel-sass                     # V = 1000, 10000, 32000; float32, bfloat16
    el-kernel-sass --vocab 10000 --no-bonus-smoothing
"""
import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: SASS instructions per millisecond of an H100 / H200 issuing one per lane per cycle
GPU_INSTR_PER_MS = 132 * 128 * 1.98e9 / 1e3
STATS_ARGS = ["z_ptr", "z_stride", "t_ptr", "t_stride", "loss_ptr", "nll_ptr", "bonus_ptr", "stat_ptr", "prm_ptr",
              "V", "ignore_index"]
GRAD_ARGS = ["z_ptr", "z_stride", "t_ptr", "t_stride", "g_ptr", "g_stride", "stat_ptr", "go_ptr", "go_stride",
             "prm_ptr", "V", "ignore_index"]
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def tool(name: str) -> Path:
    """A CUDA tool Triton ships (``ptxas``, ``nvdisasm``); FileNotFoundError if absent."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton does not ship {name}")
    return path


def compile_kernel(fn, names, types, constexprs, num_warps, arch=90, divisible=()):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU.

    ``types``: Triton signature types in the order of ``names`` (``*fp32``,
    ``i64``, ...); ``divisible``: argument names specialised as multiples of 16
    (as a launch with such strides and aligned pointers is). Returns a dict with
    ``ptx``, ``cubin``, ``registers``, ``spill_bytes`` (from ``ptxas -v``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    given = dict(zip(names, types))
    order = list(fn.arg_names)  # the kernel's own parameter order: constexprs are matched by position
    missing = [n for n in order if n not in given and n not in constexprs]
    extra = [n for n in list(given) + list(constexprs) if n not in order]
    if missing or extra:
        raise ValueError(f"{fn.__name__}: arguments missing {missing}, unknown {extra}")
    sig = {n: "constexpr" if n in constexprs else given[n] for n in order}
    src = ASTSource(fn=fn, signature=sig, constexprs={(order.index(k),): v for k, v in constexprs.items()},
                    attrs={(order.index(n),): [["tt.divisibility", 16]] for n in divisible})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        proc = subprocess.run([str(tool("ptxas")), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
                               str(ptx), "-o", str(ptx) + ".cubin"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{proc.stderr[-3000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return {"ptx": kernel.asm["ptx"], "cubin": kernel.asm["cubin"], "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else 0}


def sass_counts(cubin: bytes, full: bool = False) -> collections.Counter:
    """Opcode -> count, of every SASS instruction in ``cubin``; without the
    modifiers (``MUFU``), or with them (``full``: ``LDG.E.128``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([str(tool("nvdisasm")), "-c", fh.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1) if full else m.group(1).split(".")[0]] += 1
    return ops


def kernel_report(V: int, dtype: str = "float32", kind: str = "log", log_end: float = 0.75, dense: bool = True,
                  arch: int = 90):
    """SASS per element of the stats and gradient kernels for rows of ``V``
    classes (whole row in one block), hard targets, smoothing on; ``dense``:
    the bonus at every class (bonus smoothing > 0), else only at the target."""
    import torch

    from ..bonus import BonusConfig
    from ..ops import triton_kernels as tk

    dt = DTYPES[dtype]
    cdt = "fp64" if dt == "fp64" else "fp32"
    padded = max(16, 1 << (V - 1).bit_length())
    _, _, warps = tk.launch_config(V, block=padded, single=True)
    fast = tk._fast(torch.empty(0, device="meta"), torch.float64 if dt == "fp64" else torch.float32)
    common = tk.kernel_constexprs(BonusConfig(kind=kind, log_end=log_end), 0.1 if dense else 0.0, False,
                                  dt == "fp64", fast)
    stats = compile_kernel(
        tk._el_stats_kernel, STATS_ARGS, ["*" + dt, "i64", "*i64", "i64"] + ["*" + cdt] * 5 + ["i32", "i32"],
        dict(BLOCK=padded, SINGLE=True, SMOOTH=True, NEED_GRAD=True, **common), warps, arch,
        divisible=("z_ptr", "z_stride", "V") if V % 16 == 0 else ("z_ptr",))
    grad = compile_kernel(
        tk._el_grad_kernel, GRAD_ARGS,
        ["*" + dt, "i64", "*i64", "i64", "*" + dt, "i64", "*" + cdt, "*" + cdt, "i64", "*" + cdt, "i32", "i32"],
        dict(BLOCK=padded, **common), warps, arch,
        divisible=("z_ptr", "z_stride", "g_ptr", "g_stride", "V") if V % 16 == 0 else ("z_ptr", "g_ptr"))
    per_thread = padded / (32 * warps)
    out = {"V": V, "dtype": dtype, "kind": kind, "log_end": log_end, "dense": dense, "arch": f"sm_{arch}",
           "block": padded, "warps": warps}
    for name, k in (("stats", stats), ("grad", grad)):
        full = sass_counts(k["cubin"], full=True)
        ops = collections.Counter()
        for op, n in full.items():
            ops[op.split(".")[0]] += n
        total = sum(ops.values())
        # reads of the row: 16-byte vector loads (the per-row scalars are narrower; with V not a multiple of
        # 16 the row loads are not vectorised and this shows 0). Stores are not counted: the gradient
        # kernel's zero-fill of ignored rows is a second, unrolled store loop in the same code.
        row_read = 16 * sum(n for op, n in full.items() if op.startswith("LDG.") and op.endswith(".128"))
        out[name] = {"sass": total, "per_element": total / per_thread, "mufu_per_element": ops["MUFU"] / per_thread,
                     "read_bytes_per_element": row_read / per_thread,
                     "registers": k["registers"], "spill_bytes": k["spill_bytes"],
                     "top": dict(ops.most_common(8))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="el-kernel-sass",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="1000,10000,32000", help="comma-separated class counts")
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument("--kind", default="log", choices=("log", "power", "cosine"))
    ap.add_argument("--log-end", type=float, default=0.75)
    ap.add_argument("--no-bonus-smoothing", action="store_true", help="the bonus at the target only (eps_b = 0)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100 / H200)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        vocab = [int(v) for v in args.vocab.split(",")]
    except ValueError:
        ap.error(f"--vocab must be comma-separated integers, got {args.vocab!r}")
    if any(v < 1 for v in vocab):
        ap.error(f"--vocab sizes must be >= 1, got {args.vocab!r}")
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {', '.join(bad)} (choose from {', '.join(DTYPES)})")
    try:
        tool("nvdisasm")
        tool("ptxas")
    except (ImportError, FileNotFoundError) as exc:
        ap.error(f"needs Triton with its CUDA tools: {exc}")
    rows = []
    head = f"{'V':>7} {'dtype':>9} {'block':>6} {'warps':>5} | {'fwd/elem':>8} {'MUFU':>5} {'B rd':>4} {'regs':>4} " \
           f"{'spill':>5} | {'bwd/elem':>8} {'MUFU':>5} {'B rd':>4} {'regs':>4} {'spill':>5} | " \
           f"{'floor ms @16384 rows':>20}"
    print(f"# SASS instructions per element, sm_{args.arch}, bonus {args.kind} log_end={args.log_end}, "
          f"{'target-only bonus' if args.no_bonus_smoothing else 'bonus at every class'}; whole row in one block")
    print(head)
    print("-" * len(head))
    for V in vocab:
        for dtype in dtypes:
            r = kernel_report(V, dtype, args.kind, args.log_end, not args.no_bonus_smoothing, args.arch)
            rows.append(r)
            s, g = r["stats"], r["grad"]
            floor = 16384 * V * (s["per_element"] + g["per_element"]) / GPU_INSTR_PER_MS
            print(f"{V:>7} {dtype:>9} {r['block']:>6} {r['warps']:>5} | {s['per_element']:>8.1f} "
                  f"{s['mufu_per_element']:>5.1f} {s['read_bytes_per_element']:>4.1f} {s['registers']:>4} "
                  f"{s['spill_bytes']:>5} | {g['per_element']:>8.1f} {g['mufu_per_element']:>5.1f} "
                  f"{g['read_bytes_per_element']:>4.1f} {g['registers']:>4} {g['spill_bytes']:>5} | {floor:>20.3f}")
    print(f"(floor: 16384 x V x (fwd + bwd) instructions at {GPU_INSTR_PER_MS / 1e9:.1f} G per ms; "
          "the memory floor is apart; a proxy, not a timing)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
