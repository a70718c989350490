"""Cross-rank statistics (bitnet_rl/distributed/reduce.py) on simulated ranks equal the one-process
computation on the concatenated data."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_ranks import run_ranks, split_rows  # noqa: E402

from bitnet_rl.distributed.reduce import (  # noqa: E402
    global_explained_variance,
    global_masked_whiten,
    global_whiten_per_sequence,
    loss_denominator,
    rank_share,
    weighted_means,
)
from bitnet_rl.rl.advantages import masked_whiten  # noqa: E402
from bitnet_rl.rl.estimators import AdvantageInputs, estimate_advantages, whiten_per_sequence  # noqa: E402
from bitnet_rl.rl.losses import explained_variance, ppo_policy_loss  # noqa: E402


def _ragged(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, width, generator=gen) * 3 + 1
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return values, mask


@pytest.mark.parametrize("sizes", [(3, 5), (4, 4, 1)])
def test_masked_whiten_across_ranks_equals_whole_batch(sizes):
    values, mask = _ragged(sum(sizes), 7, seed=len(sizes))
    whole = masked_whiten(values, mask)
    parts = run_ranks(lambda r, reduce: global_masked_whiten(split_rows(values, sizes)[r], split_rows(mask, sizes)[r], reduce), len(sizes))
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)
    # whitening each rank on its own is what a naive DDP port would do, and it differs
    local = torch.cat([masked_whiten(v, m) for v, m in zip(split_rows(values, sizes), split_rows(mask, sizes))])
    assert (local - whole).abs().max() > 1e-2


def test_whiten_per_sequence_across_ranks():
    seq = torch.tensor([0.5, 2.0, -1.0, 4.0, 0.0, 1.5, 3.0])
    sizes = (2, 5)
    parts = run_ranks(lambda r, reduce: global_whiten_per_sequence(split_rows(seq, sizes)[r], reduce), 2)
    torch.testing.assert_close(torch.cat(parts), whiten_per_sequence(seq), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["gae", "reinforce_pp", "rloo"])
def test_estimators_with_all_reduce_equal_whole_batch(name):
    """Whole groups on each rank (sizes multiples of the group size 2), whitening on."""
    rewards, mask = _ragged(8, 5, seed=3)
    values = torch.randn(8, 5, generator=torch.Generator().manual_seed(4)) * mask
    sizes = (4, 4)
    whole, _ = estimate_advantages(name, AdvantageInputs(rewards * mask, values, mask, group_size=2), whiten=True)

    def rank_fn(r, reduce):
        pick = lambda t: split_rows(t, sizes)[r]  # noqa: E731
        inputs = AdvantageInputs(pick(rewards * mask), pick(values), pick(mask), group_size=2, all_reduce=reduce)
        return estimate_advantages(name, inputs, whiten=True)[0]

    torch.testing.assert_close(torch.cat(run_ranks(rank_fn, 2)), whole, atol=1e-5, rtol=1e-5)


def test_ppo_loss_with_global_denominator_averages_to_whole_minibatch():
    """DDP averages the ranks' gradients: with `loss_denominator` that average is the token mean of the
    whole minibatch, which the ranks' own token means (mean of means) are not when token counts differ."""
    gen = torch.Generator().manual_seed(0)
    _, mask = _ragged(6, 9, seed=5)
    logprobs = torch.randn(6, 9, generator=gen).requires_grad_()
    old, adv = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen)
    whole_loss, _ = ppo_policy_loss(logprobs, old, adv, mask, num_tokens=mask.sum())
    (whole_grad,) = torch.autograd.grad(whole_loss, logprobs)
    sizes, world = (2, 4), 2

    def rank_fn(r, reduce):
        rows = split_rows(torch.arange(6), sizes)[r]
        lp = logprobs.detach()[rows].requires_grad_()
        denominator = loss_denominator(mask[rows].sum(), world, reduce)
        loss, _ = ppo_policy_loss(lp, old[rows], adv[rows], mask[rows], num_tokens=denominator)
        return loss.detach(), torch.autograd.grad(loss, lp)[0]

    results = run_ranks(rank_fn, world)
    ddp_grad = torch.cat([g for _, g in results]) / world  # each rank's gradient, averaged by DDP
    torch.testing.assert_close(ddp_grad, whole_grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sum(loss for loss, _ in results) / world, whole_loss.detach(), atol=1e-6, rtol=1e-5)


def test_rank_share_turns_local_means_into_the_global_mean():
    per_token = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    sizes = (3, 2)
    shares = run_ranks(lambda r, reduce: float(split_rows(per_token, sizes)[r].mean() * rank_share(sizes[r], 2, reduce)), 2)
    assert sum(shares) / 2 == pytest.approx(float(per_token.mean()))
    assert float(rank_share(7, 1)) == 1.0


def test_weighted_means_across_ranks():
    # rank 0: mean 2.0 over 3 items, mean 0.5 over 10 tokens; rank 1: mean 5.0 over 1 item, 1.0 over 30 tokens
    stats = [{"reward": 2.0, "clip": 0.5, "lr": 0.1}, {"reward": 5.0, "clip": 1.0, "lr": 0.1}]
    weights = [{"reward": 3, "clip": 10}, {"reward": 1, "clip": 30}]
    out = run_ranks(lambda r, reduce: weighted_means(stats[r], weights[r], reduce), 2)
    assert out[0] == out[1]
    assert out[0]["reward"] == pytest.approx((2.0 * 3 + 5.0) / 4)
    assert out[0]["clip"] == pytest.approx((0.5 * 10 + 30) / 40)
    assert out[0]["lr"] == pytest.approx(0.1)


def test_explained_variance_across_ranks():
    returns, mask = _ragged(6, 5, seed=8)
    values = returns + torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    sizes = (2, 4)
    parts = run_ranks(lambda r, reduce: global_explained_variance(*(split_rows(t, sizes)[r] for t in (values, returns, mask)), reduce), 2)
    assert float(parts[0]) == pytest.approx(float(parts[1]))
    assert float(parts[0]) == pytest.approx(float(explained_variance(values, returns, mask)), rel=1e-5)
