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
