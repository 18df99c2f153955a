"""The Triton kernels (``encouraging_loss.ops.triton_kernels``): every bonus kind,
smoothing, soft targets, per-class weights, ignored and out-of-range targets, dtypes, odd
vocabulary sizes, both row paths, the in-place backward and the fused output
projection, against the reference formula (cases in ``tests/core/ops/triton_cases.py``).

They run on a CUDA device wherever one is present, and always through
Triton's CPU interpreter (which checks the logic, not speed or the hardware).
The real compiler is exercised without a GPU too: every kernel variant is
compiled to sm_90 machine code and its register spills are bounded. On a GPU,
the loss path is also checked to make no host synchronisation.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encouraging_loss import EncouragingLoss, encouraging_loss
from encouraging_loss.bonus import BonusConfig

from helpers import ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent))
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON


def _check(results):
    bad = [r for r in results if not r[1]]
    assert not bad, bad[:20]
    names = {r[0].split("/")[0] for r in results}
    assert {"backend", "bonus", "loss", "wloss", "paths", "inplace", "not_inplace", "nograd", "bad_target",
            "fused_linear"} <= names, names


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernels_in_the_interpreter():
    """Every case through the interpreter, run as the CUDA test runs them: in CUDA_PARTS shares,
    which must be non-empty and disjoint (together they are the whole list: a case outside its
    share's condition would show up twice)."""
    env = dict(os.environ)
    for key in ("EL_FUSED_BACKEND", "EL_CHECK_TARGETS", "EL_TRITON_MAX_SINGLE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "core" / "ops" / "triton_cases.py"), str(ROOT), "cpu",
                           str(CUDA_PARTS)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")][-1]
    results = json.loads(line[len("RESULTS"):])
    _check(results)
    assert sum(r[0].startswith("loss/") for r in results) >= 4 * 9 * 5
    # per-class weights: every bonus kind, one-block (V=40) and streamed (V=131) rows, and the no-grad kernel
    assert sum(r[0].startswith("wloss/") for r in results) >= 7 * 5 + 3 * 5
    assert "nograd/weighted_values" in {r[0] for r in results}
    shares = [[r[0] for r in results if r[3] == k] for k in range(CUDA_PARTS)]
    assert all(shares)
    names = [name for share in shares for name in share]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)[:10]


CUDA_PARTS = 4  # shares of the cases: `pytest -n 4` (pytest-xdist) compiles the kernel variants in parallel


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("part", range(CUDA_PARTS))
def test_kernels_on_cuda(monkeypatch, part):
    import triton_cases

    for key in ("EL_FUSED_BACKEND", "EL_CHECK_TARGETS", "EL_TRITON_MAX_SINGLE"):
        monkeypatch.delenv(key, raising=False)
    results = triton_cases.run_all("cuda", part, CUDA_PARTS)
    bad = [r for r in results if not r[1]]
    assert results and not bad, bad[:20]
    groups = {r[0].split("/")[0] for r in results}
    expected = {0: {"backend", "loss"}, 1: {"bonus", "loss"}, 2: {"paths", "inplace", "bad_target", "loss"},
                3: {"fused_linear", "loss"}}[part] | {"wloss"}
    assert expected <= groups, groups


def _loss_path(dev, N, V):
    """``(step, t)``: ``step(target)`` runs fwd + bwd of the loss (hard and soft
    targets), the module, the timm plugin's losses and the fused projection,
    and a no-grad forward, on ``dev``; ``t`` a valid target."""
    from encouraging_loss import encouraging_loss, fused_linear_encouraging_loss

    z = torch.randn(N, V, device=dev, requires_grad=True)
    t = torch.randint(0, V, (N,), device=dev)
    t[7] = -100
    q = torch.softmax(torch.randn(N, V, device=dev), -1)
    h = torch.randn(N, 64, device=dev, requires_grad=True)
    w = torch.randn(V, 64, device=dev, requires_grad=True)
    module = EncouragingLoss(log_end=0.75, smoothing=0.1)
    timm_losses = []
    try:  # the timm plugin's losses, as timm's train.py builds them
        import timm.loss

        import timm_el  # noqa: F401  (hooks timm.loss.create_classification_loss: look it up afterwards)
    except ImportError:
        pass
    else:
        create = timm.loss.create_classification_loss
        timm_losses = [create(loss_type="encouraging", smoothing=0.1, log_end=0.75),
                       create(loss_type="encouraging", soft_targets=True, log_end=0.75)]

    def step(target):
        encouraging_loss(z, target, log_end=0.5, smoothing=0.1, reduction="sum").backward()
        module(z, target).backward()
        for loss_fn, tgt in zip(timm_losses, (target, q)):
            loss_fn(z, tgt).backward()
        encouraging_loss(z, q, log_end=0.75).backward()
        fused_linear_encouraging_loss(h, w, target, log_end=0.5, smoothing=0.1).backward()
        with torch.no_grad():
            module(z, target)
        return z.grad

    return step, t


def test_loss_path_harness_on_cpu(monkeypatch):
    """The no-sync test's loss path runs (CPU back ends): a CUDA-only test must
    not find its own bugs on a GPU. On CPU a bad class index is an immediate error."""
    for key in ("EL_FUSED_BACKEND", "EL_CHECK_TARGETS", "TRITON_INTERPRET"):
        monkeypatch.delenv(key, raising=False)
    step, t = _loss_path("cpu", 16, 37)
    grad = step(t)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    bad = t.clone()
    bad[3] = 10 ** 6
    with pytest.raises(ValueError, match="holds class index 1000000"):
        step(bad)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_host_sync_in_the_cuda_loss_path(monkeypatch):
    """The loss path of :func:`_loss_path` (a bad target included) under torch's
    sync debug mode set to error: any synchronising call (``.item()``,
    ``.any()`` in a Python ``if``, a blocking copy) raises."""
    from encouraging_loss.functional import check_targets

    for key in ("EL_FUSED_BACKEND", "EL_CHECK_TARGETS"):
        monkeypatch.delenv(key, raising=False)
    step, t = _loss_path("cuda", 512, 5003)
    step(t)  # warm-up: compilation, cached parameters
    torch.cuda.synchronize()
    bad = t.clone()
    bad[3] = 10 ** 6
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(t)
        step(bad)  # reported later, without a stall
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match="holds class index 1000000"):
        check_targets()


# --------------------------------------------------------------------------------------
# the real compiler, without a GPU


def _ptxas():
    if not HAS_TRITON:
        return None
    from encouraging_loss.tools.kernel_sass import tool

    try:
        return tool("ptxas")
    except FileNotFoundError:
        return None


def _compile(fn, names, types, const, warps):
    from encouraging_loss.tools.kernel_sass import compile_kernel

    out = compile_kernel(fn, names, types, const, warps)
    assert out["cubin"]
    return out["spill_bytes"]


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its bundled ptxas")
def test_kernels_compile_for_sm90_without_large_spills():
    """Every kernel variant the wrappers launch goes through Triton's real
    compiler and ptxas for sm_90 (types, control flow, constexpr branches the
    interpreter does not check), at the launch configurations of
    ``launch_config``; register spills stay small (a spilling kernel is slow)."""
    from encouraging_loss.ops import triton_kernels as tk
    from encouraging_loss.tools.kernel_sass import GRAD_ARGS, STATS_ARGS

    cfgs = [BonusConfig(log_end=0.75, bonus_start=0.2), BonusConfig(kind="power", gamma=2.0),
            BonusConfig(kind="cosine")]
    # V, soft targets, bonus config, bonus smoothing, logits dtype, gradient wanted, per-class weights
    cases = [(10000, False, 0, 0.1, "fp32", True, False), (32000, False, 0, 0.1, "bf16", True, False),
             (10000, True, 2, 0.1, "bf16", True, False), (5003, False, 1, 0.0, "fp64", True, False),
             (32000, False, 0, 0.1, "fp16", False, False), (1000, True, 0, 0.1, "fp32", False, False),
             (10000, False, 0, 0.1, "fp32", True, True), (32000, True, 0, 0.1, "bf16", True, True)]
    for V, soft, k, eps_b, dt, need_grad, weighted in cases:
        cdt = "fp64" if dt == "fp64" else "fp32"
        tptr = ("*" + dt) if soft else "*i64"
        # the compile-time arguments the wrappers pass on a GPU (weighted: the weight pointer, compute dtype)
        common = tk.kernel_constexprs(cfgs[k], eps_b, soft, dt == "fp64", dt != "fp64", weighted)
        wargs, wtypes = (["w_ptr"], ["*" + cdt]) if weighted else ([], [])
        block, single, warps = tk.launch_config(V)
        const = dict(BLOCK=block, SINGLE=single, SMOOTH=True, NEED_GRAD=need_grad, **common)
        types = ["*" + dt, "i64", tptr, "i64"] + ["*" + cdt] * 5 + ["i32", "i32"] + wtypes
        spills = _compile(tk._el_stats_kernel, STATS_ARGS + wargs, types, const, warps)
        assert spills <= 256, (V, soft, k, dt, weighted, spills)
        gblock, gwarps = tk._grad_launch(V, False)
        types = ["*" + dt, "i64", tptr, "i64", "*" + dt, "i64", "*" + cdt, "*" + cdt, "i64", "*" + cdt, "i32", "i32"]
        assert _compile(tk._el_grad_kernel, GRAD_ARGS + wargs, types + wtypes, dict(BLOCK=gblock, **common),
                        gwarps) == 0, (V, soft, k, dt, weighted)


def test_launch_config_table():
    from encouraging_loss.ops import triton_kernels as tk

    assert tk.launch_config(10000) == (16384, True, 32)
    assert tk.launch_config(5003) == (8192, True, 16)
    assert tk.launch_config(1000) == (1024, True, 4)
    assert tk.launch_config(32000) == (tk.STREAM_BLOCK, False, 8)
    assert tk.launch_config(131, interpret=True) == (tk.INTERPRET_BLOCK, False, 1)
    assert tk.launch_config(40, interpret=True) == (64, True, 1)
    with pytest.raises(ValueError, match="cannot hold rows of 100 classes"):
        tk.launch_config(100, block=64, single=True)
    assert tk.launch_config(10000, warps=8) == (16384, True, 8)  # the tuning override
    assert tk._grad_launch(32000, False) == (tk.STREAM_BLOCK, 16)
    assert tk._grad_launch(32000, False, block=2048, warps=4) == (2048, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("interpret", [True, False])
def test_cpu_tensors_need_a_working_interpreter(interpret):
    """With TRITON_INTERPRET=1 the interpreter's probe passes here (a loop with a
    run-time bound, which Triton 3.6's interpreter fails under recent NumPy);
    without it, CPU tensors give a clear error instead of Triton's own."""
    code = (
        "import torch\n"
        "from encouraging_loss.ops import triton_kernels as tk\n"
        "from encouraging_loss.bonus import BonusConfig\n"
        "print('PROBLEM', tk.interpreter_problem())\n"
        "z = torch.randn(3, 70); t = torch.tensor([0, 5, 69])\n"
        "try:\n"
        "    loss = tk.el_stats_triton(z, t, BonusConfig(log_end=0.75), 0.1, 0.1, -100, False, False)[0]\n"
        "    print('LOSS', loss.tolist())\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EL_TRITON_INTERPRET")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if interpret:
        assert "PROBLEM None" in proc.stdout
        loss = json.loads(proc.stdout.split("LOSS", 1)[1].strip())
        assert len(loss) == 3 and all(v == v and v > 0 for v in loss)
    else:
        assert "ERROR the EL kernels got CPU tensors, but Triton's interpreter is off: set TRITON_INTERPRET=1" \
            in proc.stdout


def _batch():
    return torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, -100])


def test_forced_triton_backend_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("EL_FUSED_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EL_TRITON_INTERPRET", raising=False)
    z, t = _batch()
    with pytest.raises(ValueError, match=r"^EL_FUSED_BACKEND=triton needs CUDA tensors, got logits on cpu"):
        encouraging_loss(z.requires_grad_(), t)
