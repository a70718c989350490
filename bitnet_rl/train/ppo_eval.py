"""Held-out evaluation during PPO: greedy completions of prompts never used for training, scored
with the run's own reward sources.

Prompts: `ppo.eval_path` if set; otherwise, when training on the demo task, `ppo.eval_prompts`
fresh demo prompts that are not among the training prompts; otherwise none (no evaluation).
Metrics are prefixed `eval/`: reward (greedy mean), reward_std, length, stop_rate and, on the demo
task, accuracy (exactly sorted). With several processes each rank draws its share of the prompts
and the metrics are all-reduced.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from bitnet_rl.data.prompts import load_prompts
from bitnet_rl.distributed.fsdp import gathered_params
from bitnet_rl.distributed.shards import process_shard
from bitnet_rl.eval.task import sample, score_samples, task_metrics
from bitnet_rl.recipe import Recipe
from bitnet_rl.train.ppo_sampling import agreed


def heldout_prompts(recipe: Recipe, training_prompts: list[Any]) -> list[Any]:
    cfg = recipe.ppo
    if cfg.eval_prompts == 0:
        return []
    if cfg.eval_path:
        return load_prompts(cfg.eval_path)[: cfg.eval_prompts]
    if (cfg.prompts or "demo") != "demo":
        return []
    seen = set(training_prompts)
    candidates = load_prompts("demo", 4 * cfg.eval_prompts, seed=recipe.train.seed + 1)
    return [p for p in candidates if p not in seen][: cfg.eval_prompts]


def make_evaluator(recipe: Recipe, tokenizer, reward, generator, prompts: list[Any], chat: bool = False) -> Callable[[nn.Module], dict[str, float]] | None:
    """A function `policy -> eval/* metrics` on `prompts` (syncing `generator` from the policy), or None without prompts.

    `chat`: render the prompts with the chat template, as the run's training prompts are."""
    if not prompts:
        return None
    correct = None
    if not recipe.ppo.eval_path and (recipe.ppo.prompts or "demo") == "demo":
        from reward_models.demo_task import is_correct as correct
    batch = getattr(generator, "max_batch_size", 64) or 64

    def evaluate(policy: nn.Module) -> dict[str, float]:
        if hasattr(generator, "sync_from"):
            with gathered_params(policy):  # FSDP2: the full weights
                generator.sync_from(policy)
        shard = process_shard(next(policy.parameters()).device)  # each rank draws its share of the prompts
        mine = prompts[shard.rank :: shard.world]
        drawn = sample(generator, tokenizer, mine, recipe.rollout.max_new_tokens, temperature=0.0, batch_size=batch, chat=chat)
        scores = agreed(lambda: score_samples(drawn, reward), shard.all_true)  # a reward error stops every rank
        return {f"eval/{k}": v for k, v in task_metrics(drawn, scores, correct, shard.all_reduce).items()}

    return evaluate
