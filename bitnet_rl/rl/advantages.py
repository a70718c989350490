"""Advantage estimators: GAE, group baselines (GRPO, RLOO), REINFORCE++, and masked statistics.

Masks are (B, T) with 1 on valid completion tokens and 0 on padding (right-padded).
Advantages carry no gradient: the estimators run under `torch.no_grad()`.
"""

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over `dim` or over everything."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over valid entries: mean((x - mean)^2), times n / (n - 1) if `unbiased`."""
    mask = mask.to(values.dtype)
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered.square(), mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var with unbiased=True needs at least 2 valid entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over valid entries (mean added back if not `shift_mean`).

    Statistics use valid entries only (unbiased var); padded positions come back as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) on token-level rewards.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t = delta_t + gamma * lam * A_{t+1},    returns_t = A_t + V_t
    V_{t+1} and A_{t+1} are 0 after the last valid token. (B, T) x3 -> (B, T), (B, T); 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = r_t + gamma * G_{t+1}, G = 0 after the last valid token. (B, T) -> (B, T)"""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)  # (N / G, G)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-4, scale_std: bool = True
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean(group)) / (std(group) + eps). (N,) -> (N,)

    Consecutive runs of `group_size` scores form a group (completions of one prompt).
    std is the Bessel-corrected group std and eps 1e-4, as in TRL 1.16; with `scale_std=False`, A_i = r_i - mean.
    """
    grouped = _grouped(scores, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - (sum(group) - r_i) / (k - 1). (N,) -> (N,)"""
    if group_size < 2:
        raise ValueError("rloo_advantages needs group_size >= 2")
    grouped = _grouped(scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): A_t = whiten(G_t) over all valid tokens of the batch, with
    G_t = r_t + gamma * G_{t+1} the return-to-go. (B, T) -> (B, T); 0 on padding."""
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


def scores_to_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence score on its last valid token, 0 elsewhere. (B,), (B, T) -> (B, T)"""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * mask.long()).argmax(dim=-1)  # (B,)
    token_rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    token_rewards.scatter_(1, last.unsqueeze(1), scores.unsqueeze(1))
    return token_rewards * mask.to(scores.dtype)


def add_kl_penalty(
    token_rewards: torch.Tensor, kl: torch.Tensor, coef: float | torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """r_t - coef * kl_t on valid tokens, 0 on padding. (B, T) -> (B, T)"""
    return (token_rewards - coef * kl) * mask.to(token_rewards.dtype)
