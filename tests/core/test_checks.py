"""encouraging_loss.checks: bad settings and tensors raise ValueError naming the parameter as the caller
spelled it; the names that map parameters to the plugins' flags; one ignore_index for both implementations."""
import numpy as np
import pytest
import torch

from encouraging_loss import EncouragingLoss, encouraging_loss

from spec_formulas import PAD, make_batch

BAD = [
    (dict(log_end=1.5), "log_end must be in (0, 1], got 1.5"),
    (dict(log_end=0), "log_end must be in (0, 1], got 0"),
    (dict(log_end=float("nan")), "log_end must be in (0, 1], got nan"),
    (dict(smoothing=1.0), "smoothing must be in [0, 1), got 1.0"),
    (dict(smoothing=-0.1), "smoothing must be in [0, 1), got -0.1"),
    (dict(bonus_smoothing=1.2), "bonus_smoothing must be in [0, 1), got 1.2"),
    (dict(bonus_start=1.0), "bonus_start must be in [0, 1), got 1.0"),
    (dict(bonus_start=-0.5), "bonus_start must be in [0, 1), got -0.5"),
    (dict(bonus="focal"), "bonus must be one of log, power, cosine, got 'focal'"),
    (dict(bonus="power", bonus_gamma=0), "bonus_gamma must be a finite number > 0, got 0"),
    (dict(bonus_rho=-1.0), "bonus_rho must be a finite number >= 0, got -1.0"),
    (dict(reduction="avg"), "reduction must be one of none, mean, sum, got 'avg'"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_raise_value_error(kwargs, message):
    z, t = make_batch()
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t, **kwargs)
    assert message in str(err.value)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError) as err:
            EncouragingLoss(**kwargs)
        assert message in str(err.value)


def test_unknown_impl_is_refused():
    z, t = make_batch()
    with pytest.raises(ValueError, match="impl must be one of fused, reference, got 'fast'"):
        encouraging_loss(z, t, impl="fast")
    with pytest.raises(ValueError, match="impl must be one of fused, reference, got 'fast'"):
        EncouragingLoss(impl="fast")


def test_names_map_parameters_to_flags():
    z, t = make_batch()
    with pytest.raises(ValueError, match=r"--log-end must be in \(0, 1\], got 1.5"):
        encouraging_loss(z, t, log_end=1.5, names={"log_end": "--log-end"})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda z, t: (z, torch.where(t == PAD, 11, t)), "target holds class index 11, outside [0, 11)"),
        (lambda z, t: (z, torch.where(t == PAD, -3, t)), "target holds class index -3, outside [0, 11)"),
        (lambda z, t: (z, t[:-1]), "target of class indices must have shape (24,)"),
        (lambda z, t: (z, z[:, :-1].softmax(-1)), "soft target must have the logits' shape (24, 11), got (24, 10)"),
        (lambda z, t: (z.long(), t), "logits must be a floating-point tensor, got dtype torch.int64"),
        (lambda z, t: (z, t > 0), "target must hold class indices (an integer tensor), got dtype torch.bool"),
        (lambda z, t: (z.tolist(), t), "logits and target must be tensors, got list and Tensor"),
    ],
)
def test_bad_tensors_raise_value_error(make, message):
    z, t = make(*make_batch())
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t)
    assert message in str(err.value)


def _batch():
    return torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, -100])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ignore_index=1.5), "ignore_index must be an integer, got 1.5"),
        (dict(ignore_index=None), "ignore_index must be an integer, got None"),
        (dict(ignore_index=True), "ignore_index must be an integer, got True"),
        (dict(ignore_index="pad"), "ignore_index must be an integer, got 'pad'"),
        (dict(bonus="nope"), "bonus must be one of log, power, cosine, got 'nope'"),
        (dict(bonus="power", bonus_gamma=0), "bonus_gamma must be a finite number > 0, got 0"),
        (dict(bonus_gamma=float("inf")), "bonus_gamma must be a finite number > 0, got inf"),
        (dict(bonus_rho=-1), "bonus_rho must be a finite number >= 0, got -1"),
        (dict(bonus_rho=float("nan")), "bonus_rho must be a finite number >= 0, got nan"),
        (dict(log_end=np.float32(1.5)), "log_end must be in (0, 1], got np.float32(1.5)"),
        (dict(log_end="0.5"), "log_end must be in (0, 1], got '0.5'"),
        (dict(log_end=True), "log_end must be in (0, 1], got True"),
        (dict(smoothing=float("nan")), "smoothing must be in [0, 1), got nan"),
        (dict(smoothing=torch.tensor([0.1, 0.2])), "smoothing must be in [0, 1), got tensor([0.1000, 0.2000])"),
        (dict(bonus_smoothing=1.5), "bonus_smoothing must be in [0, 1), got 1.5"),
        (dict(reduction="avg"), "reduction must be one of none, mean, sum, got 'avg'"),
        (dict(impl="fast"), "impl must be one of fused, reference, got 'fast'"),
    ],
)
def test_bad_values_named_as_the_caller_spelled_them(kwargs, message):
    z, t = _batch()
    with pytest.raises(ValueError) as err:
        encouraging_loss(z, t, **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        EncouragingLoss(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), 0.5],
    ids=["np.float32", "np.float64", "tensor32", "tensor64", "float"],
)
def test_numbers_of_any_real_type_are_numbers(value):
    z, t = _batch()
    expected = encouraging_loss(z, t, log_end=0.5, smoothing=0.5, bonus_rho=0.5)
    got = encouraging_loss(z, t, log_end=value, smoothing=value, bonus_rho=value, bonus_smoothing=value)
    torch.testing.assert_close(got, expected)
    m = EncouragingLoss(log_end=value, smoothing=value, bonus_rho=value)
    assert m.log_end == 0.5 and type(m.log_end) is float and type(m.smoothing) is float
    torch.testing.assert_close(m(z, t), expected)
    for index in (np.int64(-100), torch.tensor(-100)):
        torch.testing.assert_close(encouraging_loss(z, t, ignore_index=index), encouraging_loss(z, t))


def test_ignore_index_is_one_value_for_both_implementations():
    """The issue's case: 1.5 used to be accepted and the two implementations disagreed."""
    z, t = _batch()
    for impl in ("fused", "reference"):
        with pytest.raises(ValueError, match="ignore_index must be an integer, got 1.5"):
            encouraging_loss(z, t, ignore_index=1.5, impl=impl)
    t = torch.tensor([0, 1, 2, 3, 4, 4])
    a = encouraging_loss(z, t, ignore_index=4, impl="fused")
    b = encouraging_loss(z, t, ignore_index=4, impl="reference")
    torch.testing.assert_close(a, b)


def test_checked_weights_are_remembered_by_identity_and_version():
    """On CUDA a weight's values are read (a synchronisation) once per tensor and in-place version: the memory
    of checked weights forgets a tensor changed in place, and holds a few recent ones, weakly."""
    from encouraging_loss.checks import _SeenWeights

    seen = _SeenWeights(size=2)
    a, b, c = torch.ones(3), torch.ones(3), torch.ones(3)
    seen.add(a)
    assert seen.seen(a) and not seen.seen(b)
    a.mul_(2)  # an in-place change: checked again
    assert not seen.seen(a)
    seen.add(a)
    seen.add(b)
    seen.add(c)  # a is the oldest of three: forgotten
    assert not seen.seen(a) and seen.seen(b) and seen.seen(c)
    del b
    d = torch.ones(3)  # may reuse b's id: the weak reference tells them apart
    assert not seen.seen(d)
