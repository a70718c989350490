"""Reward shaping and group statistics for RL rollouts: overlong penalty, tied groups, reward stats.

Groups are consecutive runs of `group_size` rows (the completions of one prompt), as in
`rl.advantages`. All functions are pure and work on `(N,)` tensors.
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times `factor`. (N,) -> (N,)

    With L_max = max_new_tokens and L_cache = buffer:
        0                                   if L ≤ L_max − L_cache
        ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L ≤ L_max   (from 0 down to −1)
        −1                                  if L > L_max
    `buffer` = 0 turns it off (all zeros).
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    if buffer > max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} exceeds max_new_tokens {max_new_tokens}")
    start = max_new_tokens - buffer
    penalty = (start - lengths.float()) / buffer
    return factor * penalty.clamp(min=-1.0, max=0.0)


def tied_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """True for each group whose scores all tie (max − min ≤ tol): no GRPO/RLOO signal. (N,) -> (N / G,) bool"""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.reshape(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) <= tol


def filtered_groups(scores: torch.Tensor, raw: torch.Tensor, group_size: int, max_mean: float | None = None) -> torch.Tensor:
    """Groups dynamic sampling drops. (N,), (N,) -> (N / G,) bool

    True where the scores all tie (DAPO: no GRPO/RLOO signal) or, with `max_mean`, where the mean
    raw reward of the group exceeds it (PRIME's online filter, which keeps prompts of accuracy
    ≤ 0.8: with 0/1 rewards, a prompt the policy almost always solves. Its one wrong sample gets
    the group's largest |advantage| and the update mostly sharpens what the policy already does).
    """
    dropped = tied_groups(scores, group_size)
    if max_mean is not None:
        dropped = dropped | (raw.reshape(-1, group_size).mean(dim=1) > max_mean)
    return dropped


def group_reward_stats(scores: torch.Tensor, group_size: int) -> dict[str, float]:
    """TRL's GRPO reward statistics. (N,) -> {reward_std, frac_reward_zero_std}

    reward_std             mean over groups of the within-group std (unbiased); with groups of 1,
                           the std over the batch
    frac_reward_zero_std   share of groups whose rewards all tie (0 with groups of 1)
    """
    if group_size < 2:
        return {"reward_std": float(scores.std()) if scores.numel() > 1 else 0.0, "frac_reward_zero_std": 0.0}
    grouped = scores.reshape(-1, group_size)
    return {
        "reward_std": float(grouped.std(dim=1).mean()),
        "frac_reward_zero_std": float(tied_groups(scores, group_size).float().mean()),
    }
