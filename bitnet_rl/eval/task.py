"""Sample completions for held-out prompts and score them: accuracy, reward, length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bitnet_rl.data.prompts import encode_prompt
from bitnet_rl.distributed.reduce import AllReduce, global_masked_moments, local_only


@dataclass
class Samples:
    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # without padding; ends with the stop token when it stopped
    completions: list[str]  # decoded, special tokens removed
    finish_reasons: list[str]


def sample(
    generator,
    tokenizer,
    prompts: Sequence[Any],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = 0,
    batch_size: int = 64,
    n_samples: int = 1,
    progress: Callable[[int], None] | None = None,
    chat: bool | None = None,
) -> Samples:
    """Generate `n_samples` completions for every prompt (in batches) and decode.

    Rows are prompt-major: row i is sample i % n_samples of prompt i // n_samples. Batch b is
    drawn with seed `seed + b·batch_size`, so two models sampled with the same arguments use
    the same random streams. `progress(rows_done)` is called after every batch. `chat` as in
    `encode_prompt` (None: the template only for message lists)."""
    rows = [p for p in prompts for _ in range(n_samples)]
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    prompt_ids = [ids for ids in encoded for _ in range(n_samples)]
    completion_ids, reasons = [], []
    for start in range(0, len(prompt_ids), batch_size):
        out = generator.generate(
            prompt_ids[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_token_ids=[tokenizer.eos_token_id],
            seed=None if seed is None else seed + start,
        )
        for row, length in enumerate(out.lengths.tolist()):
            completion_ids.append(out.completion_ids[row, :length].tolist())
        reasons += list(out.finish_reasons)
        if progress is not None:
            progress(len(out.finish_reasons))
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Samples(rows, prompt_ids, completion_ids, completions, reasons)


def score_samples(samples: Samples, reward) -> torch.Tensor:
    """`reward`'s score of every sample, float64 `(N,)` on the CPU (empty without samples)."""
    if not samples.prompts:
        return torch.zeros(0, dtype=torch.float64)
    return reward.score(samples.prompts, samples.completions).double().cpu()


def task_metrics(
    samples: Samples, rewards: torch.Tensor, correct_fn: Callable[[str, str], bool] | None = None, all_reduce: AllReduce = local_only
) -> dict[str, float]:
    """Mean reward (and its unbiased std), accuracy when a checker is given, mean length and stop rate.

    `rewards`: the samples' scores (`score_samples`). With `all_reduce` (the sum over ranks,
    `distributed.reduce`), `samples` are this rank's share and the metrics are those of all ranks'
    samples together."""
    mean, var, count = global_masked_moments(rewards, torch.ones_like(rewards), all_reduce)
    correct = sum(correct_fn(p, c) for p, c in zip(samples.prompts, samples.completions)) if correct_fn is not None else 0
    lengths = sum(len(c) for c in samples.completion_ids)
    stops = sum(r == "stop" for r in samples.finish_reasons)
    lengths, stops, correct = all_reduce(torch.tensor([lengths, stops, correct], dtype=torch.float64)).tolist()
    n = max(float(count), 1.0)
    metrics = {"reward": float(mean), "reward_std": float(var.sqrt()) if count > 1 else 0.0, "length": lengths / n, "stop_rate": stops / n}
    if correct_fn is not None:
        metrics["accuracy"] = correct / n
    return metrics
