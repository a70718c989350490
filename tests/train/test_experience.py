import torch

from bitnet_rl.recipe import PPOConfig
from bitnet_rl.train.experience import completion_columns, pack_sequences
from bitnet_rl.train.ppo import compute_advantages


def test_pack_sequences_and_completion_columns():
    ids, attention, prompt_lens, mask = pack_sequences([[1, 5, 6], [1, 7]], [[8, 9, 2], [4]], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 4, 0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert prompt_lens.tolist() == [3, 2] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    # shifted grid column j predicts token j+1; row 0's completion starts at column 2, row 1's at 1
    grid = torch.arange(10.0).view(2, 5)
    cols = completion_columns(grid, prompt_lens, 3)
    assert cols[0].tolist() == [2.0, 3.0, 4.0]
    assert cols[1, 0].item() == 6.0  # row 1, column 1 (then clamped / masked)


def test_gae_with_kl_in_reward_by_hand():
    cfg = PPOConfig(advantage="gae", gamma=1.0, gae_lambda=1.0, whiten_advantages=False, kl_mode="reward")
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0])
    values = torch.tensor([[0.5, 0.25, 0.0]])
    kl = torch.tensor([[0.1, 0.3, 0.0]])
    advantages, returns, rewards = compute_advantages(cfg, scores, values, kl, mask, kl_coef=0.5)
    # rewards: [-0.05, 2 - 0.15]; with γ = λ = 1 returns are rewards-to-go, advantages = returns - values
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.85, 0.0]]))
    torch.testing.assert_close(returns[:, :2], torch.tensor([[1.8, 1.85]]))
    torch.testing.assert_close(advantages[:, :2], torch.tensor([[1.3, 1.6]]))


def test_grpo_groups_by_hand():
    cfg = PPOConfig(advantage="grpo", samples_per_prompt=2, kl_mode="loss")
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    advantages, _, _ = compute_advantages(cfg, scores, torch.zeros_like(mask), torch.zeros_like(mask), mask, kl_coef=0.0)
    # group 1: mean 0.5, std (unbiased) 0.7071 → ±0.7071; group 2: identical scores → 0
    torch.testing.assert_close(advantages[0], torch.tensor([0.7071, 0.7071]), atol=1e-3, rtol=0)
    torch.testing.assert_close(advantages[1], torch.tensor([-0.7071, 0.0]), atol=1e-3, rtol=0)
    assert advantages[2:].abs().max() < 1e-5


def test_rloo_by_hand():
    cfg = PPOConfig(advantage="rloo", samples_per_prompt=3, whiten_advantages=False)
    mask = torch.ones(3, 1)
    advantages, _, _ = compute_advantages(cfg, torch.tensor([1.0, 2.0, 6.0]), torch.zeros(3, 1), torch.zeros(3, 1), mask, kl_coef=0.0)
    # r_i - mean(others): 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(advantages.flatten(), torch.tensor([-3.0, -1.5, 4.5]))


def constructed_rollout():
    from bitnet_rl.rollout.output import RolloutOutput

    # prompts [1, 5, 6] and [1, 7] (right-padded with 0); completions [8, 9, 2] and [4]
    return RolloutOutput(
        prompt_ids=torch.tensor([[1, 5, 6], [1, 7, 0]]),
        prompt_lengths=torch.tensor([3, 2]),
        completion_ids=torch.tensor([[8, 9, 2], [4, 0, 0]]),
        logprobs=torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]),
        logprobs_t1=torch.tensor([[-0.5, -0.6, -0.7], [-0.8, 0.0, 0.0]]),
        lengths=torch.tensor([3, 1]),
        finish_reasons=["stop", "length"],
        pad_token_id=0,
    )


def test_experience_from_rollout_matches_the_list_path():
    from bitnet_rl.train.experience import experience_from_rollout

    out = constructed_rollout()
    exp = experience_from_rollout(out, torch.tensor([1.0, 0.5]))
    ids, attention, prompt_lens, mask = pack_sequences([[1, 5, 6], [1, 7]], [[8, 9, 2], [4]], pad_id=0)
    torch.testing.assert_close(exp.input_ids, ids)
    torch.testing.assert_close(exp.attention_mask, attention)
    torch.testing.assert_close(exp.prompt_lens, prompt_lens)
    torch.testing.assert_close(exp.mask, mask)
    torch.testing.assert_close(exp.rollout_logprobs, torch.tensor([[-0.5, -0.6, -0.7], [-0.8, 0.0, 0.0]]))
    torch.testing.assert_close(exp.is_weights, mask)
    torch.testing.assert_close(exp.loss_mask, mask)
    assert exp.scores.tolist() == [1.0, 0.5]


def test_select_and_concat_rollouts_round_trip():
    from bitnet_rl.rollout.output import concat_rollouts
    from bitnet_rl.train.experience import experience_from_rollout, select_rollout

    out = constructed_rollout()
    second = select_rollout(out, torch.tensor([1]))
    assert second.completion_ids.tolist() == [[4]] and second.prompt_ids.tolist() == [[1, 7]] and second.finish_reasons == ["length"]
    joined = concat_rollouts([select_rollout(out, torch.tensor([0])), second])
    for name in ("prompt_ids", "prompt_lengths", "completion_ids", "logprobs_t1", "lengths"):
        torch.testing.assert_close(getattr(joined, name), getattr(out, name))
    assert joined.finish_reasons == out.finish_reasons
    a = experience_from_rollout(joined, torch.zeros(2))
    b = experience_from_rollout(out, torch.zeros(2))
    torch.testing.assert_close(a.input_ids, b.input_ids)
