"""The fused Encouraging Loss (encouraging_loss.ops.fused) against the reference.

Every check compares ``fused_el_rows`` with ``functional.reference_rows`` (same
signature and return contract): per-row loss, plain NLL, bonus term and the
gradient with respect to the logits. The Triton kernel runs the same checks
under Triton's CPU interpreter in a subprocess (``TRITON_INTERPRET`` is read
when ``@triton.jit`` decorates, so it must be set before the import).
"""
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import encouraging_loss.ops.fused as fused
from encouraging_loss import encouraging_loss
from encouraging_loss.bonus import (
    BonusConfig,
    bonus_grad,
    bonus_value,
    bonus_value_and_grad,
)
from encouraging_loss.ops.fused import TWICE_MESSAGE, FusedELFunction, fused_el_rows
from encouraging_loss.reference import reference_rows

from helpers import ROOT
from spec_formulas import spec_grad_rows, spec_loss_rows, spec_weights

HAS_TRITON = importlib.util.find_spec("triton") is not None

CFGS = {
    "normal": BonusConfig(),
    "le075": BonusConfig(log_end=0.75),
    "le05": BonusConfig(log_end=0.5, rho=0.7),
    "start": BonusConfig(bonus_start=0.3),
    "start_le": BonusConfig(log_end=0.75, bonus_start=0.2),
    "power": BonusConfig(kind="power", gamma=2.0),
    "power_half": BonusConfig(kind="power", gamma=0.5),
    "cosine": BonusConfig(kind="cosine"),
    "ce": BonusConfig(rho=0.0),
}
# (eps, eps_b): no smoothing, shared smoothing, NLL only, bonus only
SMOOTHING = [(0.0, 0.0), (0.1, 0.1), (0.1, 0.0), (0.0, 0.2)]


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    """Eager back end with small chunks (several chunks and a short tail)."""
    monkeypatch.setenv("EL_FUSED_BACKEND", "eager")
    monkeypatch.setattr(fused, "CHUNK_ELEMS", 64)


def _inputs(N, V, soft, dtype=torch.float32, scale=3.0, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if soft:
        t = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, -1).to(dtype)
    else:
        t = torch.randint(0, V, (N,), generator=gen)
        if ignore_every:
            t[::ignore_every] = -100
    return z, t


def _run(fn, z, t, cfg, eps, eps_b, soft, go=None, ignore_index=-100):
    x = z.clone().requires_grad_()
    out = fn(x, t, cfg, eps, eps_b, ignore_index, soft)
    if go is None:
        go = torch.linspace(0.5, 1.5, out[0].numel(), dtype=out[0].dtype, device=out[0].device).view_as(out[0])
    (out[0] * go).sum().backward()
    return out, x.grad


def _compare(z, t, cfg, eps, eps_b, soft, atol, rtol=1e-5, fn=fused_el_rows):
    ref, gref = _run(reference_rows, z, t, cfg, eps, eps_b, soft)
    out, g = _run(fn, z, t, cfg, eps, eps_b, soft)
    for name, a, b in zip(("loss", "nll", "bonus"), out[:3], ref[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if soft:
        assert out[3] is None
    else:
        assert torch.equal(out[3], ref[3])
    assert g.dtype == z.dtype
    torch.testing.assert_close(g.double(), gref.double(), atol=atol, rtol=rtol)
    assert not out[1].requires_grad and not out[2].requires_grad


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("eps,eps_b", SMOOTHING)
@pytest.mark.parametrize("name", list(CFGS))
def test_matches_reference_fp32(name, eps, eps_b, soft):
    z, t = _inputs(23, 17, soft)
    _compare(z, t, CFGS[name], eps, eps_b, soft, atol=1e-5)


@pytest.mark.parametrize("name", ["normal", "le05", "start_le", "power", "cosine", "ce"])
def test_matches_reference_fp64(name):
    for soft in (False, True):
        z, t = _inputs(11, 13, soft, dtype=torch.float64)
        _compare(z, t, CFGS[name], 0.1, 0.05, soft, atol=1e-12, rtol=1e-10)


def test_matches_spec_oracle():
    """Independent float64 oracle (tests/spec_formulas.py), separate eps / eps_b / rho."""
    z, t = _inputs(9, 12, False, dtype=torch.float64)
    t[0] = 3
    for cfg, kw in [
        (BonusConfig(log_end=0.75, rho=0.6), dict(log_end=0.75)),
        (BonusConfig(bonus_start=0.3), dict(bonus_start=0.3)),
        (BonusConfig(kind="cosine", rho=2.0), dict(kind="cosine")),
    ]:
        w, u = spec_weights(t, 12, 0.1), spec_weights(t, 12, 0.3)
        out, g = _run(fused_el_rows, z, t, cfg, 0.1, 0.3, False, go=torch.ones(9, dtype=torch.float64))
        torch.testing.assert_close(out[0], spec_loss_rows(z, w, u, rho=cfg.rho, **kw).where(t >= 0, 0.0))
        torch.testing.assert_close(g, spec_grad_rows(z, w, u, rho=cfg.rho, **kw))


def test_leading_dims_padding_and_reductions():
    """(B, T, V) logits with padding; per-row grad_output (reduction none), mean and sum."""
    z, t = _inputs(24, 19, False, ignore_every=0)
    z, t = z.view(4, 6, 19), t.view(4, 6)
    t[:, 4:] = 1  # padding
    cfg = CFGS["le075"]
    for reduce in ("none", "mean", "sum"):
        grads, outs = [], []
        for fn in (reference_rows, fused_el_rows):
            x = z.clone().requires_grad_()
            loss, nll, bonus, valid = fn(x, t, cfg, 0.1, 0.1, 1, False)
            assert loss.shape == (4, 6) and valid.shape == (4, 6)
            assert torch.all(loss[:, 4:] == 0) and torch.all(nll[:, 4:] == 0) and torch.all(bonus[:, 4:] == 0)
            if reduce == "none":
                red = (loss * torch.arange(24.0).view(4, 6)).sum()
            elif reduce == "mean":
                red = loss.sum() / valid.sum()
            else:
                red = loss.sum()
            red.backward()
            grads.append(x.grad)
            outs.append(red.detach())
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
        assert torch.all(grads[1][:, 4:] == 0)


def test_all_ignored_and_empty():
    z, t = _inputs(5, 7, False)
    t[:] = -100
    out, g = _run(fused_el_rows, z, t, CFGS["normal"], 0.1, 0.1, False)
    assert torch.all(out[0] == 0) and torch.all(g == 0)
    x = torch.zeros(0, 7, requires_grad=True)
    loss = fused_el_rows(x, torch.zeros(0, dtype=torch.long), CFGS["normal"], 0.1, 0.1, -100, False)[0]
    loss.sum().backward()
    assert loss.shape == (0,) and x.grad.shape == (0, 7)


def test_non_contiguous_logits():
    z, t = _inputs(10, 26, False)
    zt = z.t().contiguous().t()  # same values, column-major
    assert not zt.is_contiguous()
    _compare(zt, t, CFGS["le05"], 0.1, 0.1, False, atol=1e-5)


def test_nan_row_stays_nan_and_isolated():
    z, t = _inputs(6, 9, False, ignore_every=0)
    z[2, 3] = float("nan")
    out, g = _run(fused_el_rows, z, t, CFGS["le075"], 0.1, 0.1, False)
    ref, _ = _run(reference_rows, z, t, CFGS["le075"], 0.1, 0.1, False)
    assert torch.isnan(out[0][2])
    keep = torch.arange(6) != 2
    torch.testing.assert_close(out[0][keep], ref[0][keep], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(g[keep]).all()


@pytest.mark.parametrize("name", ["normal", "le075", "start", "power"])
def test_large_margins(name):
    """p_y close to 1 (margins 8..40): the clamp region and the tangent."""
    V = 11
    z = torch.zeros(8, V, dtype=torch.float64)
    t = torch.arange(8) % V
    margins = torch.tensor([8.0, 10.0, 11.5, 12.0, 13.0, 15.0, 20.0, 40.0], dtype=torch.float64)
    z[torch.arange(8), t] = margins
    cfg = CFGS[name]
    _compare(z, t, cfg, 0.1, 0.1, False, atol=1e-10, rtol=1e-8)
    _compare(z, t, cfg, 0.0, 0.0, False, atol=1e-10, rtol=1e-8)
    # float32: as close to the float64 truth as the float32 reference is (log(1 - p) near
    # the clamp is ill-conditioned in float32 whichever way it is computed)
    ref64, g64 = _run(reference_rows, z, t, cfg, 0.1, 0.1, False)
    ref32, g32 = _run(reference_rows, z.float(), t, cfg, 0.1, 0.1, False)
    out, g = _run(fused_el_rows, z.float(), t, cfg, 0.1, 0.1, False)
    assert torch.isfinite(out[0]).all() and torch.isfinite(g).all()
    err_ref = (ref32[0].double() - ref64[0]).abs().max().item()
    assert (out[0].double() - ref64[0]).abs().max().item() <= 2 * err_ref + 1e-5
    gerr_ref = (g32.double() - g64).abs().max().item()
    assert (g.double() - g64).abs().max().item() <= 2 * gerr_ref + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_half_precision(dtype, soft):
    z, t = _inputs(21, 33, soft, dtype=dtype)
    ref, gref = _run(reference_rows, z, t, CFGS["le075"], 0.1, 0.1, soft)
    out, g = _run(fused_el_rows, z, t, CFGS["le075"], 0.1, 0.1, soft)
    assert out[0].dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    unit = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one rounding of the stored gradient
    torch.testing.assert_close(g.float(), gref.float(), atol=2 * unit, rtol=2 * unit)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_huge_logits(dtype):
    gen = torch.Generator().manual_seed(3)
    z = ((torch.rand(16, 50, generator=gen) * 2 - 1) * 1e4).to(dtype)
    t = torch.randint(0, 50, (16,), generator=gen)
    for name in ("normal", "le075", "cosine"):
        out, g = _run(fused_el_rows, z, t, CFGS[name], 0.1, 0.1, False)
        assert all(torch.isfinite(v).all() for v in out[:3]) and torch.isfinite(g).all()
        ref, _ = _run(reference_rows, z, t, CFGS[name], 0.1, 0.1, False)
        torch.testing.assert_close(out[0], ref[0], atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("name", ["normal", "le05", "start", "power", "cosine"])
def test_gradcheck_float64(name):
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, -100, 2, 3])
    q = torch.softmax(torch.randn(5, 6, generator=gen, dtype=torch.float64), -1)
    for tgt, soft, eps, eps_b in [(t, False, 0.1, 0.2), (t, False, 0.0, 0.0), (q, True, 0.1, 0.0)]:
        fn = lambda x: FusedELFunction.apply(x, tgt, cfg, eps, eps_b, -100, soft, "eager")[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


def test_backward_twice_with_retain_graph():
    z, t = _inputs(7, 9, False)
    x = z.clone().requires_grad_()
    loss = fused_el_rows(x, t, CFGS["le075"], 0.1, 0.1, -100, False)[0]
    red = loss.sum() / 3
    red.backward(retain_graph=True)
    first = x.grad.clone()
    red.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_chunk_sizes_agree(monkeypatch):
    z, t = _inputs(40, 10, False)
    outs = []
    for elems in (10, 70, 1 << 20):
        monkeypatch.setattr(fused, "CHUNK_ELEMS", elems)
        outs.append(_run(fused_el_rows, z, t, CFGS["le05"], 0.1, 0.1, False))
    for out, g in outs[1:]:
        torch.testing.assert_close(out[0], outs[0][0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g, outs[0][1], atol=1e-6, rtol=1e-6)


def test_only_target_bonus_when_not_dense(monkeypatch):
    """rho == 0, or eps_b == 0 with hard targets: the bonus is evaluated at p_y only."""
    sizes = []

    def spy(fn):
        def wrapped(lp, cfg, *args, **kw):
            sizes.append(lp.numel())
            return fn(lp, cfg, *args, **kw)
        return wrapped

    monkeypatch.setattr(fused, "bonus_value", spy(bonus_value))
    monkeypatch.setattr(fused, "bonus_grad", spy(bonus_grad))
    monkeypatch.setattr(fused, "bonus_value_and_grad", spy(bonus_value_and_grad))
    z, t = _inputs(8, 30, False)
    _run(fused_el_rows, z, t, CFGS["le075"], 0.1, 0.0, False)
    assert sizes and max(sizes) <= 8
    sizes.clear()
    with torch.no_grad():
        fused_el_rows(z, t, CFGS["le075"], 0.1, 0.0, -100, False)
    assert sizes and max(sizes) <= 8
    sizes.clear()
    _run(fused_el_rows, z, t, CFGS["ce"], 0.1, 0.1, False)
    assert not sizes


# ------------------------------------------------------------------------------------
# no gradient needed: values only, no N x V buffer


def _values(z, t, cfg, eps, eps_b, soft, mode):
    """fused_el_rows in one of three modes: "grad" (logits require grad, grad enabled),
    "no_grad" (torch.no_grad()) and "plain" (logits that do not require grad)."""
    if mode == "grad":
        return fused_el_rows(z.clone().requires_grad_(), t, cfg, eps, eps_b, -100, soft)
    if mode == "no_grad":
        with torch.no_grad():
            return fused_el_rows(z.clone().requires_grad_(), t, cfg, eps, eps_b, -100, soft)
    return fused_el_rows(z, t, cfg, eps, eps_b, -100, soft)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("eps,eps_b", SMOOTHING)
@pytest.mark.parametrize("name", ["normal", "le075", "start_le", "power", "cosine", "ce"])
def test_no_grad_values_match_grad_path(name, eps, eps_b, soft, monkeypatch):
    calls = []
    real = fused._forward_rows
    monkeypatch.setattr(fused, "_forward_rows", lambda *a, **k: calls.append(k.get("need_grad", True)) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16):
        z, t = _inputs(23, 17, soft, dtype=dtype)
        ref = _values(z, t, CFGS[name], eps, eps_b, soft, "grad")
        assert ref[0].requires_grad
        for mode in ("no_grad", "plain"):
            calls.clear()
            out = _values(z, t, CFGS[name], eps, eps_b, soft, mode)
            assert calls == [False], mode
            assert not any(v.requires_grad for v in out[:3])
            for a, b in zip(out[:3], ref[:3]):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6)
            if not soft:
                assert torch.equal(out[3], ref[3])


def test_no_grad_apply_and_edge_cases():
    """FusedELFunction.apply on logits that need no grad stores no gradient buffer;
    empty, non-contiguous and all-ignored inputs work without the gradient."""
    z, t = _inputs(10, 26, False)
    loss = FusedELFunction.apply(z, t, CFGS["le05"], 0.1, 0.1, -100, False, "eager")[0]
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _values(z, t, CFGS["le05"], 0.1, 0.1, False, "grad")[0].detach())
    zt = z.t().contiguous().t()
    with torch.no_grad():
        torch.testing.assert_close(fused_el_rows(zt, t, CFGS["le05"], 0.1, 0.1, -100, False)[0], loss)
        empty = fused_el_rows(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), CFGS["normal"], 0.1, 0.1, -100,
                              False)
        assert empty[0].shape == (0,)
        t[:] = -100
        assert torch.all(fused_el_rows(z, t, CFGS["normal"], 0.1, 0.1, -100, False)[0] == 0)


_MEMORY_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    os.environ["EL_FUSED_BACKEND"] = sys.argv[2]
    import torch
    torch.set_num_threads(1)
    from encouraging_loss.bonus import BonusConfig
    from encouraging_loss.ops.fused import fused_el_rows

    def status(key):  # bytes
        with open("/proc/self/status") as f:
            return [int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":")][0]

    def reset_peak():  # the peak so far (import time included) would hide what follows
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    def peak():
        return status("VmHWM")

    N, V = 1024, 8192
    z = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    zs, q = z[:, : V // 2].contiguous(), torch.softmax(z[:, V // 2 :], -1)  # soft-target case
    cfg = BonusConfig(log_end=0.75)
    fused_el_rows(z[:64], t[:64], cfg, 0.1, 0.1, -100, False)  # warm-up (lazy imports, allocator)
    fused_el_rows(zs[:64], q[:64], cfg, 0.1, 0.1, -100, True)
    base = reset_peak()
    if sys.argv[3] == "grad":  # the probe sees the N x V gradient
        fused_el_rows(z.requires_grad_(), t, cfg, 0.1, 0.1, -100, False)[0].sum().backward()
    else:
        with torch.no_grad():
            fused_el_rows(z.requires_grad_(), t, cfg, 0.1, 0.1, -100, False)
        z.requires_grad_(False)
        fused_el_rows(z, t, cfg, 0.1, 0.1, -100, False)
        fused_el_rows(z, t, BonusConfig(kind="cosine"), 0.1, 0.0, -100, False)
        fused_el_rows(z, t, BonusConfig(rho=0.0), 0.1, 0.1, -100, False)
        fused_el_rows(zs, q, cfg, 0.1, 0.1, -100, True)
    print("MEM" + json.dumps({"nv4": N * V * 4, "delta": peak() - base}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc (Linux)")
def test_no_grad_allocates_no_full_buffer(tmp_path):
    """Peak RSS of a fresh process: without a gradient the fused loss needs chunk-sized
    scratch only; with one, at least the N x V gradient (checks that the probe sees it)."""
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    mem = {}
    for mode in ("no_grad", "grad"):
        proc = subprocess.run(
            [sys.executable, str(script), str(ROOT), "eager", mode], capture_output=True, text=True, timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        mem[mode] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("MEM")][-1][3:])
    nv4 = mem["grad"]["nv4"]
    assert mem["grad"]["delta"] > 0.9 * nv4, mem
    assert mem["no_grad"]["delta"] < 0.25 * nv4, mem


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("EL_FUSED_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EL_TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EL_COMPILE", raising=False)
    assert fused.select_backend(torch.zeros(2, 3)) == "eager"
    big = torch.zeros(1, 1).expand(1, fused.COMPILE_MIN_ELEMS)  # auto: large CPU inputs compile
    assert fused.select_backend(big) == "compiled"
    monkeypatch.setenv("EL_COMPILE", "0")
    assert fused.select_backend(big) == "eager"
    monkeypatch.setenv("EL_COMPILE", "1")
    assert fused.select_backend(torch.zeros(2, 3)) == "compiled"
    monkeypatch.setenv("EL_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EL_FUSED_BACKEND"):
        fused.select_backend(torch.zeros(2, 3))


def test_compile_failure_falls_back(monkeypatch):
    """A failing torch.compile warns once and gives the eager results."""
    monkeypatch.setenv("EL_FUSED_BACKEND", "compiled")

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(fused.torch, "compile", broken)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_COMPILE_FAILED", set())
    z, t = _inputs(70, 9, False)
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        _compare(z, t, CFGS["le075"], 0.1, 0.1, False, atol=1e-5)
    _compare(z, t, CFGS["le075"], 0.1, 0.1, False, atol=1e-5)  # no second attempt


@pytest.mark.skipif(
    os.environ.get("EL_TEST_COMPILE", "1") == "0" or not (shutil.which("g++") or shutil.which("c++")),
    reason="EL_TEST_COMPILE=0, or no C++ compiler for inductor (compiles 4 configurations, ~25 s)",
)
def test_compiled_backend(monkeypatch):
    monkeypatch.setenv("EL_FUSED_BACKEND", "compiled")
    z, t = _inputs(fused.COMPILED_ROWS + 5, 40, False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _compare(z, t, CFGS["le075"], 0.1, 0.1, False, atol=1e-5)
        _compare(z, t, BonusConfig(log_end=0.75, rho=0.3), 0.05, 0.1, False, atol=1e-5)  # no recompile
        _compare(z, t, CFGS["le075"], 0.1, 0.0, False, atol=1e-5)
        zs, q = _inputs(fused.COMPILED_ROWS + 5, 40, True)
        _compare(zs, q, CFGS["start"], 0.1, 0.05, True, atol=1e-5)
        zh, th = _inputs(fused.COMPILED_ROWS + 5, 40, False, dtype=torch.bfloat16)
        ref, gref = _run(reference_rows, zh, th, CFGS["le075"], 0.1, 0.1, False)
        out, g = _run(fused_el_rows, zh, th, CFGS["le075"], 0.1, 0.1, False)
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.float(), gref.float(), atol=2 ** -6, rtol=2 ** -6)
        # no gradient: the statistics pass only, same values
        ref = _values(z, t, CFGS["le075"], 0.1, 0.1, False, "grad")
        with torch.no_grad():
            out = fused_el_rows(z, t, CFGS["le075"], 0.1, 0.1, -100, False)
        for a, b in zip(out[:3], ref[:3]):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6)


# The Triton kernels' tests (interpreter, CUDA, sm_90 compilation): tests/core/ops/test_triton_kernels.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bonus_value_and_grad_matches_separate(dtype):
    """The combined bonus function gives exactly bonus_value and bonus_grad (with or without p)."""
    lp = torch.cat([torch.linspace(-40, -1, 200), torch.linspace(-1, 0, 2000),
                    torch.log(torch.tensor([0.2, 0.3, 0.5, 0.75, 1 - 1e-5, 1 - 2e-6]))]).to(dtype)
    cfgs = list(CFGS.values()) + [BonusConfig(log_end=1 - 1e-6), BonusConfig(kind="cosine", rho=0.5)]
    for cfg in cfgs:
        b, g = bonus_value(lp, cfg), bonus_grad(lp, cfg)
        for p in (None, torch.exp(lp)):
            b2, g2 = bonus_value_and_grad(lp, cfg, p=p)
            assert torch.equal(b, b2) and torch.equal(g, g2), cfg
            assert b2.dtype == dtype and g2.dtype == dtype
    from encouraging_loss import bonus as bonus_mod

    assert bonus_mod.LP_MAX == math.log1p(-bonus_mod.CLAMP) and bonus_mod.LOG_CLAMP == math.log(bonus_mod.CLAMP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bonus_rows_equals_bonus_value_and_grad(dtype):
    """The row form (exact low-p formula everywhere but each row's maximum) gives
    bonus_value / bonus_grad: rows with p near 1, ties at the maximum, -inf logits."""
    from encouraging_loss.bonus import bonus_rows

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(40, 33, generator=gen, dtype=torch.float64) * 4
    z[0, 3] = 30.0  # p_max = 1 - tiny: clamp region
    z[1, 3] = 9.0  # p_max near 1
    z[2] = 0.0  # all ties
    z[3, :2] = 5.0  # two tied maxima, p = 1/2 each at most
    z[4, 5] = float("-inf")
    lp = torch.log_softmax(z, -1).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    cfgs = list(CFGS.values()) + [BonusConfig(log_end=0.3), BonusConfig(log_end=1 - 1e-6)]
    for cfg in cfgs:
        b, g = bonus_rows(lp, cfg)
        torch.testing.assert_close(b, bonus_value(lp, cfg), atol=tol, rtol=tol, msg=str(cfg))
        torch.testing.assert_close(g, bonus_grad(lp, cfg), atol=tol, rtol=tol, msg=str(cfg))
        b2, g2 = bonus_rows(lp, cfg, p=torch.exp(lp), top_lp=lp.amax(-1, keepdim=True))
        assert torch.equal(b, b2) and torch.equal(g, g2)
        assert bonus_rows(lp, cfg, want_g=False)[1] is None and bonus_rows(lp, cfg, want_b=False)[0] is None


SETTINGS = [
    dict(log_end=1.0), dict(log_end=0.75), dict(log_end=0.5, bonus_rho=0.7), dict(bonus_start=0.3),
    dict(log_end=0.75, bonus_start=0.2), dict(bonus="power", bonus_gamma=2.0), dict(bonus="power", bonus_gamma=0.5),
    dict(bonus="cosine"), dict(bonus_rho=0.0),
]


TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _case(seed):
    """A random case: settings, shape, dtype, targets, ignore index, reduction."""
    rng = random.Random(seed)
    kw = dict(rng.choice(SETTINGS))
    kw["smoothing"] = rng.choice([0.0, 0.1, 0.3])
    kw["bonus_smoothing"] = rng.choice([None, 0.0, 0.05])
    kw["reduction"] = rng.choice(["mean", "sum", "none"])
    V = rng.choice([1, 2, 7, 33, 130])
    lead = rng.choice([(5,), (3, 4), (2, 1, 3), (0,)])
    dtype = rng.choice([torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16])
    soft = rng.random() < 0.4
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, V, generator=gen, dtype=torch.float64) * rng.choice([0.5, 3.0, 8.0])).to(dtype)
    if soft:
        q = torch.softmax(torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2, -1)
        if rng.random() < 0.5:  # rows need not sum to 1 (e.g. smoothed / mixed targets)
            q = q * rng.choice([0.5, 1.5])
        t = q.to(rng.choice([dtype, torch.float64]) if dtype == torch.float64 else dtype)
        kw["ignore_index"] = -100
    else:
        t = torch.randint(0, V, lead, generator=gen)
        ignore = rng.choice([-100, 0, V - 1, -1])  # an ignored class may be a real class index
        if t.numel():
            t.view(-1)[:: rng.choice([2, 3, 5])] = ignore
        kw["ignore_index"] = ignore
    return kw, z, t, soft


def _first_and_second_order(z, t, soft, kw, impl, create_graph):
    """Loss, logit gradient, target gradient (soft) and the gradient of a
    penalty on the logit gradient (``create_graph``), through a linear layer so
    that the penalty's gradient reaches a parameter."""
    x = z.clone().requires_grad_()
    w = torch.ones((), dtype=z.dtype, requires_grad=True)  # a scale parameter before the loss
    tt = t.clone().requires_grad_() if soft else t
    loss = encouraging_loss(x * w, tt, impl=impl, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    total = (loss * go).sum()
    inputs = (x, tt) if soft else (x,)
    grads = torch.autograd.grad(total, inputs, create_graph=create_graph, allow_unused=True)
    second = None
    if create_graph:
        penalty = grads[0].float().pow(2).sum()
        (second,) = torch.autograd.grad(penalty, w, allow_unused=True)
    return loss, grads, second


@pytest.mark.parametrize("seed", range(60))
def test_property_sweep_fused_equals_reference(seed):
    kw, z, t, soft = _case(seed)
    create_graph = seed % 3 == 0
    tol = TOL[z.dtype]
    ref = _first_and_second_order(z, t, soft, kw, "reference", create_graph)
    if create_graph:
        with pytest.raises(RuntimeError) as err:
            _first_and_second_order(z, t, soft, kw, "fused", create_graph)
        assert TWICE_MESSAGE in str(err.value)
        assert ref[2] is None or torch.isfinite(ref[2]).all()
    out = _first_and_second_order(z, t, soft, kw, "fused", False)
    torch.testing.assert_close(out[0], ref[0], atol=tol, rtol=tol)
    for a, b in zip(out[1], ref[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def test_double_backward_penalty_is_refused_not_ignored():
    """The issue's probe: ``loss + 10 * |dL/dW|^2`` through a linear layer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (16,), generator=gen)
    w0 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "fused"):
        w = w0.clone().requires_grad_()
        loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        grads[impl] = g.detach()
        if impl == "fused":
            with pytest.raises(RuntimeError, match="cannot be differentiated again"):
                (loss + 10 * g.pow(2).sum()).backward()
            loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            with pytest.raises(RuntimeError, match=r"Use impl='reference'"):
                g.pow(2).sum().backward()
            loss = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            with pytest.raises(RuntimeError, match="cannot be differentiated again"):
                torch.autograd.grad(g.pow(2).sum(), w, allow_unused=True)
        else:
            (loss + 10 * g.pow(2).sum()).backward()
            penalised = w.grad.clone()
            w.grad = None
            loss2 = encouraging_loss(x @ w.T, t, log_end=0.75, smoothing=0.1, impl=impl)
            loss2.backward()
            assert (penalised - w.grad).abs().max() > 1e-3  # the penalty has a gradient
    torch.testing.assert_close(grads["fused"], grads["reference"])  # first order still right


def test_create_graph_without_second_use_gives_the_right_gradient():
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    (g_f,) = torch.autograd.grad(encouraging_loss(z, t, log_end=0.5), z, create_graph=True)
    (g_r,) = torch.autograd.grad(encouraging_loss(z, t, log_end=0.5, impl="reference"), z)
    torch.testing.assert_close(g_f.detach(), g_r)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_torch_func_transforms_match_the_reference(soft):
    from torch.func import grad, jacrev, vmap

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 7, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, 6, 7, generator=gen, dtype=torch.float64), -1) if soft \
        else torch.randint(0, 7, (4, 6), generator=gen)
    kw = dict(log_end=0.75, smoothing=0.1)
    for impl in ("fused", "reference"):
        g = grad(lambda x: encouraging_loss(x, t, impl=impl, **kw))(z)
        per = vmap(lambda x, y: encouraging_loss(x, y, impl=impl, **kw))(z, t)
        jac = jacrev(lambda x: encouraging_loss(x[0], t[0], impl=impl, reduction="none", **kw))(z)
        if impl == "fused":
            results = (g, per, jac)
    torch.testing.assert_close(results[0], g)
    torch.testing.assert_close(results[1], per)
    torch.testing.assert_close(results[2], jac)


def test_forward_mode_ad_matches_the_reference():
    import torch.autograd.forward_ad as fwAD

    z = torch.randn(5, 8, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.randint(0, 8, (5,))
    tangents = []
    for impl in ("fused", "reference"):
        with fwAD.dual_level():
            out = encouraging_loss(fwAD.make_dual(z, v), t, log_end=0.5, impl=impl)
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[0], tangents[1])


def test_soft_target_gradient_is_linear_in_the_target():
    """EL_SPEC 2.4: d loss / d q_k = -(1 - eps) log p_k + rho (1 - eps_b) b(p_k)."""
    from encouraging_loss.bonus import bonus_value

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), -1).requires_grad_()
    encouraging_loss(z, q, log_end=0.5, bonus_rho=0.7, smoothing=0.1, bonus_smoothing=0.2, reduction="sum").backward()
    lp = torch.log_softmax(z, -1)
    expected = -(1 - 0.1) * lp + 0.7 * (1 - 0.2) * bonus_value(lp, BonusConfig(log_end=0.5))
    torch.testing.assert_close(q.grad, expected)


def test_soft_target_gradient_only_when_asked(monkeypatch):
    calls = []
    original = fused._soft_target_grad
    monkeypatch.setattr(fused, "_soft_target_grad", lambda *a: calls.append(1) or original(*a))
    z = torch.randn(4, 6, requires_grad=True)
    q = torch.softmax(torch.randn(4, 6), -1)
    encouraging_loss(z, q).backward()
    assert calls == [] and q.grad is None
    q.requires_grad_()
    encouraging_loss(z.detach(), q).backward()  # the target alone may require grad
    assert calls == [1] and q.grad is not None


# ----------------------------------------------------------------------------- per-class weights


def _weight(V, dtype=torch.float64, seed=11):
    c = torch.rand(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0
    c[1] = 0.0
    return c.to(dtype)


def _compare_weighted(z, t, cfg, eps, eps_b, soft, weight, atol, rtol=1e-5):
    """fused_el_rows(weight=...) against reference_rows(weight=...): values, NLL, bonus and gradient."""
    ref, gref = _run(functools.partial(reference_rows, weight=weight), z, t, cfg, eps, eps_b, soft)
    out, g = _run(functools.partial(fused_el_rows, weight=weight), z, t, cfg, eps, eps_b, soft)
    for name, a, b in zip(("loss", "nll", "bonus"), out[:3], ref[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    assert g.dtype == z.dtype
    torch.testing.assert_close(g.double(), gref.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("eps,eps_b", SMOOTHING)
@pytest.mark.parametrize("name", list(CFGS))
def test_weighted_matches_reference(name, eps, eps_b, soft):
    """Eager back end (several chunks), every bonus kind incl. aggressive / conservative, all smoothings."""
    z, t = _inputs(23, 17, soft)
    _compare_weighted(z, t, CFGS[name], eps, eps_b, soft, _weight(17, torch.float32), atol=1e-5)


def test_weighted_half_precision_no_grad_and_non_contiguous_weight():
    z, t = _inputs(21, 33, False, dtype=torch.bfloat16)
    c = _weight(66, torch.float32)[::2]  # a strided view
    assert not c.is_contiguous()
    ref, gref = _run(functools.partial(reference_rows, weight=c), z, t, CFGS["le075"], 0.1, 0.1, False)
    out, g = _run(functools.partial(fused_el_rows, weight=c), z, t, CFGS["le075"], 0.1, 0.1, False)
    assert out[0].dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.float(), gref.float(), atol=2 * 2.0 ** -7, rtol=2 * 2.0 ** -7)
    with torch.no_grad():
        nog = fused_el_rows(z, t, CFGS["le075"], 0.1, 0.1, -100, False, weight=c)
    for a, b in zip(nog[:3], out[:3]):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6)


def test_unweighted_path_never_enters_the_weighted_code(monkeypatch):
    """weight=None takes the path of before (one Python branch): none of the weighted functions runs."""
    def refuse(*a, **k):
        raise AssertionError("weighted code on the unweighted path")

    for name in ("_fused_weighted_rows", "_chunk_stats_weighted", "_chunk_grad_weighted"):
        monkeypatch.setattr(fused, name, refuse)
    z, t = _inputs(9, 12, False)
    encouraging_loss(z.requires_grad_(), t, log_end=0.75, smoothing=0.1).backward()
    encouraging_loss(z, torch.softmax(z.detach(), -1).requires_grad_()).backward()


@pytest.mark.skipif(
    os.environ.get("EL_TEST_COMPILE", "1") == "0" or not (shutil.which("g++") or shutil.which("c++")),
    reason="EL_TEST_COMPILE=0, or no C++ compiler for inductor (compiles 2 weighted configurations)",
)
def test_weighted_compiled_backend(monkeypatch):
    monkeypatch.setenv("EL_FUSED_BACKEND", "compiled")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        z, t = _inputs(fused.COMPILED_ROWS + 5, 40, False)
        _compare_weighted(z, t, CFGS["le075"], 0.1, 0.1, False, _weight(40, torch.float32), atol=1e-5)
        zs, q = _inputs(fused.COMPILED_ROWS + 5, 40, True)
        _compare_weighted(zs, q, CFGS["start_le"], 0.1, 0.05, True, _weight(40, torch.float32), atol=1e-5)
