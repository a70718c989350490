"""Rollout corrections and mismatch metrics against values worked out by hand."""

import math

import pytest
import torch

from bitnet_rl.rl.correction import ROLLOUT_CORRECTIONS, rollout_correction, rollout_mismatch

D = torch.float64


def constructed():
    # ratios π_old/π_rollout per token: row 0 [3, 0.25, 1.5], row 1 [1.2, padding, padding]
    ratios = [[3.0, 0.25, 1.5], [1.2, 1.0, 1.0]]
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -9.0, -9.0]], dtype=D)
    old = rollout + torch.tensor([[math.log(r) for r in row] for row in ratios], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=D)
    return old, rollout, mask


def test_token_tis_weights_are_the_ratio_clipped_at_cap():
    old, rollout, mask = constructed()
    weights, keep = rollout_correction("token_tis", old, rollout, mask, cap=2.0)
    expected = torch.minimum(torch.exp(old - rollout), torch.tensor(2.0, dtype=D)) * mask
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.25, 1.5], [1.2, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(keep, mask)


def test_seq_tis_uses_the_product_of_token_ratios():
    old, rollout, mask = constructed()
    weights, keep = rollout_correction("seq_tis", old, rollout, mask, cap=2.0)
    # row 0: 3 · 0.25 · 1.5 = 1.125 (< C); row 1: 1.2 (padding ignored)
    torch.testing.assert_close(weights, torch.tensor([[1.125] * 3, [1.2, 0.0, 0.0]], dtype=D))
    weights, _ = rollout_correction("seq_tis", old, rollout, mask, cap=1.1)
    torch.testing.assert_close(weights, torch.tensor([[1.1] * 3, [1.1, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(keep, mask)


def test_masks_drop_tokens_or_sequences_outside_the_bounds():
    old, rollout, mask = constructed()
    weights, keep = rollout_correction("token_mask", old, rollout, mask, cap=2.0)
    # [1/2, 2] keeps 1.5 and 1.2, drops 3 and 0.25
    torch.testing.assert_close(keep, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(weights, keep)
    _, keep = rollout_correction("seq_mask", old, rollout, mask, cap=1.15)
    # row 0's product 1.125 is inside [1/1.15, 1.15]; row 1's 1.2 is not
    torch.testing.assert_close(keep, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=D))


def test_none_and_the_registry():
    old, rollout, mask = constructed()
    weights, keep = rollout_correction("none", old, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, mask)
    torch.testing.assert_close(keep, mask)
    assert set(ROLLOUT_CORRECTIONS) == {"none", "token_tis", "seq_tis", "token_mask", "seq_mask"}
    with pytest.raises(TypeError):
        ROLLOUT_CORRECTIONS["mine"] = None  # read-only: no module-level mutable state
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction("tis", old, rollout, mask, cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        rollout_correction("token_tis", old, rollout, mask, cap=1.0)


def test_mismatch_metrics_by_hand():
    old, rollout, mask = constructed()
    metrics = rollout_mismatch(old, rollout, mask, cap=2.0)
    ratios = [3.0, 0.25, 1.5, 1.2]
    d = [math.log(r) for r in ratios]
    assert metrics["mismatch/kl_k3"] == pytest.approx(sum(r - 1 - x for r, x in zip(ratios, d)) / 4)
    assert metrics["mismatch/abs_logp_diff"] == pytest.approx(sum(abs(x) for x in d) / 4)
    assert metrics["mismatch/ratio_p50"] == pytest.approx((1.2 + 1.5) / 2)  # torch.quantile interpolates
    assert metrics["mismatch/ratio_p01"] == pytest.approx(0.25 + 0.03 * (1.2 - 0.25))
    assert metrics["mismatch/ratio_p99"] == pytest.approx(1.5 + 0.97 * (3.0 - 1.5))
    assert metrics["mismatch/frac_outside"] == pytest.approx(2 / 4)
    same = rollout_mismatch(rollout, rollout, mask, cap=2.0)
    assert same["mismatch/kl_k3"] == 0 and same["mismatch/frac_outside"] == 0 and same["mismatch/ratio_p50"] == 1
