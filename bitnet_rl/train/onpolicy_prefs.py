"""Preference pairs from the policy's own samples, labelled by a programmatic reward.

A reward model trained only on hand-made mistakes is gamed by the mistakes it never saw: PPO
against the quickstart's RM raised the RM's score while held-out accuracy fell (55.5 % → 48.8 %).
Adding pairs drawn from the policy that PPO will start from (best vs worst of k samples per
prompt, by the programmatic reward) shows the RM the answers PPO actually produces.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def best_worst_pairs(prompts: Sequence[Any], samples: Sequence[Sequence[str]], scores: torch.Tensor) -> list[dict[str, Any]]:
    """One `{prompt, chosen, rejected}` per prompt whose k samples do not all tie.

    `samples[j][i]` is sample j of prompt i and `scores[j, i]` its reward, `(k, N)`. Chosen is the
    first best-scored sample, rejected the first worst-scored one; empty completions are skipped.
    """
    pairs = []
    for i, prompt in enumerate(prompts):
        candidates = [(float(scores[j, i]), samples[j][i]) for j in range(len(samples)) if samples[j][i].strip()]
        if len(candidates) < 2:
            continue
        best = max(candidates, key=lambda c: c[0])
        worst = min(candidates, key=lambda c: c[0])
        if best[0] > worst[0]:
            pairs.append({"prompt": prompt, "chosen": best[1], "rejected": worst[1]})
    return pairs


@torch.no_grad()
def onpolicy_pairs(generator, tokenizer, reward, prompts: Sequence[Any], samples: int = 4, max_new_tokens: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Sample `samples` completions per prompt at temperature 1, score them, keep best-vs-worst pairs."""
    from bitnet_rl.eval.task import sample

    drawn = [sample(generator, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=seed + 1000 * j, batch_size=256).completions for j in range(samples)]
    scores = torch.stack([reward.score(list(prompts), completions) for completions in drawn])  # (k, N)
    return best_worst_pairs(prompts, drawn, scores)
