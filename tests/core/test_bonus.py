"""encouraging_loss.bonus: the bonus functions and the bonus-weight schedule against EL_SPEC's formulas
(written out in spec_formulas.py), and the schedule's settings checked."""
import math

import pytest
import torch

from encouraging_loss import BonusConfig, bonus_rho_at, bonus_value
from encouraging_loss.bonus import bonus_grad, check_schedule

from spec_formulas import KINDS, spec_bonus, spec_g, spec_kwargs


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bonus_functions_equal_the_spec(kw):
    p = torch.cat([torch.linspace(1e-6, 1 - 1e-6, 997, dtype=torch.float64),
                   torch.tensor([0.2, 0.3, 0.5, 0.75, 1 - 1e-5, 1 - 2e-6], dtype=torch.float64)])
    cfg = BonusConfig(kind=kw.get("bonus", "log"), log_end=kw.get("log_end", 1.0),
                      bonus_start=kw.get("bonus_start", 0.0), gamma=kw.get("bonus_gamma", 1.0))
    lp = torch.log(p)
    torch.testing.assert_close(bonus_value(lp, cfg), spec_bonus(p, **spec_kwargs(kw)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bonus_grad(lp, cfg), spec_g(p, **spec_kwargs(kw)), rtol=1e-9, atol=1e-12)


def test_bonus_schedule():
    assert bonus_rho_at(1.0, 1) == 1.0
    assert bonus_rho_at(1.0, 2, defer_start=2) == 0.0
    assert bonus_rho_at(1.0, 3, defer_start=2) == 1.0
    assert bonus_rho_at(2.0, 5, schedule="linear", max_epoch=10) == pytest.approx(1.0)
    assert bonus_rho_at(1.0, 5, schedule="cosine", max_epoch=10) == pytest.approx(0.5)
    assert bonus_rho_at(1.0, 10, schedule="cosine", max_epoch=10) == pytest.approx(1.0)
    assert bonus_rho_at(1.0, 5, schedule="exp", max_epoch=10) == pytest.approx(math.exp(-2.5))
    with pytest.raises(ValueError, match="schedule linear ramps the bonus over epochs and needs max_epoch > 0, got 0"):
        bonus_rho_at(1.0, 5, schedule="linear")
    with pytest.raises(ValueError, match="schedule must be one of none, linear, cosine, exp, got 'step'"):
        bonus_rho_at(1.0, 5, schedule="step", max_epoch=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exp_rate=float("nan")), "exp_rate must be a finite number > 0, got nan"),
        (dict(exp_rate=-1e9), "exp_rate must be a finite number > 0, got -1000000000.0"),
        (dict(exp_rate=0), "exp_rate must be a finite number > 0, got 0"),
        (dict(defer_start=-1), "defer_start must be an integer >= 0, got -1"),
        (dict(defer_start=1.5), "defer_start must be an integer >= 0, got 1.5"),
        (dict(schedule="linear"), "schedule linear ramps the bonus over epochs and needs max_epoch > 0, got 0"),
        (dict(schedule="step"), "schedule must be one of none, linear, cosine, exp, got 'step'"),
    ],
)
def test_schedule_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError) as err:
        check_schedule(**kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError):
        bonus_rho_at(1.0, 3, **kwargs)


def test_exp_schedule_never_overflows():
    for rate in (1e-6, 5.0, 1e300):
        for epoch in range(1, 12):
            rho = bonus_rho_at(1.0, epoch, schedule="exp", max_epoch=10, exp_rate=rate)
            assert 0.0 <= rho <= 1.0 and math.isfinite(rho)
