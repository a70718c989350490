"""The advantage-estimator registry: each name gives the same numbers as its formula by hand."""

import pytest
import torch

from bitnet_rl.rl.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs, estimate_advantages


def inputs(scores, lengths, group_size, **kw):
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    token_rewards = torch.zeros_like(mask)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        token_rewards[i, n - 1] = s
    return AdvantageInputs(token_rewards, torch.zeros_like(mask), mask, group_size, **kw)


def test_grpo_uses_trl_epsilon_and_no_whitening_by_default():
    x = inputs([1.0, 0.0, 2.0, 2.0], [2, 1, 1, 3], group_size=2)
    advantages, returns = estimate_advantages("grpo", x)
    # group 1: (1 - 0.5) / (0.7071 + 1e-4) = 0.70701; group 2 ties → 0
    a = 0.5 / (2**0.5 / 2 + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, advantages)


def test_group_whitening_is_per_sequence_whatever_the_length():
    x = inputs([1.0, 2.0, 6.0, 0.0], [1, 3, 2, 1], group_size=2)
    advantages, _ = estimate_advantages("rloo", x, whiten=True)
    raw = torch.tensor([1.0 - 2.0, 2.0 - 1.0, 6.0 - 0.0, 0.0 - 6.0])  # r_i − the other sample
    whitened = (raw - raw.mean()) / (raw.std() + 1e-8)  # every sequence counts once
    per_row = torch.stack([advantages[i, 0] for i in range(4)])
    torch.testing.assert_close(per_row, whitened)
    assert advantages[1, 2] == pytest.approx(float(whitened[1]))  # broadcast over the row's tokens
    plain, _ = estimate_advantages("rloo", x)  # TRL RLOO default: no whitening
    torch.testing.assert_close(plain[:, 0], raw)


def test_registry_metadata_and_unknown_names():
    assert ADVANTAGE_ESTIMATORS["gae"].needs_critic and not ADVANTAGE_ESTIMATORS["grpo"].needs_critic
    assert ADVANTAGE_ESTIMATORS["grpo"].grouped and ADVANTAGE_ESTIMATORS["rloo"].grouped and not ADVANTAGE_ESTIMATORS["reinforce_pp"].grouped
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimate_advantages("ppo", inputs([1.0], [1], 1))
    with pytest.raises(TypeError):
        ADVANTAGE_ESTIMATORS["mine"] = None
