import math

import pytest
import torch

from bitnet_rl.rl import (
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    sequence_logps,
    value_loss,
)

D = torch.float64


def t(x, **kw):
    return torch.tensor(x, dtype=D, **kw)


def test_ppo_policy_loss_clipping_cases():
    # row 0: ratio above/below the clip range with A = +1 and A = -1; row 1: inside the range, then padding
    ratios = [[1.5, 1.5, 0.5, 0.5], [1.1, 3.0, 3.0, 3.0]]
    advs = [[1.0, -1.0, 1.0, -1.0], [2.0, 100.0, 100.0, 100.0]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    logprobs = t([[math.log(r) for r in row] for row in ratios], requires_grad=True)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(2, 4, dtype=D), t(advs), mask, clip_eps=0.2)
    per_token = [
        max(-1.0 * 1.5, -1.0 * 1.2),  # -1.2: clipped
        max(1.0 * 1.5, 1.0 * 1.2),  # 1.5: unclipped
        max(-1.0 * 0.5, -1.0 * 0.8),  # -0.5: unclipped
        max(1.0 * 0.5, 1.0 * 0.8),  # 0.8: clipped
        -2.0 * 1.1,  # inside the range
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    log_ratios = [math.log(1.5)] * 2 + [math.log(0.5)] * 2 + [math.log(1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * x * x for x in log_ratios) / 5)
    loss.backward()
    # d/dlogp of -A * ratio = -A * ratio; clipped tokens and padding get no gradient
    expected_grad = t([[0.0, 1.5 / 5, -0.5 / 5, 0.0], [-2.0 * 1.1 / 5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_value_loss_clipping():
    values = t([[1.0, 0.6, 0.0, 10.0]])
    old_values = t([[0.5, 0.5, 0.5, 0.0]])
    returns = t([[1.0, 1.0, 1.0, -10.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    per_token = [
        max((1.0 - 1.0) ** 2, (0.7 - 1.0) ** 2),  # clipped value 0.5 + 0.2 is the larger loss
        max((0.6 - 1.0) ** 2, (0.6 - 1.0) ** 2),  # inside the range
        max((0.0 - 1.0) ** 2, (0.3 - 1.0) ** 2),  # unclipped is larger
    ]
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 3)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)


def test_entropy_from_logits():
    logits = t([[[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0]]])  # (1, 2, 3)
    p = [1 / 6, 2 / 6, 3 / 6]
    expected = [[-sum(x * math.log(x) for x in p), math.log(3)]]
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_logprobs_from_logits_by_hand_and_chunked():
    z = [[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -2.0, 1.0, 1.0]],
         [[0.3, 0.1, 0.2, 0.4], [-1.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]  # (2, 3, 4)
    labels = [[1, 2, 0], [3, 1, 2]]
    expected = [
        [z[b][i][labels[b][i]] - math.log(sum(math.exp(x) for x in z[b][i])) for i in range(3)] for b in range(2)
    ]
    logits, label_ids = torch.tensor(z), torch.tensor(labels)
    out = logprobs_from_logits(logits, label_ids)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected))
    torch.testing.assert_close(logprobs_from_logits(logits, label_ids, chunk_size=4), out)
    assert logprobs_from_logits(logits.bfloat16(), label_ids, chunk_size=2).dtype == torch.float32


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(t([[1.0, 2.0, 3.0, -7.0]]), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(t([[2.0, 2.0, 2.0, -7.0]]), returns, mask).item() == pytest.approx(0.0)
    # residuals 0, 0, 1: Var = 1/3 (Bessel); Var[R] = 1
    assert explained_variance(t([[1.0, 2.0, 2.0, -7.0]]), returns, mask).item() == pytest.approx(1 - 1 / 3)


def test_sequence_logps():
    token_logps = t([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), t([-3.0, -0.5]))
    torch.testing.assert_close(sequence_logps(token_logps, mask, average=True), t([-1.5, -0.5]))


def _logsigmoid(x):
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -1.0], [-2.0, -3.0], [-2.5, -2.5]  # policy/ref chosen/rejected (B=2)
H = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]  # [1.5, -2.5]


def _dpo(**kw):
    return dpo_loss(t(PC, requires_grad=True), t(PR, requires_grad=True), t(RC), t(RR), **kw)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_sigmoid_and_robust(eps):
    beta = 0.1
    losses, _, _ = _dpo(beta=beta, loss_type="sigmoid", label_smoothing=eps)
    expected = [-_logsigmoid(beta * h) * (1 - eps) - _logsigmoid(-beta * h) * eps for h in H]
    torch.testing.assert_close(losses, t(expected))
    losses, _, _ = _dpo(beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [(-_logsigmoid(beta * h) * (1 - eps) + _logsigmoid(-beta * h) * eps) / (1 - 2 * eps) for h in H]
    torch.testing.assert_close(losses, t(expected))


def test_dpo_ipo_and_hinge():
    losses, _, _ = _dpo(beta=0.1, loss_type="ipo")
    torch.testing.assert_close(losses, t([(1.5 - 5.0) ** 2, (-2.5 - 5.0) ** 2]))  # 1/(2*beta) = 5
    losses, _, _ = _dpo(beta=0.1, loss_type="hinge")
    torch.testing.assert_close(losses, t([1 - 0.15, 1 + 0.25]))
    losses, _, _ = _dpo(beta=1.0, loss_type="hinge")
    torch.testing.assert_close(losses, t([0.0, 1 + 2.5]))  # margin beyond 1 costs nothing


def test_dpo_rewards_detached_and_errors():
    losses, chosen, rejected = _dpo(beta=0.1)
    torch.testing.assert_close(chosen, t([0.1 * (-1.0 + 2.0), 0.1 * (-4.0 + 3.0)]))
    torch.testing.assert_close(rejected, t([0.1 * (-3.0 + 2.5), 0.1 * (-1.0 + 2.5)]))
    assert not chosen.requires_grad and not rejected.requires_grad and losses.requires_grad
    with pytest.raises(ValueError):
        _dpo(loss_type="kto")
    with pytest.raises(ValueError):
        _dpo(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        _dpo(loss_type="robust", label_smoothing=0.5)


def test_loss_aggregation_modes_by_hand():
    from bitnet_rl.rl.losses import aggregate_loss

    losses = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(losses, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(losses, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    # minibatch totals passed in: micro-batch losses add up to the whole batch's
    parts = [aggregate_loss(losses[i : i + 1], mask[i : i + 1], "token_mean", num_tokens=4) for i in range(2)]
    assert sum(p.item() for p in parts) == pytest.approx(10 / 4)
    parts = [aggregate_loss(losses[i : i + 1], mask[i : i + 1], "seq_mean_token_mean", num_seqs=2) for i in range(2)]
    assert sum(p.item() for p in parts) == pytest.approx(3.0)


def test_asymmetric_clip_and_correction_weights():
    # A > 0, ratio 1.25: clipped at 1.2 with eps_high = eps, unclipped with eps_high = 0.28 (DAPO clip-higher)
    logprobs = t([[math.log(1.25), math.log(0.7)]])
    old = torch.zeros(1, 2, dtype=D)
    advs = t([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo_policy_loss(logprobs, old, advs, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clip_ratio/high"].item() == 0.5 and stats["clip_ratio/low"].item() == 0.5 and stats["clip_ratio"].item() == 1.0
    loss, stats = ppo_policy_loss(logprobs, old, advs, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert stats["clip_ratio/high"].item() == 0.0 and stats["clip_ratio"].item() == 0.5
    # rollout-correction weights multiply each token's clipped term; a masked token leaves the mean
    loss, _ = ppo_policy_loss(logprobs, old, advs, mask, clip_eps=0.2, weights=t([[2.0, 0.5]]))
    assert loss.item() == pytest.approx((-1.2 * 2.0 + 0.8 * 0.5) / 2)
    loss, stats = ppo_policy_loss(logprobs, old, advs, torch.tensor([[1.0, 0.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_ratio"].item() == 1.0
