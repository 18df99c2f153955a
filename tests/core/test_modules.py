"""encouraging_loss.modules (``EncouragingLoss``): equal to the function, attributes checked when set, the
plugins' names reach it."""
import pytest
import torch

from encouraging_loss import EncouragingLoss, encouraging_loss

from spec_formulas import make_batch


def test_module_equals_functional_and_rho_can_change():
    z, t = make_batch(seed=7)
    mod = EncouragingLoss(log_end=0.75, smoothing=0.1)
    torch.testing.assert_close(mod(z, t), encouraging_loss(z, t, log_end=0.75, smoothing=0.1))
    mod.bonus_rho = 0.0
    torch.testing.assert_close(mod(z, t), encouraging_loss(z, t, log_end=0.75, smoothing=0.1, bonus_rho=0.0))
    with pytest.raises(ValueError, match="bonus_rho must be a finite number >= 0, got -1"):
        mod.bonus_rho = -1
    assert "log_end=0.75" in repr(mod)


def _batch():
    return torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, -100])


@pytest.mark.parametrize(
    "attr, value, message",
    [
        ("smoothing", 1.5, "smoothing must be in [0, 1), got 1.5"),
        ("smoothing", float("nan"), "smoothing must be in [0, 1), got nan"),
        ("bonus_smoothing", -0.1, "bonus_smoothing must be in [0, 1), got -0.1"),
        ("ignore_index", 1.5, "ignore_index must be an integer, got 1.5"),
        ("reduction", "avg", "reduction must be one of none, mean, sum, got 'avg'"),
        ("impl", "fast", "impl must be one of fused, reference, got 'fast'"),
        ("log_end", 0.0, "log_end must be in (0, 1], got 0.0"),
        ("bonus", "focal", "bonus must be one of log, power, cosine, got 'focal'"),
        ("bonus_start", 1.0, "bonus_start must be in [0, 1), got 1.0"),
        ("bonus_gamma", -2.0, "bonus_gamma must be a finite number > 0, got -2.0"),
        ("bonus_rho", -1.0, "bonus_rho must be a finite number >= 0, got -1.0"),
        ("cfg", "log", "cfg must be a BonusConfig, got str"),
    ],
)
def test_module_attributes_are_checked_when_set(attr, value, message):
    m = EncouragingLoss(log_end=0.75, smoothing=0.1)
    z, t = _batch()
    before = m(z, t)
    with pytest.raises(ValueError) as err:
        setattr(m, attr, value)
    assert str(err.value) == message
    torch.testing.assert_close(m(z, t), before)  # the bad value never took effect


def test_module_attributes_set_to_good_values_take_effect():
    z, _ = _batch()
    t = torch.tensor([0, 1, 2, 3, 4, 4])
    m = EncouragingLoss()
    m.smoothing, m.log_end, m.bonus_rho, m.ignore_index, m.reduction = 0.1, 0.5, 0.7, 4, "sum"
    m.bonus_smoothing = 0.05
    expected = encouraging_loss(
        z, t, smoothing=0.1, log_end=0.5, bonus_rho=0.7, ignore_index=4, reduction="sum", bonus_smoothing=0.05
    )
    torch.testing.assert_close(m(z, t), expected)
    m.impl = "reference"
    torch.testing.assert_close(m(z, t), expected)


def test_plugin_names_reach_the_module():
    m = EncouragingLoss(names={"log_end": "--log-end", "rho": "--bonus-rho"})
    with pytest.raises(ValueError, match=r"^--log-end must be in \(0, 1\], got 2$"):
        m.log_end = 2
    with pytest.raises(ValueError, match=r"^--bonus-rho must be a finite number >= 0, got -1$"):
        m.bonus_rho = -1


def test_weight_is_a_buffer_that_can_be_switched():
    """As nn.CrossEntropyLoss: a buffer (state_dict, .to()); assigning a tensor or None switches the class
    weights at any time (DRW does so between epochs), equal to the function's weight=."""
    z, t = make_batch(seed=8)
    c = torch.linspace(0.1, 2.0, 11, dtype=torch.float64)
    m = EncouragingLoss(log_end=0.75, smoothing=0.1)
    assert m.weight is None and "weight" not in m.state_dict() and "weight" not in repr(m)
    plain = m(z, t)
    m.weight = c
    assert "weight" in dict(m.named_buffers()) and torch.equal(m.state_dict()["weight"], c)
    weighted = m(z, t)
    torch.testing.assert_close(weighted, encouraging_loss(z, t, log_end=0.75, smoothing=0.1, weight=c))
    assert not torch.allclose(weighted, plain)
    assert "weight=<11 classes, min 0.1, max 2>" in repr(m)
    m.to(torch.float32)
    assert m.weight.dtype == torch.float32
    m.weight = None
    torch.testing.assert_close(m(z, t), plain)
    built = EncouragingLoss(log_end=0.75, smoothing=0.1, weight=torch.tensor([1.0, 2.0, 0.5]))
    assert "weight=[1.0, 2.0, 0.5]" in repr(built)


@pytest.mark.parametrize("value, message", [
    ("balanced", "weight must be None or a 1-D floating-point tensor of per-class weights, got str"),
    (torch.ones(2, 11), "weight must be a 1-D tensor of per-class weights, got shape (2, 11)"),
    (torch.tensor([1.0, -1.0]), "weight must hold finite values >= 0, got -1.0 for class 1"),
])
def test_bad_weight_assignment_is_refused_and_never_takes_effect(value, message):
    z, t = make_batch(seed=9)
    c = torch.linspace(0.5, 1.5, 11, dtype=torch.float64)
    m = EncouragingLoss(weight=c)
    before = m(z, t)
    with pytest.raises(ValueError) as err:
        m.weight = value
    assert str(err.value) == message
    torch.testing.assert_close(m(z, t), before)
    with pytest.raises(ValueError, match=r"^--drw-weights must hold finite values >= 0"):
        EncouragingLoss(weight=torch.tensor([float("nan")]), names={"weight": "--drw-weights"})
    m.weight = torch.ones(7)  # the length is checked against the logits, at the call
    with pytest.raises(ValueError, match=r"^weight must hold one weight per class, 11 \(the logits' last dimension"):
        m(z, t)
