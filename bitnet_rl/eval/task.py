"""Sample completions for held-out prompts and score them: accuracy, reward, length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from bitnet_rl.data.prompts import encode_prompt


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


def task_metrics(samples: Samples, reward, correct_fn: Callable[[str, str], bool] | None = None) -> dict[str, float]:
    """Mean reward (and its std), accuracy when a checker is given, mean length and stop rate."""
    rewards = reward.score(samples.prompts, samples.completions)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "length": sum(len(c) for c in samples.completion_ids) / max(len(samples.completion_ids), 1),
        "stop_rate": sum(r == "stop" for r in samples.finish_reasons) / max(len(samples.finish_reasons), 1),
    }
    if correct_fn is not None:
        metrics["accuracy"] = sum(correct_fn(p, c) for p, c in zip(samples.prompts, samples.completions)) / max(len(samples.prompts), 1)
    return metrics
