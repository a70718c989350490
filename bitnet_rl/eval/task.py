"""Sample completions for held-out prompts and score them: accuracy, reward, length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bitnet_rl.data.prompts import encode_prompt
from bitnet_rl.models.forward import token_logprobs


@dataclass
class Samples:
    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # without padding; ends with the stop token when it stopped
    completions: list[str]  # decoded, special tokens removed
    finish_reasons: list[str]


def sample(generator, tokenizer, prompts: Sequence[Any], max_new_tokens: int, temperature: float = 0.0, seed: int | None = 0, batch_size: int = 64) -> Samples:
    """Generate for every prompt (in batches) with a rollout generator and decode."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
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
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Samples(list(prompts), prompt_ids, completion_ids, completions, reasons)


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


@torch.no_grad()
def completion_logprobs(model, samples: Samples, pad_id: int, batch_size: int = 32) -> list[torch.Tensor]:
    """Log-prob of each completion token under `model` (teacher forcing), one 1-D tensor per row."""
    from bitnet_rl.train.experience import completion_columns, pack_sequences

    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(samples.prompt_ids), batch_size):
        prompts = samples.prompt_ids[start : start + batch_size]
        completions = [c or [pad_id] for c in samples.completion_ids[start : start + batch_size]]
        ids, attention, prompt_lens, _ = (x.to(device) for x in pack_sequences(prompts, completions, pad_id))
        per_position = token_logprobs(model, ids, attention)
        columns = completion_columns(per_position, prompt_lens, max(len(c) for c in completions)).cpu()
        out += [columns[i, : len(c)] for i, c in enumerate(samples.completion_ids[start : start + batch_size])]
    return out


def kl_to_reference(policy, reference, samples: Samples, pad_id: int) -> float:
    """Mean over samples (drawn from `policy` at temperature 1) of Σ_t log π(y_t) − log π_ref(y_t)."""
    policy_logps = completion_logprobs(policy, samples, pad_id)
    reference_logps = completion_logprobs(reference, samples, pad_id)
    return sum(float((p - r).sum()) for p, r in zip(policy_logps, reference_logps)) / max(len(policy_logps), 1)
