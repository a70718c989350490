import math

import pytest
import torch

from bitnet_rl.rl import (
    add_kl_penalty,
    discounted_returns,
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    scores_to_token_rewards,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_masked_mean_and_var_exclude_padding():
    values = t([[1.0, 2.0, 100.0], [3.0, -50.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), t([1.5, 3.0]))
    # valid entries 1, 2, 3: mean 2, squared deviations 1 + 0 + 1
    assert masked_var(values, mask).item() == pytest.approx(2 / 2)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)


def test_masked_whiten():
    values = t([[1.0, 2.0, 7.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    std = math.sqrt(1.0 + 1e-8)
    torch.testing.assert_close(masked_whiten(values, mask), t([[-1 / std, 0.0, 0.0], [1 / std, 0.0, 0.0]]))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), t([[-1 / std + 2, 2.0, 0.0], [1 / std + 2, 0.0, 0.0]])
    )


def test_gae_1x3_by_hand():
    gamma, lam = 0.9, 0.8
    r, v = [0.0, 0.0, 1.0], [0.5, 0.6, 0.7]
    d2 = r[2] + gamma * 0.0 - v[2]  # bootstrap 0 after the last token
    a2 = d2
    d1 = r[1] + gamma * v[2] - v[1]
    a1 = d1 + gamma * lam * a2
    d0 = r[0] + gamma * v[1] - v[0]
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(t([r]), t([v]), torch.ones(1, 3), gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, t([[a0, a1, a2]]))
    torch.testing.assert_close(ret, t([[a0 + v[0], a1 + v[1], a2 + v[2]]]))


def test_gae_padding_is_ignored():
    r, v = [0.3, 1.0], [0.2, 0.4]
    mask = torch.tensor([[1, 1, 0, 0]])
    adv, ret = gae(t([r + [5.0, 5.0]]), t([v + [9.0, 9.0]]), mask, gamma=1.0, lam=0.95)
    a1 = r[1] - v[1]  # next value of a padded position is 0, not 9
    a0 = r[0] + v[1] - v[0] + 0.95 * a1
    torch.testing.assert_close(adv, t([[a0, a1, 0.0, 0.0]]))
    torch.testing.assert_close(ret, t([[a0 + v[0], a1 + v[1], 0.0, 0.0]]))


def test_gae_lambda_one_is_monte_carlo():
    r, v = [1.0, -2.0, 0.5], [0.3, 0.1, -0.4]
    adv, _ = gae(t([r]), t([v]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([[sum(r[i:]) - v[i] for i in range(3)]]))


def test_discounted_returns_and_reinforce_pp():
    gamma = 0.5
    rewards = t([[0.0, 0.0, 1.0, 4.0], [0.0, 2.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    returns = [[0.25, 0.5, 1.0], [1.0, 2.0]]  # G_t = r_t + 0.5 * G_{t+1}, by hand
    expected_returns = t([[0.25, 0.5, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma), expected_returns)
    flat = [g for row in returns for g in row]
    mean = sum(flat) / len(flat)
    var = sum((g - mean) ** 2 for g in flat) / (len(flat) - 1)
    w = [[(g - mean) / math.sqrt(var + 1e-8) for g in row] for row in returns]
    expected = t([w[0] + [0.0], w[1] + [0.0, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), expected)


def test_grpo_advantages():
    scores = t([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    # group 1: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1; group 2: std 0
    eps = 1e-6
    expected = t([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(scores, 3, eps=eps), expected)
    torch.testing.assert_close(grpo_advantages(scores, 3, scale_std=False), t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        grpo_advantages(scores, 4)


def test_rloo_advantages():
    scores = t([1.0, 2.0, 6.0, 0.0, 1.0, 2.0])
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0 - (1 + 2) / 2, 1 - (0 + 2) / 2, 2 - (0 + 1) / 2]
    torch.testing.assert_close(rloo_advantages(scores, 3), t(expected))
    with pytest.raises(ValueError):
        rloo_advantages(scores, 1)


def test_scores_to_token_rewards_and_kl_penalty():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    token_rewards = scores_to_token_rewards(t([1.5, -2.0]), mask)
    torch.testing.assert_close(token_rewards, t([[0.0, 0.0, 1.5, 0.0], [-2.0, 0.0, 0.0, 0.0]]))
    kl = t([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0]])
    penalized = add_kl_penalty(token_rewards, kl, 0.5, mask)
    expected = t([[-0.05, -0.1, 1.5 - 0.15, 0.0], [-2.0 - 0.2, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(penalized, expected)
