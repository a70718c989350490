import math

import pytest
import torch

from bitnet_rl.rl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3

LOGP = [[-1.0, -0.5], [-2.0, -0.1]]  # (B, T)
REF = [[-1.5, -0.5], [-0.5, -3.0]]


def _by_hand(fn):
    rows = [[fn(p, r) for p, r in zip(row_p, row_r)] for row_p, row_r in zip(LOGP, REF)]
    return torch.tensor(rows, dtype=torch.float64)


def test_estimators_match_formulas():
    logp, ref = torch.tensor(LOGP, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64)
    torch.testing.assert_close(kl_k1(logp, ref), _by_hand(lambda p, r: p - r))
    torch.testing.assert_close(kl_k2(logp, ref), _by_hand(lambda p, r: 0.5 * (p - r) ** 2))
    torch.testing.assert_close(kl_k3(logp, ref), _by_hand(lambda p, r: math.exp(r - p) - (r - p) - 1))
    for kind, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        torch.testing.assert_close(kl_estimate(logp, ref, kind), fn(logp, ref))


def test_k2_k3_nonnegative_and_zero_when_equal():
    logp = torch.tensor([[-1.0, -0.2, -4.0]])
    assert (kl_k2(logp, logp - 1.3) >= 0).all() and (kl_k3(logp, logp + 2.0) >= 0).all()
    assert kl_k3(logp, logp).abs().max() == 0 and kl_k2(logp, logp).abs().max() == 0


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]


def test_adaptive_controller_updates_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 9/6 - 1 = 0.5, clipped to 0.2
    expected = 0.2 * (1 + 0.2 * 256 / 10000)
    assert ctl.value == pytest.approx(expected)
    ctl.update(current_kl=5.4, n_steps=512)  # error 5.4/6 - 1 = -0.1, inside the clip range
    expected = expected * (1 - 0.1 * 512 / 10000)
    assert ctl.value == pytest.approx(expected)
    ctl.update(current_kl=0.0, n_steps=100)  # error -1, clipped to -0.2
    expected = expected * (1 - 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(expected)


def test_adaptive_controller_resumes_from_state_dict():
    ctl = AdaptiveKLController(0.1, target=3.0, horizon=1000)
    ctl.update(4.0, 64)
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(2.5, 32)
    resumed.update(2.5, 32)
    assert resumed.value == ctl.value


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
