"""Overlong penalty, tied groups and TRL's group reward statistics, by hand."""

import pytest
import torch

from bitnet_rl.rl.shaping import group_reward_stats, overlong_penalty, tied_groups


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([4, 6, 7, 8, 9, 10])
    # L_max 10, buffer 4: free up to 6, then (6 - L) / 4 down to -1 at 10
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, factor=0.5), torch.tensor([0.0, 0.0, -0.125, -0.25, -0.375, -0.5]))
    assert overlong_penalty(lengths, 10, 0).abs().sum() == 0
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 10, 11)


def test_tied_groups_and_group_stats():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.2, 0.2, 0.2])
    assert tied_groups(scores, 3).tolist() == [True, False, True]
    stats = group_reward_stats(scores, 3)
    # group stds (unbiased): 0, 0.5, 0
    assert stats["reward_std"] == pytest.approx(0.5 / 3)
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)
    single = group_reward_stats(torch.tensor([0.0, 2.0]), 1)
    assert single == {"reward_std": pytest.approx(2**0.5), "frac_reward_zero_std": 0.0}
