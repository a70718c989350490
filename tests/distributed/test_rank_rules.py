"""Rules that keep ranks in step, on simulated ranks (threads) or one process: dynamic sampling runs
as many rounds on every rank, FSDP2 shard groups have one dtype, wrappers are no-ops alone."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from fake_ranks import run_ranks  # noqa: E402
from test_ppo_sampling import fake_round  # noqa: E402

from bitnet_rl.errors import UserError  # noqa: E402
from bitnet_rl.recipe import PPOConfig  # noqa: E402
from bitnet_rl.train.ppo_sampling import sample_groups  # noqa: E402


def test_dynamic_sampling_runs_the_same_rounds_on_every_rank():
    # rank 0 has 2 informative groups after round 0; rank 1 only after round 2
    per_rank = {0: [[0.0, 1.0, 0.2, 0.9]] * 3, 1: [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.5], [0.3, 0.1, 0.0, 1.0]]}
    cfg = PPOConfig(advantage="grpo", samples_per_prompt=2, prompts_per_iteration=2, dynamic_sampling=True, dynamic_sampling_rounds=3)

    def rank_fn(rank, reduce):
        calls = []
        everyone = lambda done: float(reduce(torch.tensor([0.0 if done else 1.0]))[0]) == 0.0  # noqa: E731 (collective.all_ranks)
        got = sample_groups(lambda r: calls.append(r) or fake_round(per_rank[rank][r], r), cfg, everyone=everyone)
        return calls, got.scores.tolist()

    (calls0, scores0), (calls1, scores1) = run_ranks(rank_fn, 2)
    assert calls0 == calls1 == [0, 1, 2]  # rank 0 keeps drawing while rank 1 still needs groups
    assert scores0 == pytest.approx([0.0, 1.0, 0.2, 0.9])  # and keeps its first informative groups
    assert scores1 == pytest.approx([0.3, 0.1, 0.0, 1.0])
    alone = sample_groups(lambda r: fake_round(per_rank[0][r], r), cfg)
    assert alone.rounds == 1  # one process stops as soon as it is done


def test_a_reward_error_in_a_refill_round_stops_every_rank_at_that_round():
    from bitnet_rl.rewards.base import RewardError

    cfg = PPOConfig(advantage="grpo", samples_per_prompt=2, prompts_per_iteration=2, dynamic_sampling=True, dynamic_sampling_rounds=3)
    tied = [[1.0, 1.0, 0.0, 0.0]] * 4  # never enough untied groups: every rank wants more rounds

    def rank_fn(rank, reduce):
        calls = []
        everyone = lambda ok: float(reduce(torch.tensor([0.0 if ok else 1.0]))[0]) == 0.0  # noqa: E731 (collective.all_ranks)

        def round_fn(r):
            calls.append(r)
            if rank == 1 and r == 2:
                raise RewardError("reward failed on rank 1")
            return fake_round(tied[r], r)

        try:
            sample_groups(round_fn, cfg, everyone=everyone)
        except RewardError as err:
            return calls, str(err)
        return calls, None

    (calls0, error0), (calls1, error1) = run_ranks(rank_fn, 2)
    assert calls0 == calls1 == [0, 1, 2]  # rank 0 does not draw a round rank 1 never joins (that hung before)
    assert error1 == "reward failed on rank 1" and "another process" in error0


def test_fsdp2_refuses_a_shard_group_of_mixed_dtypes():
    from bitnet_rl.distributed.fsdp import check_uniform_dtypes
    from bitnet_rl.models.build import build_policy
    from bitnet_rl.recipe import ModelConfig, QuantConfig, TinyModelConfig

    model, _ = build_policy(ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)), QuantConfig(), lam=1.0, seed=0)
    check_uniform_dtypes(model)  # one dtype everywhere: fine
    model.model.layers[1].mlp.down_proj.to(torch.bfloat16)
    with pytest.raises(UserError, match=r"shard group model.layers.1 mixes parameter dtypes \(bfloat16, float32\)"):
        check_uniform_dtypes(model)
    model.model.layers[1].to(torch.float32)
    model.lm_head.to(torch.bfloat16)
    with pytest.raises(UserError, match="root"):
        check_uniform_dtypes(model)


def test_wrappers_are_identity_in_one_process():
    from bitnet_rl.distributed.collective import forward_through
    from bitnet_rl.distributed.fsdp import full_model_state, gathered_params, is_sharded

    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(forward_through(layer, lambda m, x: m(x) * 2, x=x), layer(x) * 2)
    with gathered_params(layer) as same:
        assert same is layer
    assert not is_sharded(layer) and full_model_state(layer) is None
