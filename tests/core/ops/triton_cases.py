"""The Triton kernels' test cases, one list for both places they run:

* on a CUDA device, in the test process (``tests/core/ops/test_triton_kernels.py``
  wherever a GPU is present), at realistic vocabulary sizes;
* through Triton's CPU interpreter, in a subprocess with ``TRITON_INTERPRET=1``
  (read when Triton is imported), at small sizes with small blocks so that
  both the one-block and the streamed row paths run.

``python tests/core/ops/triton_cases.py ROOT DEVICE [PARTS]`` prints ``RESULTS<json>``: a list of
``[case, ok, detail]`` (with PARTS, the shares one after the other, ``[case, ok, detail, share]``).
``run_all(device, part, parts)`` runs one of ``parts`` disjoint shares of the cases (the loss cases get the
same inputs whatever the split), so that processes can compile the kernel variants in parallel on a GPU machine.
"""
import json
import math
import os
import sys


def _setup(root):
    if root not in sys.path:
        sys.path.insert(0, root)


def run_all(device: str, part: int = 0, parts: int = 1):
    import torch

    import encouraging_loss.ops.fused as fused
    from encouraging_loss.bonus import BonusConfig, bonus_grad, bonus_value
    from encouraging_loss.ops import triton_kernels as tk
    from encouraging_loss.reference import reference_rows

    cuda = device == "cuda"
    results = []
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")

    def mine(k):  # section k (or the k-th loss case) belongs to this share
        return k % parts == part

    n_compared = [0]

    def record(case, ok, detail=""):
        results.append([case, bool(ok), detail])

    if mine(0):
        record("backend", fused.select_backend(torch.zeros(1, 1, device=device)) == "triton")
    cfgs = {
        "normal": BonusConfig(),
        "le075": BonusConfig(log_end=0.75),
        "le03_rho": BonusConfig(log_end=0.3, rho=0.7),
        "aggressive": BonusConfig(bonus_start=0.3),
        "aggr_le": BonusConfig(log_end=0.75, bonus_start=0.2),
        "power2": BonusConfig(kind="power", gamma=2.0),
        "power05": BonusConfig(kind="power", gamma=0.5),
        "cosine": BonusConfig(kind="cosine"),
        "ce": BonusConfig(rho=0.0),
    }

    # 1. the kernels' bonus functions (accurate scalar form and row form) against bonus.py
    lp = torch.cat([torch.linspace(-30, -1, 40), torch.linspace(-1, -1e-7, 200),
                    torch.log(torch.tensor([0.2, 0.3, 0.5, 0.75, 1 - 1e-5, 1 - 2e-5, 1 - 1e-6]))]).double()
    low = lp <= -math.log(2.0)
    for name, cfg in cfgs.items() if mine(1) else ():
        for dt in (torch.float32, torch.float64):
            x = lp.to(dt).to(device)
            b, g, bf, gf = (v.cpu() for v in tk.bonus_triton(x, cfg))
            rb, rg = bonus_value(lp.to(dt), cfg), bonus_grad(lp.to(dt), cfg)
            tol = 1e-5 if dt == torch.float32 else 1e-12
            close = lambda a, r: bool(torch.allclose(a, r, atol=tol, rtol=tol))  # noqa: E731
            record(f"bonus/{name}/{dt}", close(b, rb) and close(g, rg) and close(bf[low], rb[low])
                   and close(gf[low], rg[low]), float((b - rb).abs().max()))

    # 2. loss, NLL, bonus and logit gradient against the reference, grad_output per row
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 67, 131] if not cuda else [1, 3, 1000, 5003, 16384 + 7, 32000]
    rows = 6 if not cuda else 48

    def inputs(N, V, soft, dt):
        z = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
        if V > 5:
            z[0, 5] = 14.0  # p_y near 1
            z[1, :] = 0.0  # a row of ties
        if soft:
            t = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, -1).to(dt)
        else:
            t = torch.randint(0, V, (N,), generator=gen)
            t[min(3, N - 1)] = -100
            if V > 5:
                t[0] = 5
        return z.to(dt), t

    def run(fn, z, t, cfg, eps, eps_b, soft, **kw):
        x = z.clone().requires_grad_()
        if kw.get("weight", 0) is None:
            kw.pop("weight")
        out = fn(x, t, cfg, eps, eps_b, -100, soft, **kw)
        go = torch.linspace(0.5, 1.5, out[0].numel(), dtype=out[0].dtype, device=out[0].device)
        (out[0] * go).sum().backward()
        return [o.detach() for o in out[:3]], x.grad

    def compare(case, z, t, cfg, eps, eps_b, soft, dt, weight=None, **kw):
        """``weight``: per-class weights (float64, CPU) for all three, or None."""
        n_compared[0] += 1
        if not mine(n_compared[0]):
            return
        w_dev = None if weight is None else weight.float().to(device)
        out, g = run(fused.fused_el_rows, z.to(device), t.to(device), cfg, eps, eps_b, soft, weight=w_dev, **kw)
        ref, gref = run(reference_rows, z, t, cfg, eps, eps_b, soft, weight=None if weight is None else weight.float())
        truth, gtruth = run(reference_rows, z.double(), t.double() if soft else t, cfg, eps, eps_b, soft,
                            weight=weight)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dt, 2.0 ** -6)
        ok = g.dtype == dt
        errs = []
        for a, b, c, atol, rtol in [(a, b, c, min(tol, 1e-5), 1e-5) for a, b, c in zip(out, ref, truth)] + \
                [(g, gref, gtruth, tol, max(tol, 1e-5))]:
            a, b, c = a.cpu().double(), b.double(), c.double()
            err = (a - b).abs() - atol - rtol * b.abs()
            if dt != torch.float64 and err.dim() >= 1 and err.shape[0] > 0:
                # row 0 (p_y near 1) is ill-conditioned in low precision: held to the float64
                # truth as closely as the reference gets
                err[0] = ((a[0] - c[0]).abs() - 2 * (b[0] - c[0]).abs().max() - max(atol, 1e-4)
                          - rtol * c[0].abs()).max()
            errs.append(float(err.max()) if err.numel() else 0.0)
            ok = ok and errs[-1] <= 0
        record(case, ok, errs)

    settings = [(0.0, 0.0, False), (0.1, 0.1, False), (0.1, 0.0, False), (0.1, 0.05, True), (0.0, 0.0, True)]
    for V in sizes:
        for name, cfg in cfgs.items():
            for eps, eps_b, soft in settings:
                if cuda and V > 5003 and name not in ("le075", "normal", "ce"):
                    continue
                z, t = inputs(rows, V, soft, torch.float32)
                compare(f"loss/V{V}/{name}/eps{eps}/epsb{eps_b}/soft{soft}/float32", z, t, cfg, eps, eps_b, soft,
                        torch.float32)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        for V in (sizes[2], sizes[3]):
            for name, eps, eps_b, soft in [("le075", 0.1, 0.1, False), ("normal", 0.1, 0.0, True),
                                           ("aggressive", 0.0, 0.0, False), ("cosine", 0.1, 0.1, False)]:
                z, t = inputs(rows, V, soft, dt)
                compare(f"loss/V{V}/{name}/eps{eps}/soft{soft}/{dt}", z, t, cfgs[name], eps, eps_b, soft, dt)

    # 2b. per-class weights (F.cross_entropy's weight, in the closed form): one-block and streamed rows,
    # every bonus kind (aggressive and conservative included), smoothing, soft targets; a zero weight too
    wsizes = [40, 131] if not cuda else [1000, 32000]
    for V in wsizes:
        weight = torch.rand(V, generator=gen, dtype=torch.float64) * 2.0
        weight[min(5, V - 1)] = 0.0  # the confident row's class (row 0): weight 0
        for name, cfg in cfgs.items():
            if name in ("le03_rho", "power05") or (V == wsizes[1] and name not in ("le075", "aggressive", "ce")):
                continue
            for eps, eps_b, soft in settings:
                z, t = inputs(rows, V, soft, torch.float32)
                compare(f"wloss/V{V}/{name}/eps{eps}/epsb{eps_b}/soft{soft}/float32", z, t, cfg, eps, eps_b, soft,
                        torch.float32, weight=weight)
        for dt, name, eps, eps_b, soft in [(torch.float64, "aggr_le", 0.1, 0.1, False),
                                           (torch.float64, "power2", 0.1, 0.05, True),
                                           (torch.bfloat16, "le075", 0.1, 0.1, False)]:
            z, t = inputs(rows, V, soft, dt)
            compare(f"wloss/V{V}/{name}/eps{eps}/soft{soft}/{dt}", z, t, cfgs[name], eps, eps_b, soft, dt,
                    weight=weight)

    if mine(2):
        _special_cases(results, record, device, cuda, gen, sizes, rows, inputs, run, cfgs)
    if mine(3):
        _fused_linear_cases(record, device, gen, sizes)
    return results


def _special_cases(results, record, device, cuda, gen, sizes, rows, inputs, run, cfgs):
    import torch

    import encouraging_loss.ops.fused as fused
    from encouraging_loss.functional import check_targets, encouraging_loss
    from encouraging_loss.ops import triton_kernels as tk

    # 3. both row paths (one block / streamed) and the in-place backward give the same numbers
    V = sizes[3]
    z, t = inputs(rows, V, False, torch.float32)
    z, t = z.to(device), t.to(device)
    ref, gref = run(fused.fused_el_rows, z, t, cfgs["le075"], 0.1, 0.1, False)
    for single in (True, False):
        block = triton_next_pow2(V) if single else (16 if not cuda else 1024)
        loss, nll, bonus, stats = tk.el_stats_triton(z, t, cfgs["le075"], 0.1, 0.1, -100, False, True,
                                                     block=block, single=single)
        grad = torch.empty_like(z)
        go = torch.linspace(0.5, 1.5, rows, dtype=torch.float32, device=device)
        tk.el_grad_triton(z, t, cfgs["le075"], 0.1, 0.1, -100, False, stats, go, grad, block=block)
        record(f"paths/single{single}", torch.allclose(loss, ref[0], atol=1e-5, rtol=1e-5)
               and torch.allclose(grad, gref, atol=1e-6, rtol=1e-5))
    x = z.clone().requires_grad_()
    y = x * 1.0  # the logits the loss sees (a fresh tensor: may be overwritten)
    out = fused.fused_el_rows(y, t, cfgs["le075"], 0.1, 0.1, -100, False, inplace_backward=True)
    go = torch.linspace(0.5, 1.5, rows, dtype=torch.float32, device=device)
    (out[0] * go).sum().backward()
    record("inplace/gradient", torch.allclose(x.grad, gref, atol=1e-6, rtol=1e-5))
    record("inplace/storage_reused", torch.allclose(y.detach(), gref, atol=1e-6, rtol=1e-5))
    x = z.clone().requires_grad_()
    out = fused.fused_el_rows(x, t, cfgs["le075"], 0.1, 0.1, -100, False, inplace_backward=False)
    (out[0] * go).sum().backward()
    record("not_inplace/logits_kept", torch.equal(x.detach(), z))
    # retain_graph: the second backward must still see the logits
    y = z.clone().requires_grad_()
    out = fused.fused_el_rows(y * 1.0, t, cfgs["le075"], 0.1, 0.1, -100, False, inplace_backward=True)
    g1 = torch.autograd.grad(out[0].sum(), y, retain_graph=True)[0]
    g2 = torch.autograd.grad(out[0].sum(), y)[0]
    record("inplace/retain_graph", torch.allclose(g1, g2))

    # 4. no gradient wanted: the values only (stats kernel without the gradient statistics)
    with torch.no_grad():
        nog = fused.fused_el_rows(z, t, cfgs["le075"], 0.1, 0.1, -100, False)
    record("nograd/values", all(torch.allclose(a, b, atol=1e-6, rtol=1e-6) for a, b in zip(nog[:3], ref)))
    weight = torch.linspace(0.0, 2.0, V, device=device)
    wref, _ = run(fused.fused_el_rows, z, t, cfgs["le075"], 0.1, 0.1, False, weight=weight)
    with torch.no_grad():
        nog = fused.fused_el_rows(z, t, cfgs["le075"], 0.1, 0.1, -100, False, weight=weight)
    record("nograd/weighted_values", all(torch.allclose(a, b, atol=1e-6, rtol=1e-6) for a, b in zip(nog[:3], wref)))

    # 5. a class index out of range: NaN loss and zero gradient for its row, reported on the next call
    old = os.environ.get("EL_CHECK_TARGETS")
    os.environ["EL_CHECK_TARGETS"] = "deferred"
    try:
        tb = t.clone()
        tb[2] = V + 5
        x = z.clone().requires_grad_()
        per_row = encouraging_loss(x, tb, log_end=0.75, smoothing=0.1, reduction="none")
        per_row.sum().backward()
        ok = bool(torch.isnan(per_row[2])) and bool(torch.isfinite(per_row[[0, 1, 4]]).all())
        ok = ok and bool((x.grad[2] == 0).all()) and bool(torch.isfinite(x.grad).all())
        try:
            encouraging_loss(z, t, log_end=0.75)
            raised = ""
        except ValueError as err:
            raised = str(err)
        record("bad_target/nan_then_error", ok and f"holds class index {V + 5}, outside [0, {V})" in raised
               and "earlier call" in raised, raised)
        encouraging_loss(z, tb, log_end=0.75)
        try:
            check_targets()
            raised = ""
        except ValueError as err:
            raised = str(err)
        record("bad_target/check_targets", f"holds class index {V + 5}" in raised, raised)
        encouraging_loss(z, t, log_end=0.75)
        check_targets()  # nothing pending
    finally:
        if old is None:
            os.environ.pop("EL_CHECK_TARGETS", None)
        else:
            os.environ["EL_CHECK_TARGETS"] = old



def _fused_linear_cases(record, device, gen, sizes):
    import torch
    import torch.nn.functional as F

    from encouraging_loss.functional import encouraging_loss
    from encouraging_loss.ops.fused_linear import fused_linear_encouraging_loss

    # 6. the fused output projection against logits + the reference, odd sizes and chunks
    # float16 / bfloat16 (a fairseq --fp16 model's decoder): against the float64 reference of the same rounded
    # inputs, within a few roundings of the half-precision logits (relative to each tensor's largest entry)
    for dt, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        half = dt in (torch.float16, torch.bfloat16)
        N, H, V = 37, 24, sizes[3]
        h = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dt)
        w = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.3).to(dt)
        b = torch.randn(V, generator=gen, dtype=torch.float64).to(dt)
        tt = torch.randint(0, V, (N,), generator=gen)
        tt[4] = -100
        grads = []
        for fused_path in (True, False):
            hh, ww, bb = (v.to(device if fused_path else "cpu").to(dt if fused_path or not half else torch.float64)
                          .clone().requires_grad_() for v in (h, w, b))
            t_dev = tt.to(hh.device)
            if fused_path:
                parts = fused_linear_encouraging_loss(hh, ww, t_dev, bb, log_end=0.75, smoothing=0.1,
                                                      reduction="sum", chunk_rows=8, return_parts=True)
                loss = parts.loss
            else:
                loss = encouraging_loss(F.linear(hh, ww, bb), t_dev, log_end=0.75, smoothing=0.1,
                                        reduction="sum", impl="reference")
            (loss * 0.7).backward()
            grads.append([loss.detach().cpu()] + [v.grad.cpu() for v in (hh, ww, bb)])
        if half:
            ok = all(a.dtype == (torch.float32 if k == 0 else dt) for k, a in enumerate(grads[0]))
            ok = ok and all(float((a.double() - c.double()).abs().max()) <= tol * float(c.double().abs().max())
                            for a, c in zip(*grads))
        else:
            ok = all(torch.allclose(a.double(), c.double(), atol=tol * 10, rtol=tol) for a, c in zip(*grads))
        record(f"fused_linear/{dt}", ok, [float((a.double() - c.double()).abs().max()) for a, c in zip(*grads)])


def triton_next_pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


if __name__ == "__main__":
    # python tests/core/ops/triton_cases.py ROOT DEVICE [PARTS]: with PARTS, the shares one after the other,
    # each result tagged with its share: ``[case, ok, detail, share]``
    _setup(sys.argv[1])
    if sys.argv[2] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    if len(sys.argv) > 3:
        parts = int(sys.argv[3])
        print("RESULTS" + json.dumps([r + [k] for k in range(parts) for r in run_all(sys.argv[2], k, parts)]))
    else:
        print("RESULTS" + json.dumps(run_all(sys.argv[2])))
