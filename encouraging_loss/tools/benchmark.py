"""Loss benchmark: forward + backward time and peak extra memory.

Run ``el-benchmark`` (or ``python -m encouraging_loss.tools.benchmark``; ``--help`` for the options).
Implementations, all on the same logits and targets, label smoothing 0.1:

* ``torch_ce``: ``F.cross_entropy(label_smoothing=0.1)``, the yardstick: every
  time and memory figure is also given as a ratio to it, measured in the same run;
* ``fairseq_ls``: ``log_softmax`` then fairseq's ``label_smoothed_nll_loss``
  (skipped when fairseq does not import);
* ``paper_el``: the Encouraging Loss written the way the paper's release
  writes it, as a plain formula with its ``N x V`` temporaries
  (``p = softmax``, ``log(clamp(1 - p, 1e-5))``, conservative tangent above
  ``log_end``, smoothed like the NLL);
* ``reference``: :func:`encouraging_loss.functional.reference_rows` (autograd);
* ``fused``: :func:`encouraging_loss.ops.fused.fused_el_rows` with the back end it
  picks by default (Triton on CUDA, eager chunks on CPU);
* ``fused_compiled`` (CPU, ``--compile``): the ``torch.compile`` back end;
  its one-off compilation is excluded from the timing and reported apart;
* ``paper_el_compiled`` (CUDA by default): ``torch.compile`` of ``paper_el``,
  what a user could get without this project (compilation excluded);
* ``fused_inplace`` (CUDA): ``fused`` with ``inplace_backward=True``, the
  gradient written into the logits' storage;
* ``floor``: not a loss, one elementwise read + write pass over the logits
  (``torch.neg``): the memory-bandwidth floor of any loss that returns a
  gradient;
* ``torch_ce_weighted`` and ``fused_weighted`` (only when named in
  ``--impls``): ``F.cross_entropy(weight=c)`` and the fused EL with the same
  per-class weights ``c`` (0.5 to 2); the fused row is also given as a ratio
  to the weighted CE (``vs weighted CE``).

``--projection`` times the output projection and the loss together
(``hidden (N x H) @ W^T (V x H)``, forward + backward, gradients of the hidden
states and of ``W``): ``linear_ce`` (``F.linear`` + ``F.cross_entropy``),
``linear_el`` (``F.linear`` + the fused EL) and ``fused_linear_el``
(:func:`encouraging_loss.ops.fused_linear.fused_linear_encouraging_loss`, logits
never stored in full), with the peak memory of the step.

``--tune`` (CUDA) times each Triton kernel alone for each launch setting: the
forward (stats) kernel by row path (one block per row, or streamed in blocks
of 1024 to 8192) and warps, the backward (gradient) kernel by block and warps;
it marks the fastest and ``launch_config``'s default and sums the two kernels
against ``torch_ce``: the measurements behind ``triton_kernels.launch_config``.

Time: median over repeats of forward + backward (a fresh leaf each time).
Peak extra memory: on CPU the growth of the resident set's high-water mark
during one forward + backward, in a fresh subprocess per case (the mark is
reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not
available); on CUDA ``torch.cuda.max_memory_allocated`` minus what was
allocated before. The gradient of the logits itself is included.
"""
import argparse
import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from ..bonus import BonusConfig
from ..ops.fused import fused_el_rows, select_backend
from ..ops.fused_linear import fused_linear_encouraging_loss
from ..reference import reference_rows

#: in the order they run (the one-off compilation of ``paper_el_compiled`` last: a time-limited run loses least)
IMPLS = ("torch_ce", "fairseq_ls", "paper_el", "reference", "fused", "fused_compiled", "fused_inplace", "floor",
         "paper_el_compiled")
#: implementations that only run where they are the point (CUDA) or when asked for
CUDA_ONLY = ("paper_el_compiled", "fused_inplace")
#: per-class weights (``F.cross_entropy``'s ``weight``): only when named in ``--impls``
WEIGHTED_IMPLS = ("torch_ce_weighted", "fused_weighted")
PROJ_IMPLS = ("linear_ce", "linear_el", "fused_linear_el")
PROJ_CPU_SHAPES = [(2048, 10000, 256)]
PROJ_CUDA_SHAPES = [(8192, 32000, 512), (16384, 10000, 512)]
TUNE_BLOCKS = (1024, 2048, 4096, 8192)
CPU_SHAPES = [(4096, 10000), (256, 1000)]
CUDA_SHAPES = [(4096, 10000), (256, 1000), (16384, 10000), (8192, 32000)]
QUICK_SHAPES = [(64, 100), (16, 37)]
EPS = 0.1
IGNORE = 1  # padding index, as fairseq (its loss gathers before masking, so it must be a class)


def paper_el_formula(logits, target, eps=EPS, log_end=0.75, ignore_index=IGNORE):
    """EL as the release writes it (our own code): a formula over ``N x V`` tensors."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    probs = torch.exp(lprobs)
    bonus = torch.log(torch.clamp(1.0 - probs, min=1e-5))
    if log_end < 1.0:
        tangent = (probs - log_end) / (log_end - 1.0) + math.log(1.0 - log_end)
        bonus = torch.where(probs > log_end, tangent, bonus)
    V = lprobs.size(-1)
    pad = target.eq(ignore_index)
    t = target.masked_fill(pad, 0).unsqueeze(-1)
    nll = -lprobs.gather(-1, t).squeeze(-1)
    b_y = bonus.gather(-1, t).squeeze(-1)
    smooth = -lprobs.sum(-1)
    b_sum = bonus.sum(-1)
    loss = (1.0 - eps) * (nll + b_y) + eps / V * (smooth + b_sum)
    loss = loss.masked_fill(pad, 0.0)
    return loss.sum() / (~pad).sum().clamp(min=1)


def _fairseq_loss():
    import logging

    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    for name in ("filelock", "fairseq"):  # fairseq's import turns on verbose logging
        logging.getLogger(name).setLevel(logging.WARNING)

    def run(logits, target):
        lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        loss, _ = label_smoothed_nll_loss(lprobs, target, EPS, ignore_index=IGNORE, reduce=True)
        return loss / target.ne(IGNORE).sum().clamp(min=1)

    return run


def _el_rows_mean(fn, cfg, eps_b):
    def run(logits, target):
        loss, _, _, valid = fn(logits, target, cfg, EPS, eps_b, IGNORE, False)
        return loss.sum() / valid.sum().clamp(min=1)

    return run


@functools.lru_cache(maxsize=8)
def class_weight(V: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-class weights of the weighted rows: 0.5 to 2 (the range of class-balanced weights), in the
    logits' dtype (as F.cross_entropy wants them), made once."""
    return torch.linspace(0.5, 2.0, V, device=device).to(dtype)


def make_loss(impl, cfg, eps_b):
    """``loss_fn(logits, target) -> scalar`` for one implementation (None: unavailable)."""
    if impl == "torch_ce":
        return lambda z, t: F.cross_entropy(z, t, label_smoothing=EPS, ignore_index=IGNORE)
    if impl == "torch_ce_weighted":
        return lambda z, t: F.cross_entropy(z, t, weight=class_weight(z.shape[-1], str(z.device), z.dtype),
                                            label_smoothing=EPS, ignore_index=IGNORE)
    if impl == "fused_weighted":
        def run_weighted(logits, target):
            w = class_weight(logits.shape[-1], str(logits.device), logits.dtype)
            loss, _, _, valid = fused_el_rows(logits, target, cfg, EPS, eps_b, IGNORE, False, weight=w)
            w_y = torch.where(valid, w[target.masked_fill(~valid, 0)].to(loss.dtype), 0.0)
            return loss.sum() / w_y.sum()
        return run_weighted
    if impl == "fairseq_ls":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _fairseq_loss()
        except Exception:
            return None
    if impl == "paper_el":
        return lambda z, t: paper_el_formula(z, t, EPS, cfg.log_end)
    if impl == "reference":
        return _el_rows_mean(reference_rows, cfg, eps_b)
    if impl == "fused":
        return _el_rows_mean(fused_el_rows, cfg, eps_b)
    if impl == "paper_el_compiled":
        compiled = torch.compile(paper_el_formula)
        return lambda z, t: compiled(z, t, EPS, cfg.log_end)
    if impl == "fused_inplace":
        def run_inplace(logits, target):
            loss, _, _, valid = fused_el_rows(logits, target, cfg, EPS, eps_b, IGNORE, False, inplace_backward=True)
            return loss.sum() / valid.sum().clamp(min=1)
        return run_inplace
    if impl == "floor":
        return "floor"
    if impl == "fused_compiled":
        def run(z, t):
            old = os.environ.get("EL_FUSED_BACKEND")
            os.environ["EL_FUSED_BACKEND"] = "compiled"
            try:
                return _el_rows_mean(fused_el_rows, cfg, eps_b)(z, t)
            finally:
                if old is None:
                    os.environ.pop("EL_FUSED_BACKEND", None)
                else:
                    os.environ["EL_FUSED_BACKEND"] = old
        return run
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(N, V, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.empty(N, V, dtype=dtype, device=device)
    z.normal_(0.0, 3.0, generator=gen)
    t = torch.randint(0, V, (N,), generator=gen, device=device)
    t[:: 16] = IGNORE  # some padding
    return z, t


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(loss_fn, z, t, x=None):
    """One forward + backward from a fresh leaf (``x``: a prepared one, e.g. a
    copy the in-place backward may overwrite); for ``"floor"`` one read + write pass."""
    if loss_fn == "floor":
        return torch.neg(z)
    x = z.detach().requires_grad_() if x is None else x
    loss_fn(x, t).backward()
    return x.grad


def _leaf(loss_fn, z, copy):
    if loss_fn == "floor":
        return None
    return z.detach().clone().requires_grad_() if copy else z.detach().requires_grad_()


def time_case(loss_fn, z, t, repeats, warmup=1, copy=False):
    """Median time (ms) of ``step``; ``copy``: each step gets a copy of the logits
    (made outside the timing), for back ends that overwrite them."""
    device = z.device.type
    for _ in range(warmup):
        step(loss_fn, z, t, _leaf(loss_fn, z, copy))
    _sync(device)
    times = []
    for _ in range(repeats):
        x = _leaf(loss_fn, z, copy)
        _sync(device)
        t0 = time.perf_counter()
        step(loss_fn, z, t, x)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del x
    return statistics.median(times) * 1e3


def rss_high_water_kb() -> int:
    """This process's resident-set high-water mark in KiB: ``VmHWM`` of ``/proc/self/status`` (Linux), else
    ``ru_maxrss``. With :func:`reset_rss_high_water` before a piece of work, its growth is that work's peak
    extra CPU memory; measure in a fresh process (the benchmarks' memory subprocesses), where nothing else
    has raised the mark. Public for the adapters' benchmarks (``transformers_el.benchmark``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_rss_high_water() -> bool:
    """Reset the high-water mark of :func:`rss_high_water_kb` to the current resident set (Linux
    ``/proc/self/clear_refs``); ``False`` where that is not possible (the mark then keeps the process's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_case_inprocess(loss_fn, z, t, copy=False):
    """Peak extra memory (MiB) of one forward + backward in this process
    (``copy``: on a copy of the logits made before the measurement)."""
    x = _leaf(loss_fn, z, copy) if copy else None
    if z.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        g = step(loss_fn, z, t, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del g
        return peak / 2**20
    reset_rss_high_water()
    base = rss_high_water_kb()
    g = step(loss_fn, z, t, x)
    peak = rss_high_water_kb() - base
    del g
    return peak / 1024.0


def memory_case_subprocess(impl, N, V, dtype, args):
    """Run one case in a fresh interpreter and return its peak extra memory (MiB)."""
    cmd = [
        sys.executable, "-m", "encouraging_loss.tools.benchmark", "--_memory-case", impl,
        "--_shape", f"{N}x{V}", "--dtypes", str(dtype).replace("torch.", ""),
        "--log-end", str(args.log_end), "--bonus-smoothing", str(args.bonus_smoothing),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("MEMORY_MIB "):
            value = line.split()[1]
            return None if value == "nan" else float(value)
    raise RuntimeError(f"memory subprocess for {impl} failed:\n{out.stderr[-2000:]}")


def _memory_child(args):
    N, V = (int(v) for v in args._shape.split("x"))
    dtype = getattr(torch, args.dtypes.split(",")[0])
    cfg = BonusConfig(log_end=args.log_end)
    loss_fn = make_loss(args._memory_case, cfg, args.bonus_smoothing)
    if loss_fn is None:
        print("MEMORY_MIB nan")
        return
    z, t = make_inputs(N, V, dtype, "cpu")
    if args._memory_case == "fused":  # warm up the back end the full-size input gets
        os.environ["EL_FUSED_BACKEND"] = select_backend(z)
    small = make_inputs(min(N, 2 * 256), V, dtype, "cpu")
    step(loss_fn, *small)  # imports and lazy initialisation (and compilation) outside the measurement
    del small
    print(f"MEMORY_MIB {memory_case_inprocess(loss_fn, z, t):.3f}")


def _fmt_ratio(x, base):
    if x is None or base is None or base <= 0:
        return "-"
    return f"{x / base:.2f}x"


def _progress(line):
    """One finished case, on stderr at once (the table comes at the end): a run
    stopped by a time limit still leaves its numbers in the log."""
    print(f"  {line}", file=sys.stderr, flush=True)


def run(args):
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else (
        [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    )
    impls = [i for i in IMPLS if (i != "fused_compiled" or (args.compile and device == "cpu"))
             and (i not in CUDA_ONLY or device == "cuda")]
    if args.impls:
        impls = [i for i in args.impls.split(",")]
    repeats = args.repeats or (2 if args.quick else (5 if device == "cpu" else 20))
    cfg = BonusConfig(log_end=args.log_end)
    rows = []
    for N, V in shapes:
        for dtype in dtypes:
            z, t = make_inputs(N, V, dtype, device)
            results = {}
            for impl in impls:
                loss_fn = make_loss(impl, cfg, args.bonus_smoothing)
                rec = {"impl": impl, "N": N, "V": V, "dtype": str(dtype).replace("torch.", ""), "device": device}
                if loss_fn is None:
                    rec["note"] = "unavailable"
                    results[impl] = rec
                    continue
                if impl in ("fused", "fused_weighted"):
                    rec["backend"] = select_backend(z)
                if impl == "fused_compiled":
                    t0 = time.perf_counter()
                    step(loss_fn, z, t)
                    rec["compile_s"] = round(time.perf_counter() - t0, 1)
                if impl == "paper_el_compiled":
                    t0 = time.perf_counter()
                    step(loss_fn, z, t)
                    rec["compile_s"] = round(time.perf_counter() - t0, 1)
                copy = impl == "fused_inplace"
                rec["time_ms"] = time_case(loss_fn, z, t, repeats, copy=copy)
                if args.no_memory:
                    rec["mem_mib"] = None
                elif device == "cpu" and not args.quick and impl != "floor":
                    rec["mem_mib"] = memory_case_subprocess(impl, N, V, dtype, args)
                else:
                    rec["mem_mib"] = memory_case_inprocess(loss_fn, z, t, copy=copy)
                results[impl] = rec
                _progress(f"{N}x{V} {rec['dtype']} {impl}: {rec['time_ms']:.3f} ms"
                          + (f", {rec['mem_mib']:.1f} MiB" if rec.get("mem_mib") is not None else ""))
            base = results.get("torch_ce", {})
            wbase = results.get("torch_ce_weighted", {})
            for rec in results.values():
                timed = rec.get("time_ms") and base.get("time_ms")
                rec["time_vs_ce"] = (rec["time_ms"] / base["time_ms"]) if timed else None
                if rec["impl"] == "fused_weighted" and rec.get("time_ms") and wbase.get("time_ms"):
                    rec["time_vs_ce_weighted"] = rec["time_ms"] / wbase["time_ms"]
                rec["mem_vs_ce"] = (
                    rec["mem_mib"] / base["mem_mib"] if rec.get("mem_mib") is not None and base.get("mem_mib") else None
                )
                rows.append(rec)
            del z, t
    return rows


def make_projection(impl, cfg, eps_b):
    """``fn(hidden, weight, target) -> scalar`` for the ``--projection`` cases."""
    if impl == "linear_ce":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w), t, label_smoothing=EPS, ignore_index=IGNORE)
    if impl == "linear_el":
        return lambda h, w, t: _el_rows_mean(fused_el_rows, cfg, eps_b)(F.linear(h, w), t)
    if impl == "fused_linear_el":
        return lambda h, w, t: fused_linear_encouraging_loss(
            h, w, t, log_end=cfg.log_end, smoothing=EPS, bonus_smoothing=eps_b, ignore_index=IGNORE)
    raise ValueError(f"unknown projection implementation {impl!r}")


def _projection_step(fn, h, w, t):
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    fn(hh, ww, t).backward()
    return hh.grad, ww.grad


def run_projection(args):
    """Output projection + loss, forward and backward: time and peak memory."""
    device = args.device
    if args.shapes:
        shapes = []
        for spec in args.shapes.split(","):
            parts = [int(v) for v in spec.split("x")]
            shapes.append(tuple(parts) if len(parts) == 3 else (*parts, 512))
    elif args.quick:
        shapes = [(64, 100, 16)]
    else:
        shapes = PROJ_CUDA_SHAPES if device == "cuda" else PROJ_CPU_SHAPES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else (
        [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    repeats = args.repeats or (2 if args.quick else (3 if device == "cpu" else 10))
    cfg = BonusConfig(log_end=args.log_end)
    rows = []
    for N, V, H in shapes:
        for dtype in dtypes:
            gen = torch.Generator(device=device).manual_seed(0)
            h = torch.randn(N, H, dtype=dtype, device=device, generator=gen)
            w = torch.randn(V, H, dtype=dtype, device=device, generator=gen) * H ** -0.5
            t = torch.randint(0, V, (N,), device=device, generator=gen)
            t[::16] = IGNORE
            results = {}
            for impl in PROJ_IMPLS:
                fn = make_projection(impl, cfg, args.bonus_smoothing)
                rec = {"impl": impl, "N": N, "V": V, "H": H, "dtype": str(dtype).replace("torch.", ""),
                       "device": device}
                _projection_step(fn, h, w, t)  # warm-up
                _sync(device)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _projection_step(fn, h, w, t)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                rec["time_ms"] = statistics.median(times) * 1e3
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    grads = _projection_step(fn, h, w, t)
                    torch.cuda.synchronize()
                    rec["mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                else:
                    reset_rss_high_water()
                    base = rss_high_water_kb()
                    grads = _projection_step(fn, h, w, t)
                    rec["mem_mib"] = (rss_high_water_kb() - base) / 1024.0
                del grads
                results[impl] = rec
                _progress(f"{N}x{V}x{H} {rec['dtype']} {impl}: {rec['time_ms']:.3f} ms, {rec['mem_mib']:.1f} MiB")
            base = results["linear_ce"]
            for rec in results.values():
                rec["time_vs_ce"] = rec["time_ms"] / base["time_ms"]
                rec["mem_vs_ce"] = rec["mem_mib"] / base["mem_mib"] if base["mem_mib"] > 0 else None
                rows.append(rec)
    return rows


TUNE_WARPS = (4, 8, 16, 32)


def _kernel_ms(fn, repeats, device):
    """Median time (ms) of ``fn()`` alone: CUDA events on the GPU (no host
    round trip inside the timing), the wall clock on CPU."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_tune(args):
    """Time each Triton kernel alone over its launch settings: the stats
    kernel (forward) by row path (one block, or streamed in blocks of 1024 to
    8192) and warps, the gradient kernel (backward) by block and warps; with
    ``torch_ce`` fwd+bwd and a copy of the logits (the floor) for scale. The
    default setting of ``launch_config`` is marked, so the table shows what
    tuning would gain."""
    from ..ops import triton_kernels as tk

    device = args.device
    cpu = device == "cpu"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else (
        [(64, 100)] if args.quick else [(16384, 10000), (8192, 32000)])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else [torch.float32, torch.bfloat16]
    repeats = args.repeats or (1 if args.quick else 20)
    cfg = BonusConfig(log_end=args.log_end)
    eps_b = args.bonus_smoothing
    warps_list = (1,) if cpu else TUNE_WARPS
    blocks = (16, 32) if cpu else TUNE_BLOCKS
    rows = []
    for N, V in shapes:
        for dtype in dtypes:
            z, t = make_inputs(N, V, dtype, device)
            base = {"N": N, "V": V, "dtype": str(dtype).replace("torch.", "")}
            ce_ms = time_case(make_loss("torch_ce", cfg, eps_b), z, t, repeats)
            rows.append({**base, "kernel": "torch_ce", "path": "fwd+bwd", "block": 0, "warps": 0, "time_ms": ce_ms})
            out = torch.empty_like(z)
            rows.append({**base, "kernel": "floor", "path": "copy", "block": 0, "warps": 0,
                         "time_ms": _kernel_ms(functools.partial(out.copy_, z), repeats, device)})
            padded = 1 << max(4, (V - 1).bit_length())
            d_block, d_single, d_warps = tk.launch_config(V, cpu)
            stats_cfgs = [("single", padded)] if padded <= 32768 else []
            stats_cfgs += [("stream", b) for b in blocks if b < padded]
            if ("single" if d_single else "stream", d_block) not in stats_cfgs:  # the default is always timed
                stats_cfgs.append(("single" if d_single else "stream", d_block))
            for path, block in stats_cfgs:
                for warps in sorted(set(warps_list) | {d_warps}):
                    fn = functools.partial(tk.el_stats_triton, z, t, cfg, EPS, eps_b, IGNORE, False, True, block,
                                           path == "single", warps)
                    ms = _kernel_ms(fn, repeats, device)
                    default = (block, path == "single", warps) == (d_block, d_single, d_warps)
                    rows.append({**base, "kernel": "stats", "path": path, "block": block, "warps": warps,
                                 "time_ms": ms, "default": default})
                    _progress(f"{N}x{V} {base['dtype']} stats {path} {block}/{warps}w: {ms:.3f} ms")
            stats = tk.el_stats_triton(z, t, cfg, EPS, eps_b, IGNORE, False, True)[3]
            go = torch.ones((), dtype=stats.dtype, device=device).expand(N)
            g_block, g_warps = tk._grad_launch(V, cpu)
            for block in sorted({b for b in blocks if b <= padded} | {g_block}):
                for warps in sorted(set(warps_list) | {g_warps}):
                    fn = functools.partial(tk.el_grad_triton, z, t, cfg, EPS, eps_b, IGNORE, False, stats, go, out,
                                           block, warps)
                    ms = _kernel_ms(fn, repeats, device)
                    rows.append({**base, "kernel": "grad", "path": "stream", "block": block, "warps": warps,
                                 "time_ms": ms, "default": (block, warps) == (g_block, g_warps)})
                    _progress(f"{N}x{V} {base['dtype']} grad {block}/{warps}w: {ms:.3f} ms")
            del z, t, out, stats, fn
    return rows


def tune_summary(rows):
    """Per shape and dtype: the default and the fastest setting of each kernel,
    and their sums against ``torch_ce`` (forward + backward)."""
    out = []
    for key in dict.fromkeys((r["N"], r["V"], r["dtype"]) for r in rows):
        case = [r for r in rows if (r["N"], r["V"], r["dtype"]) == key]
        ce = next(r["time_ms"] for r in case if r["kernel"] == "torch_ce")
        floor = next(r["time_ms"] for r in case if r["kernel"] == "floor")
        rec = {"N": key[0], "V": key[1], "dtype": key[2], "torch_ce_ms": ce, "floor_ms": floor}
        for kernel in ("stats", "grad"):
            ks = [r for r in case if r["kernel"] == kernel]
            best = min(ks, key=lambda r: r["time_ms"])
            default = next((r for r in ks if r.get("default")), None)
            rec[kernel] = {"best": {k: best[k] for k in ("path", "block", "warps", "time_ms")},
                           "default": None if default is None else
                           {k: default[k] for k in ("path", "block", "warps", "time_ms")}}
        rec["best_vs_ce"] = (rec["stats"]["best"]["time_ms"] + rec["grad"]["best"]["time_ms"]) / ce
        if rec["stats"]["default"] and rec["grad"]["default"]:
            rec["default_vs_ce"] = (rec["stats"]["default"]["time_ms"] + rec["grad"]["default"]["time_ms"]) / ce
        out.append(rec)
    return out


def tune_table(rows):
    head = f"{'shape':>14}{'dtype':>10}{'kernel':>10}{'path':>8}{'block':>7}{'warps':>6}{'time ms':>10}"
    lines = [head, "-" * len(head)]
    best = {}
    for r in rows:
        key = (r["N"], r["V"], r["dtype"], r["kernel"])
        if key not in best or r["time_ms"] < best[key]["time_ms"]:
            best[key] = r
    for r in rows:
        marks = []
        if r["kernel"] in ("stats", "grad") and best[(r["N"], r["V"], r["dtype"], r["kernel"])] is r:
            marks.append("<- fastest")
        if r.get("default"):
            marks.append("(default)")
        shape = f"{r['N']}x{r['V']}"
        lines.append(f"{shape:>14}{r['dtype']:>10}{r['kernel']:>10}{r['path']:>8}{r['block']:>7}{r['warps']:>6}"
                     f"{r['time_ms']:>10.3f}  {' '.join(marks)}".rstrip())
    lines.append("")
    lines.append("kernel time fwd+bwd (stats + grad) vs torch_ce fwd+bwd:")
    for rec in tune_summary(rows):
        shape = f"{rec['N']}x{rec['V']}"
        dflt = f"{rec['default_vs_ce']:.2f}x" if "default_vs_ce" in rec else "-"
        b = rec["stats"]["best"], rec["grad"]["best"]
        lines.append(f"  {shape} {rec['dtype']}: default {dflt}, tuned {rec['best_vs_ce']:.2f}x "
                     f"(stats {b[0]['path']} {b[0]['block']}/{b[0]['warps']}w, grad {b[1]['block']}/{b[1]['warps']}w); "
                     f"torch_ce {rec['torch_ce_ms']:.3f} ms, copy floor {rec['floor_ms']:.3f} ms")
    return "\n".join(lines)


def projection_table(rows):
    head = f"{'impl':<17}{'N x V x H':>20}{'dtype':>10}{'time ms':>10}{'vs CE':>8}{'peak MiB':>11}{'vs CE':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['N']}x{r['V']}x{r['H']}"
        mv = "-" if r.get("mem_vs_ce") is None else f"{r['mem_vs_ce']:.2f}x"
        lines.append(f"{r['impl']:<17}{shape:>20}{r['dtype']:>10}{r['time_ms']:>10.2f}{r['time_vs_ce']:>7.2f}x"
                     f"{r['mem_mib']:>11.1f}{mv:>8}")
    return "\n".join(lines)


def table(rows):
    head = f"{'impl':<16}{'shape':>14}{'dtype':>10}{'time ms':>11}{'vs CE':>8}{'peak MiB':>11}{'vs CE':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['N']}x{r['V']}"
        if r.get("note") == "unavailable":
            lines.append(f"{r['impl']:<16}{shape:>14}{r['dtype']:>10}{'-':>11}{'-':>8}{'-':>11}{'-':>8}  unavailable")
            continue
        mem = "-" if r.get("mem_mib") is None else f"{r['mem_mib']:.1f}"
        tv = "-" if r.get("time_vs_ce") is None else f"{r['time_vs_ce']:.2f}x"
        mv = "-" if r.get("mem_vs_ce") is None else f"{r['mem_vs_ce']:.2f}x"
        note = []
        if r.get("backend"):
            note.append(f"backend={r['backend']}")
        if r.get("compile_s") is not None:
            note.append(f"compile {r['compile_s']} s")
        if r.get("time_vs_ce_weighted") is not None:
            note.append(f"vs weighted CE {r['time_vs_ce_weighted']:.2f}x")
        lines.append(
            f"{r['impl']:<16}{shape:>14}{r['dtype']:>10}{r['time_ms']:>11.2f}{tv:>8}{mem:>11}{mv:>8}  {' '.join(note)}"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``, x86 and Arm keys; elsewhere what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def main(argv=None):
    from .cli import Parser

    parser = Parser(
        prog="el-benchmark",
        description="Forward+backward time and peak extra memory of label-smoothed CE and "
        "Encouraging Loss implementations, as ratios to torch's cross_entropy.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated NxV, e.g. 4096x10000,256x1000")
    parser.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated subset of {', '.join(IMPLS + WEIGHTED_IMPLS)} (the weighted ones "
                        "only when named)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median)")
    parser.add_argument("--log-end", type=float, default=0.75, help="conservative bonus end (default 0.75)")
    parser.add_argument("--bonus-smoothing", type=float, default=EPS,
                        help="smoothing of the bonus term (default 0.1, as the NLL)")
    parser.add_argument("--compile", action="store_true", help="CPU: also time the torch.compile back end")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, in-process memory")
    parser.add_argument("--projection", action="store_true",
                        help="time the output projection + loss (linear_ce, linear_el, fused_linear_el) instead; "
                        "--shapes NxVxH")
    parser.add_argument("--tune", action="store_true",
                        help="CUDA: time each row path / block size of the Triton kernel")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--_memory-case", dest="_memory_case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_shape", dest="_shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_case:
        _memory_child(args)
        return 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.tune and args.projection:
        parser.error("--tune and --projection are separate runs; give one")
    if args.tune and args.device != "cuda" and select_backend(torch.zeros(1, 1)) != "triton":
        parser.error("--tune times the Triton kernel: it needs --device cuda (or TRITON_INTERPRET=1 for a dry run)")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tune:
        rows, render = run_tune(args), tune_table
    elif args.projection:
        rows, render = run_projection(args), projection_table
    else:
        rows, render = run(args), table
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "smoothing": EPS,
        "bonus_smoothing": args.bonus_smoothing,
        "log_end": args.log_end,
        "memory": "cuda max_memory_allocated" if args.device == "cuda" else (
            "RSS high-water mark, in-process" if args.quick else "RSS high-water mark, fresh subprocess per case"),
    }
    print(f"# {meta['date']}  torch {meta['torch']}  {meta['device']}  threads={meta['threads']}  "
          f"EL: log_end={args.log_end} smoothing={EPS} bonus_smoothing={args.bonus_smoothing}")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as fh:
            doc = {"meta": meta, "results": rows}
            if args.tune:
                doc["summary"] = tune_summary(rows)
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
