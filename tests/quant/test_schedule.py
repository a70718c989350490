import math

import pytest

from bitnet_rl.errors import UserError
from bitnet_rl.quant.schedule import lambda_at


def test_constant():
    assert lambda_at(0, "constant", value=0.4) == 0.4
    assert lambda_at(10_000, "constant", value=0.4) == 0.4


def test_linear_by_hand():
    assert [lambda_at(s, "linear", warmup_steps=4) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]


def test_seed_note_two_step_over_t_is_half_warmup():
    total = 100
    for step in range(total):
        assert lambda_at(step, "linear", warmup_steps=total // 2) == pytest.approx(min(2 * step / total, 1))


def test_exponential_by_hand():
    assert lambda_at(5, "exponential", warmup_steps=10, k=2) == pytest.approx(1 - 0.5**2)
    assert lambda_at(10, "exponential", warmup_steps=10, k=2) == 1.0


def test_sigmoid_by_hand_and_endpoints():
    k = 6.0
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = (sig(k * (0.25 - 0.5)) - sig(-3)) / (sig(3) - sig(-3))
    assert lambda_at(25, "sigmoid", warmup_steps=100, k=k) == pytest.approx(expected)
    assert lambda_at(0, "sigmoid", warmup_steps=100, k=k) == pytest.approx(0.0)
    assert lambda_at(100, "sigmoid", warmup_steps=100, k=k) == pytest.approx(1.0)
    assert lambda_at(50, "sigmoid", warmup_steps=100, k=k) == pytest.approx(0.5)


def test_zero_warmup_is_fully_quantized_and_bad_kind():
    assert lambda_at(0, "linear", warmup_steps=0) == 1.0
    with pytest.raises(UserError, match="schedule"):
        lambda_at(0, "cubic")
