"""Held-out evaluation split across ranks (`distributed.shards`): every example scored once by
exactly one rank, as many forwards on every rank (FSDP2 needs it), and the all-reduced metrics of
SFT, DPO and the reward model equal to one process's over all examples. Ranks are simulated by
threads (`tests/distributed/fake_ranks.py`); the 2-process tests in tests/distributed run the same
code over gloo through `accelerate launch`."""

import sys
from pathlib import Path

import pytest
import torch

from bitnet_rl.data.demo import make_pref_records, make_sft_records
from bitnet_rl.data.prefs import PrefCollator, tokenize_prefs
from bitnet_rl.data.sft import SFTCollator, tokenize_sft
from bitnet_rl.distributed.shards import Shard, shard_batches
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.models.value import load_scalar_model
from bitnet_rl.recipe import DPOConfig
from bitnet_rl.train.dpo import DPOCollator, evaluate_pairs, make_reference
from bitnet_rl.train.rm import evaluate_rm, score_stats
from bitnet_rl.train.sft import evaluate_loss

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from fake_ranks import run_ranks  # noqa: E402


@pytest.mark.parametrize("n, batch, world", [(10, 3, 1), (10, 3, 2), (10, 3, 3), (7, 2, 4), (2, 4, 3), (1, 1, 2), (0, 4, 2)])
def test_every_example_once_and_equal_batch_counts(n, batch, world):
    per_rank = [shard_batches(n, batch, rank, world) for rank in range(world)]
    scored = sorted(i for batches in per_rank for rows, padding in batches if not padding for i in rows)
    assert scored == list(range(n))
    assert len({len(b) for b in per_rank}) == 1  # as many forwards on every rank
    assert all(0 < len(rows) <= batch for batches in per_rank for rows, _ in batches)
    if world == 1:  # one process: the contiguous batches it always had
        assert [rows for rows, _ in per_rank[0]] == [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(4, 0)


def across(world: int, fn):
    """fn(shard) on `world` simulated ranks; each rank's result (they must agree)."""
    return run_ranks(lambda rank, reduce: fn(Shard(rank, world, reduce)), world)


def assert_same(one: dict, ranks: list[dict], rel: float = 1e-6) -> None:
    for result in ranks:
        assert result.keys() == one.keys()
        for key in one:
            assert result[key] == pytest.approx(one[key], rel=rel, abs=1e-7), key


def pads(n: int, batch: int, world: int) -> bool:
    """Whether some rank runs a padding batch (its results dropped) at this size."""
    return any(padding for rank in range(world) for _, padding in shard_batches(n, batch, rank, world))


@pytest.mark.parametrize("n, world", [(23, 2), (23, 3), (9, 2)])
def test_sft_validation_across_ranks_equals_one_process(sft_dir, n, world):
    torch.set_num_threads(1)
    model, tokenizer = load_policy(sft_dir).eval(), load_tokenizer(sft_dir)
    examples = tokenize_sft(make_sft_records(n, seed=3), tokenizer, "prompt_completion", max_length=32)
    assert pads(n, 4, world) == (n == 9)  # 9 examples: rank 1 has 4 (one batch) and repeats it once as padding
    collate = SFTCollator(tokenizer.pad_token_id)
    one = evaluate_loss(model, examples, collate, batch_size=4)
    seen: dict[int, int] = {}

    def counted(shard):  # each rank's collate counts the examples it batches
        def collate_rank(batch):
            seen[shard.rank] = seen.get(shard.rank, 0) + len(batch)
            return collate(batch)

        return collate_rank

    assert_same(one, across(world, lambda shard: evaluate_loss(model, examples, counted(shard), batch_size=4, shard=shard)))
    assert sorted(seen) == list(range(world)) and max(seen.values()) <= -(-n // world) + 4  # its share (and one padding batch at most)
    # a different answer is possible: half the examples give another loss
    assert evaluate_loss(model, examples[: n // 2], collate, batch_size=4)["val_loss"] != pytest.approx(one["val_loss"], rel=1e-4)


@pytest.mark.parametrize("n, world", [(19, 2), (19, 3), (9, 2)])
def test_dpo_validation_across_ranks_equals_one_process(sft_dir, n, world):
    model, tokenizer = load_policy(sft_dir).eval(), load_tokenizer(sft_dir)
    with torch.no_grad():  # move the policy off the reference so margins and losses are not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    reference = make_reference(load_policy(sft_dir).eval(), "ternary")
    examples = tokenize_prefs(make_pref_records(n, seed=4), tokenizer, 16, 32)
    collate, cfg = DPOCollator(tokenizer.pad_token_id), DPOConfig()
    one = evaluate_pairs(model, reference, examples, collate, cfg, batch_size=4)
    assert abs(one["val_margin"]) > 1e-3
    assert_same(one, across(world, lambda shard: evaluate_pairs(model, reference, examples, collate, cfg, batch_size=4, shard=shard)), rel=1e-5)


@pytest.mark.parametrize("n, world", [(21, 2), (21, 3), (9, 2)])
def test_reward_model_validation_and_score_stats_across_ranks_equal_one_process(sft_dir, n, world):
    model, tokenizer = load_scalar_model(sft_dir, seed=1).eval(), load_tokenizer(sft_dir)
    examples = tokenize_prefs(make_pref_records(n, seed=5), tokenizer, 16, 32)
    collate = PrefCollator(tokenizer.pad_token_id)
    one = evaluate_rm(model, examples, collate, batch_size=4)
    assert_same(one, across(world, lambda shard: evaluate_rm(model, examples, collate, 4, shard=shard)), rel=1e-5)
    stats = score_stats(model, examples, collate, batch_size=4)
    assert stats["count"] == 2 * n and stats["std"] > 1e-4
    assert_same(stats, across(world, lambda shard: score_stats(model, examples, collate, 4, shard=shard)), rel=1e-5)


class LengthReward:
    """A reward with spread: the completion's length over 10."""

    def score(self, prompts, completions):
        return torch.tensor([len(c) / 10 for c in completions])


@pytest.mark.parametrize("world", [2, 3, 9])
def test_ppo_eval_metrics_across_ranks_equal_one_process(world):
    """`task_metrics` on each rank's share of the samples (prompts[rank::world], as the PPO
    evaluator draws them; a rank may have none) with the sums all-reduced."""
    from bitnet_rl.eval.task import Samples, score_samples, task_metrics

    completions = [" ".join("x" * (i % 4 + 1)) for i in range(8)]
    reasons = ["stop" if i % 3 else "length" for i in range(8)]
    samples = Samples([f"p{i}" for i in range(8)], [[1]] * 8, [[5] * (i % 5 + 1) for i in range(8)], completions, reasons)
    correct = lambda prompt, completion: len(completion) > 3  # noqa: E731

    def share(rank, reduce):
        part = Samples(*(getattr(samples, f)[rank::world] for f in ("prompts", "prompt_ids", "completion_ids", "completions", "finish_reasons")))
        return task_metrics(part, score_samples(part, LengthReward()), correct, reduce)

    one = task_metrics(samples, score_samples(samples, LengthReward()), correct)
    rewards = torch.tensor([len(c) / 10 for c in completions], dtype=torch.float64)
    assert one["reward"] == pytest.approx(float(rewards.mean())) and one["reward_std"] == pytest.approx(float(rewards.std()))
    assert one["stop_rate"] == pytest.approx(5 / 8) and one["accuracy"] == pytest.approx(sum(len(c) > 3 for c in completions) / 8)
    assert_same(one, run_ranks(share, world))


def test_evaluation_takes_its_share_from_the_running_process_group(sft_dir, monkeypatch):
    """Without an explicit shard, evaluation asks torch.distributed: as rank 1 of 2 it batches only
    examples 1, 3, 5, ... (the sum over ranks is stubbed to the identity: one rank's sums)."""
    import torch.distributed as dist

    model, tokenizer = load_policy(sft_dir).eval(), load_tokenizer(sft_dir)
    examples = tokenize_sft(make_sft_records(9, seed=3), tokenizer, "prompt_completion", max_length=32)
    collate, seen = SFTCollator(tokenizer.pad_token_id), []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: None)
    got = evaluate_loss(model, examples, lambda batch: seen.append(batch) or collate(batch), batch_size=4)
    assert [len(b) for b in seen] == [4, 4]  # examples 1, 3, 5, 7, then the same batch again as padding
    assert seen[0] == [examples[i] for i in (1, 3, 5, 7)]
    assert got == evaluate_loss(model, [examples[i] for i in (1, 3, 5, 7)], collate, batch_size=4, shard=Shard())


def test_a_reward_error_on_one_rank_stops_every_rank():
    """PPO's evaluator scores each rank's share; a reward source failing on rank 1 only must raise on
    rank 0 too (`agreed`), instead of leaving it waiting in the next all-reduce."""
    from bitnet_rl.rewards.base import RewardError
    from bitnet_rl.train.ppo_sampling import agreed

    def score(rank, reduce):
        def fn():
            if rank == 1:
                raise RewardError("demo: non-finite score")
            return rank

        try:
            return agreed(fn, Shard(rank, 2, reduce).all_true)
        except RewardError as err:
            return str(err)

    assert run_ranks(score, 2) == ["a reward source failed in another process (its error is above); stopping", "demo: non-finite score"]
    assert run_ranks(lambda rank, reduce: agreed(lambda: rank * 10, Shard(rank, 2, reduce).all_true), 2) == [0, 10]
