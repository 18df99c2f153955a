"""encouraging_loss.ops.fused_linear: the output projection and EL fused, against
F.linear + the reference formula (values, gradients of hidden / weight / bias),
and its refusals."""
import pytest
import torch
import torch.nn.functional as F

from encouraging_loss import encouraging_loss, fused_linear_encouraging_loss
from encouraging_loss.ops.fused import TWICE_MESSAGE
from encouraging_loss.ops.fused_linear import default_chunk_rows


def _inputs(N=37, H=12, V=53, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, dtype=dtype)
    w = torch.randn(V, H, generator=gen, dtype=dtype) * 0.5
    b = torch.randn(V, generator=gen, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    t[3] = -100
    return h, w, b, t


def _grads(fn, h, w, b, t, scale=1.3):
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    loss = fn(hh, ww, bb, t)
    (loss * scale).backward()
    return loss.detach(), hh.grad, ww.grad, bb.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5, 37, 100])
def test_equals_linear_then_reference(reduction, chunk_rows):
    h, w, b, t = _inputs()
    kw = dict(log_end=0.75, smoothing=0.1, reduction=reduction)
    fused = _grads(lambda h, w, b, t: fused_linear_encouraging_loss(h, w, t, b, chunk_rows=chunk_rows, **kw),
                   h, w, b, t)
    ref = _grads(lambda h, w, b, t: encouraging_loss(F.linear(h, w, b), t, impl="reference", **kw), h, w, b, t)
    for a, r in zip(fused, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_float32_leading_dims_no_bias_parts_and_accuracy():
    h, w, _, t = _inputs(N=24, dtype=torch.float32)
    h3, t3 = h.view(2, 12, -1), t.view(2, 12)
    parts = fused_linear_encouraging_loss(h3, w, t3, log_end=0.5, smoothing=0.1, reduction="sum", return_parts=True)
    logits = F.linear(h, w)
    ref = encouraging_loss(logits, t, log_end=0.5, smoothing=0.1, reduction="sum", return_parts=True)
    for a, r in zip(parts[:3], ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    valid = t != -100
    assert int(parts.n_correct) == int(((logits.argmax(-1) == t) & valid).sum())


def test_gradcheck_and_no_grad():
    h, w, b, t = _inputs(N=9, H=4, V=11)
    fn = lambda h, w, b: fused_linear_encouraging_loss(h, w, t, b, log_end=0.75, smoothing=0.1, chunk_rows=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.clone().requires_grad_() for x in (h, w, b)))
    with torch.no_grad():
        loss = fused_linear_encouraging_loss(h, w, t, b, log_end=0.75, smoothing=0.1)
    torch.testing.assert_close(loss, fn(h, w, b))
    assert not loss.requires_grad


def test_second_order_refused():
    h, w, b, t = _inputs(N=8, H=4, V=9)
    hh = h.clone().requires_grad_()
    loss = fused_linear_encouraging_loss(hh, w, t, b)
    (g,) = torch.autograd.grad(loss, hh, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        g.pow(2).sum().backward()
    assert "impl='reference'" in TWICE_MESSAGE


def test_default_chunk_rows():
    assert default_chunk_rows(16384, 32000, 512) == 261  # chunk of logits ~ the hidden states
    assert default_chunk_rows(10, 32000, 512) == 1
    assert default_chunk_rows(4096, 32000, 256, "cpu") == 256  # the compiled chunk on CPU
    assert default_chunk_rows(100, 32000, 256, "cpu") == 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="none"), "reduction must be one of mean, sum, got 'none'"),
    (dict(chunk_rows=0), "chunk_rows must be an integer >= 1 or None, got 0"),
    (dict(log_end=1.5), "log_end must be in (0, 1], got 1.5"),
    (dict(smoothing=1.0), "smoothing must be in [0, 1), got 1.0"),
])
def test_bad_settings(kwargs, message):
    h, w, b, t = _inputs()
    with pytest.raises(ValueError) as err:
        fused_linear_encouraging_loss(h, w, t, b, **kwargs)
    assert message in str(err.value)


def test_bad_tensors():
    h, w, b, t = _inputs()
    cases = [
        ((h, w, t.clone().fill_(99), b), "target holds class index 99, outside [0, 53)"),
        ((h, w.float(), t, b), "weight and hidden must have the same dtype"),
        ((h, w[:, :5], t, b), "weight must have shape (V, H) with H = 12"),
        ((h, w, t, b[:5]), "bias must be None or a (53,) tensor"),
        ((h, w, t.float(), b), "must hold class indices (an integer tensor)"),
        ((h, w, t[:5], b), "target must have shape (37,)"),
    ]
    for (hh, ww, tt, bb), message in cases:
        with pytest.raises(ValueError) as err:
            fused_linear_encouraging_loss(hh, ww, tt, bb)
        assert message in str(err.value), (message, str(err.value))
