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


@pytest.mark.parametrize("world", [2, 3])
def test_sft_validation_across_ranks_equals_one_process(sft_dir, world):
    torch.set_num_threads(1)
    model, tokenizer = load_policy(sft_dir).eval(), load_tokenizer(sft_dir)
    examples = tokenize_sft(make_sft_records(23, seed=3), tokenizer, "prompt_completion", max_length=32)
    collate = SFTCollator(tokenizer.pad_token_id)
    one = evaluate_loss(model, examples, collate, batch_size=4)
    seen: dict[int, int] = {}

    def counted(shard):  # each rank's collate counts the examples it batches
        def collate_rank(batch):
            seen[shard.rank] = seen.get(shard.rank, 0) + len(batch)
            return collate(batch)

        return collate_rank

    assert_same(one, across(world, lambda shard: evaluate_loss(model, examples, counted(shard), batch_size=4, shard=shard)))
    assert sorted(seen) == list(range(world)) and max(seen.values()) <= -(-23 // world) + 4  # its share (and one padding batch at most)
    # a different answer is possible: half the examples give another loss
    assert evaluate_loss(model, examples[:11], collate, batch_size=4)["val_loss"] != pytest.approx(one["val_loss"], rel=1e-4)


@pytest.mark.parametrize("world", [2, 3])
def test_dpo_validation_across_ranks_equals_one_process(sft_dir, world):
    model, tokenizer = load_policy(sft_dir).eval(), load_tokenizer(sft_dir)
    with torch.no_grad():  # move the policy off the reference so margins and losses are not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    reference = make_reference(load_policy(sft_dir).eval(), "ternary")
    examples = tokenize_prefs(make_pref_records(19, seed=4), tokenizer, 16, 32)
    collate, cfg = DPOCollator(tokenizer.pad_token_id), DPOConfig()
    one = evaluate_pairs(model, reference, examples, collate, cfg, batch_size=4)
    assert abs(one["val_margin"]) > 1e-3
    assert_same(one, across(world, lambda shard: evaluate_pairs(model, reference, examples, collate, cfg, batch_size=4, shard=shard)), rel=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_reward_model_validation_and_score_stats_across_ranks_equal_one_process(sft_dir, world):
    model, tokenizer = load_scalar_model(sft_dir, seed=1).eval(), load_tokenizer(sft_dir)
    examples = tokenize_prefs(make_pref_records(21, seed=5), tokenizer, 16, 32)
    collate = PrefCollator(tokenizer.pad_token_id)
    one = evaluate_rm(model, examples, collate)
    assert_same(one, across(world, lambda shard: evaluate_rm(model, examples, collate, shard=shard)), rel=1e-5)
    stats = score_stats(model, examples, collate)
    assert stats["count"] == 42 and stats["std"] > 1e-4
    assert_same(stats, across(world, lambda shard: score_stats(model, examples, collate, shard=shard)), rel=1e-5)


class LengthReward:
    """A reward with spread: the completion's length over 10."""

    def score(self, prompts, completions):
        return torch.tensor([len(c) / 10 for c in completions])


@pytest.mark.parametrize("world", [2, 3, 9])
def test_ppo_eval_metrics_across_ranks_equal_one_process(world):
    """`task_metrics` on each rank's share of the samples (prompts[rank::world], as the PPO
    evaluator draws them; a rank may have none) with the sums all-reduced."""
    from bitnet_rl.eval.task import Samples, task_metrics

    completions = [" ".join("x" * (i % 4 + 1)) for i in range(8)]
    reasons = ["stop" if i % 3 else "length" for i in range(8)]
    samples = Samples([f"p{i}" for i in range(8)], [[1]] * 8, [[5] * (i % 5 + 1) for i in range(8)], completions, reasons)
    correct = lambda prompt, completion: len(completion) > 3  # noqa: E731

    def share(rank, reduce):
        part = Samples(*(getattr(samples, f)[rank::world] for f in ("prompts", "prompt_ids", "completion_ids", "completions", "finish_reasons")))
        return task_metrics(part, LengthReward(), correct, reduce)

    one = task_metrics(samples, LengthReward(), correct)
    rewards = torch.tensor([len(c) / 10 for c in completions], dtype=torch.float64)
    assert one["reward"] == pytest.approx(float(rewards.mean())) and one["reward_std"] == pytest.approx(float(rewards.std()))
    assert one["stop_rate"] == pytest.approx(5 / 8) and one["accuracy"] == pytest.approx(sum(len(c) > 3 for c in completions) / 8)
    assert_same(one, run_ranks(share, world))
