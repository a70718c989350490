import math

import pytest
import torch

from bitnet_rl.eval.metrics import (
    histogram,
    kl_summary,
    pass_at_k,
    pass_metrics,
    perplexity,
    repetition_rate,
    summary_stats,
    win_rate,
)


def test_summary_stats_by_hand():
    stats = summary_stats([4.0, 1.0, 3.0, 2.0])
    assert stats["n"] == 4 and stats["mean"] == 2.5
    assert stats["std"] == pytest.approx(math.sqrt(5 / 3))  # Σ(x−2.5)² = 5, n−1 = 3
    assert stats["q50"] == 2.5 and stats["q25"] == 1.75 and stats["q90"] == pytest.approx(3.7)
    assert stats["min"] == 1.0 and stats["max"] == 4.0
    assert summary_stats([]) == {"n": 0}


def test_win_rate_all_wins_and_all_ties():
    wins = win_rate(torch.ones(50), torch.zeros(50))
    assert wins["win_rate"] == 1.0 and wins["ci_low"] == 1.0 and wins["ci_high"] == 1.0
    assert (wins["wins"], wins["ties"], wins["losses"]) == (50, 0, 0)
    ties = win_rate(torch.full((50, 3), 0.7), torch.full((50, 3), 0.7))
    assert ties["win_rate"] == 0.5 and ties["ci_low"] == 0.5 and ties["ci_high"] == 0.5
    assert ties["ties"] == 150


def test_win_rate_known_mix_and_interval():
    # 400 prompts: 200 wins, 80 ties, 120 losses -> (200 + 40) / 400 = 0.6
    policy = torch.tensor([1.0] * 200 + [0.5] * 80 + [0.0] * 120)
    reference = torch.full((400,), 0.5)
    result = win_rate(policy, reference, n_boot=4000, seed=1)
    assert result["win_rate"] == pytest.approx(0.6)
    # per-prompt outcome variance: E[x²] − 0.6² = (200 + 80·0.25)/400 − 0.36 = 0.19
    half_width = 1.96 * math.sqrt(0.19 / 400)
    assert result["ci_low"] == pytest.approx(0.6 - half_width, abs=0.01)
    assert result["ci_high"] == pytest.approx(0.6 + half_width, abs=0.01)


def test_win_rate_with_several_samples_per_prompt():
    # prompt 0: win, tie; prompt 1: loss, loss -> (1 + 0.5 + 0 + 0) / 4
    policy = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    reference = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    result = win_rate(policy, reference)
    assert result["win_rate"] == pytest.approx(0.375)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 1, 2)
    # the bootstrap resamples prompts (means 0.75 and 0): every resample mean is 0, 0.375 or 0.75
    assert result["ci_low"] == 0.0 and result["ci_high"] == 0.75


def test_kl_summary_by_hand():
    d = [torch.tensor([0.5, -0.2]), torch.tensor([0.1])]  # log π − log π_ref per token
    policy = [torch.zeros_like(x) for x in d]
    reference = [-x for x in d]
    out = kl_summary(policy, reference)
    assert out["k1_seq"] == pytest.approx(0.2)  # sums 0.3 and 0.1
    assert out["k1_seq_se"] == pytest.approx(0.1)  # std([0.3, 0.1]) / √2
    assert out["k1_token"] == pytest.approx(0.4 / 3)
    # residuals S_i − R·n_i = 0.3 − 0.8/3 and 0.1 − 0.4/3 = ±1/30; sqrt(2/900 / 2) / 1.5
    assert out["k1_token_se"] == pytest.approx(math.sqrt(1 / 900) / 1.5)
    k3 = [math.exp(-x) + x - 1 for x in (0.5, -0.2, 0.1)]
    assert out["k3_seq"] == pytest.approx((k3[0] + k3[1] + k3[2]) / 2)
    assert out["k3_token"] == pytest.approx(sum(k3) / 3)
    assert min(k3) > 0


def test_perplexity_by_hand():
    out = perplexity([math.log(2), math.log(4)])
    assert out["perplexity"] == pytest.approx(math.sqrt(8))  # exp((ln 2 + ln 4) / 2)
    assert out["tokens"] == 2


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_pass_at_k_matches_the_binomial_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_metrics_on_constructed_data():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    out = pass_metrics(correct, 4)
    assert out["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert out["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert out["mean@4"] == pytest.approx((0.25 + 0 + 1) / 3)
    two = pass_metrics([[True, False, False, False]], 2)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert two["pass@2"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_repetition_rate_by_hand():
    assert repetition_rate([[1, 2, 3, 1, 2, 3]], n=3) == pytest.approx(0.25)  # 123 231 312 123: 3 unique of 4
    assert repetition_rate([[1, 2, 3, 4]], n=2) == 0.0
    assert repetition_rate([[7, 7, 7, 7, 7]], n=2) == pytest.approx(0.75)
    assert repetition_rate([[1]], n=4) == 0.0


def test_histogram_counts():
    out = histogram([0, 1, 1, 2, 4], bins=4)
    assert out["edges"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sum(out["counts"]) == 5 and out["counts"][0] == 1 and out["counts"][-1] == 1
