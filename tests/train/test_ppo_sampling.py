"""Dynamic sampling (DAPO): tied groups are dropped and refilled; the batch keeps its size."""

import torch

from bitnet_rl.recipe import PPOConfig
from bitnet_rl.rollout.output import RolloutOutput
from bitnet_rl.train.ppo_sampling import Sampled, sample_groups, shaped_scores


def fake_round(scores: list[float], tag: int) -> Sampled:
    n = len(scores)
    out = RolloutOutput(
        prompt_ids=torch.full((n, 2), tag), prompt_lengths=torch.full((n,), 2), completion_ids=torch.arange(n)[:, None] + 100 * tag,
        logprobs=torch.zeros(n, 1), logprobs_t1=torch.zeros(n, 1), lengths=torch.ones(n, dtype=torch.long), finish_reasons=["stop"] * n,
    )  # fmt: skip
    s = torch.tensor(scores)
    return Sampled(out, [f"p{tag}"] * n, [f"c{tag}.{i}" for i in range(n)], s, s.clone(), torch.ones(n, dtype=torch.bool))


def test_tied_groups_are_refilled_from_new_rounds():
    # groups of 2, 2 prompts per iteration. Round 0: one tied group; round 1: one informative, one tied.
    rounds = [[1.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.2, 0.9], [0.3, 0.1, 0.0, 1.0]]
    calls = []

    def round_fn(r):
        calls.append(r)
        return fake_round(rounds[r], r)

    cfg = PPOConfig(advantage="grpo", samples_per_prompt=2, prompts_per_iteration=2, dynamic_sampling=True, dynamic_sampling_rounds=3)
    got = sample_groups(round_fn, cfg)
    assert calls == [0, 1]  # stopped once two informative groups were in hand
    torch.testing.assert_close(got.scores, torch.tensor([0.0, 1.0, 0.2, 0.9]))
    assert got.completions == ["c0.2", "c0.3", "c1.2", "c1.3"]
    assert got.out.completion_ids.flatten().tolist() == [2, 3, 102, 103]
    assert got.rounds == 2 and got.dropped_groups == 2


def test_rounds_run_out_then_tied_groups_fill_up_and_off_means_one_round():
    all_tied = lambda r: fake_round([1.0, 1.0, 0.0, 0.0], r)  # noqa: E731
    cfg = PPOConfig(advantage="grpo", samples_per_prompt=2, prompts_per_iteration=2, dynamic_sampling=True, dynamic_sampling_rounds=1)
    got = sample_groups(all_tied, cfg)
    assert len(got.completions) == 4 and got.rounds == 2 and got.dropped_groups == 4
    off = PPOConfig(advantage="grpo", samples_per_prompt=2, prompts_per_iteration=2)
    assert sample_groups(all_tied, off).completions == ["c0.0", "c0.1", "c0.2", "c0.3"]


def test_max_mean_also_drops_mostly_solved_groups():
    # groups of 4: [1,1,1,0] mean 0.75 > 0.6 dropped; [1,0,0,0] mean 0.25 kept; ties dropped as before
    from bitnet_rl.rl.shaping import filtered_groups

    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert filtered_groups(scores, scores, 4).tolist() == [False, False, True, True]
    assert filtered_groups(scores, scores, 4, max_mean=0.6).tolist() == [True, False, True, True]
    assert filtered_groups(scores, scores, 4, max_mean=0.75).tolist() == [False, False, True, True]  # "exceeds": 0.75 stays
    # the raw reward decides, not the penalised score: a missing-EOS penalty does not hide a solved group
    shaped = scores - torch.tensor([0, 0, 0, 1.0] + [0.0] * 12)
    assert filtered_groups(shaped, scores, 4, max_mean=0.6).tolist() == [True, False, True, True]
    rounds = [[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    cfg = PPOConfig(advantage="grpo", samples_per_prompt=4, prompts_per_iteration=2, dynamic_sampling=True, dynamic_sampling_rounds=1, dynamic_sampling_max_mean=0.6)
    got = sample_groups(lambda r: fake_round(rounds[r], r), cfg)
    # round 0 keeps its second group; round 1 has none under 0.6, so the first dropped group fills up
    assert got.completions == ["c0.4", "c0.5", "c0.6", "c0.7", "c0.0", "c0.1", "c0.2", "c0.3"]
    assert got.rounds == 2 and got.dropped_groups == 3


def test_shaped_scores_add_eos_and_overlong_penalties():
    cfg = PPOConfig(missing_eos_penalty=-1.0, overlong_buffer=4, overlong_penalty=0.5)
    raw = torch.tensor([1.0, 1.0, 1.0])
    stopped = torch.tensor([True, True, False])
    lengths = torch.tensor([5, 8, 10])
    # max_new_tokens 10, buffer 4: lengths 5 → 0, 8 → -0.5·0.5, 10 → -1·0.5 and no EOS −1
    torch.testing.assert_close(shaped_scores(raw, stopped, lengths, cfg, 10), torch.tensor([1.0, 0.75, -0.5]))


def test_check_config_names_the_conflicting_keys():
    import pytest

    from bitnet_rl.errors import UserError
    from bitnet_rl.recipe import Recipe
    from bitnet_rl.train.ppo import check_config

    def recipe(**ppo):
        return Recipe.model_validate({"rollout": {"max_new_tokens": 8}, "ppo": ppo})

    for ppo, key in [
        ({"advantage": "gae", "dynamic_sampling": True}, "dynamic_sampling"),
        ({"advantage": "grpo", "samples_per_prompt": 2, "dynamic_sampling_max_mean": 0.8}, "dynamic_sampling_max_mean"),
        ({"advantage": "grpo", "samples_per_prompt": 1}, "samples_per_prompt"),
        ({"overlong_buffer": 9}, "overlong_buffer"),
        ({"minibatch_size": 8, "micro_batch_size": 3}, "micro_batch_size"),
    ]:
        r = recipe(**ppo)
        with pytest.raises(UserError, match=key):
            check_config(r.ppo, r)
    ok = recipe(advantage="rloo", samples_per_prompt=4, dynamic_sampling=True, overlong_buffer=4)
    check_config(ok.ppo, ok)
