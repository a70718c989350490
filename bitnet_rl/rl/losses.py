"""Policy-gradient, value and preference losses as pure functions.

Masks are (B, T) with 1 on valid completion tokens and 0 on padding. Stats are detached
0-dim tensors (no host sync); call `.item()` when logging.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from bitnet_rl.rl.advantages import masked_mean, masked_var

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


LossAggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]


def aggregate_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses `(B, T)` to a scalar, as verl's `loss_agg_mode` defines it.

    token_mean           Σ_{b,t} l·m / N_tokens                 (TRL GRPO "dapo", verl default)
    seq_mean_token_sum   Σ_b (Σ_t l·m) / N_seqs                 (sum over tokens, Dr. GRPO-like)
    seq_mean_token_mean  Σ_b (Σ_t l·m / Σ_t m) / N_seqs         (original GRPO)
    N_tokens = Σ m and N_seqs = number of rows with a valid token, unless given: pass the totals of
    the whole minibatch when it is split into micro-batches, so the micro-batch losses add up to
    the minibatch loss.
    """
    mask = mask.to(token_losses.dtype)
    if mode == "token_mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return (token_losses * mask).sum() / max(float(denominator), 1.0)
    per_sequence = (token_losses * mask).sum(dim=1)  # (B,)
    if mode == "seq_mean_token_mean":
        per_sequence = per_sequence / mask.sum(dim=1).clamp(min=1.0)
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {mode!r}")
    denominator = (mask.sum(dim=1) > 0).sum() if num_seqs is None else num_seqs
    return per_sequence.sum() / max(float(denominator), 1.0)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    weights: torch.Tensor | None = None,
    aggregation: LossAggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), asymmetric clip (DAPO), rollout-IS weights.

    ratio = exp(logp - old_logp)
    l_t = w_t * max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    loss = aggregate_loss(l, mask, aggregation)      eps_high defaults to eps_low = `clip_eps`
    `weights` w `(B, T)` are rollout-correction weights (1 if None); masked tokens (mask 0) leave
    the loss and its denominator.
    stats: clip_ratio = share of tokens where the clipped term is the larger one, split into
           clip_ratio/low (ratio < 1 - eps_low, A < 0) and clip_ratio/high (ratio > 1 + eps_high, A > 0);
           clip_frac = clip_ratio (older name); approx_kl = masked_mean(0.5 * (logp - old_logp)^2).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    token_losses = torch.maximum(unclipped, clipped)
    if weights is not None:
        token_losses = token_losses * weights
    loss = aggregate_loss(token_losses, mask, aggregation, num_tokens, num_seqs)
    with torch.no_grad():
        dtype = logprobs.dtype
        mask = mask.to(dtype)
        count = mask.sum().clamp(min=1.0)

        def masked_mean(values: torch.Tensor, _mask: torch.Tensor) -> torch.Tensor:  # 0, not NaN, when all masked
            return (values * _mask).sum() / count

        low = (ratio < 1.0 - clip_eps) & (advantages < 0)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
        clip_ratio = masked_mean((clipped > unclipped).to(dtype), mask)
        stats = {
            "clip_ratio": clip_ratio,
            "clip_ratio/low": masked_mean(low.to(dtype), mask),
            "clip_ratio/high": masked_mean(high.to(dtype), mask),
            "clip_frac": clip_ratio,
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss.

    v_clip = old_v + clip(v - old_v, -eps, eps)
    loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))
    stats: clip_frac = masked fraction of tokens where the clipped term is the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_losses = (values - returns).square()
    clipped_losses = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_losses, clipped_losses), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_losses > unclipped_losses).to(values.dtype), mask)
    return loss, {"clip_frac": clip_frac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum(softmax(z) * z), in float32. (B, T, V) -> (B, T)"""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log softmax(z)[label], in float32. (B, T, V), (B, T) -> (B, T)

    With `chunk_size`, rows (B*T of them) are cast to float32 `chunk_size` at a time, which bounds
    peak memory under `torch.no_grad()` (rollout and reference log-probs); with autograd on,
    each chunk's activations are still kept for backward.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    flat_labels = labels.reshape(-1, 1)  # (B*T, 1)
    step = chunk_size or flat_logits.shape[0]
    chunks = [
        torch.log_softmax(flat_logits[i : i + step].float(), dim=-1).gather(1, flat_labels[i : i + step])
        for i in range(0, flat_logits.shape[0], step)
    ]
    return torch.cat(chunks).view(labels.shape)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (1 = perfect, 0 = no better than a constant)."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """sum_t logp_t * m_t, or that divided by sum_t m_t if `average`. (B, T) -> (B,)"""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1.0) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference losses on sequence log-probs (B,), as TRL's DPOTrainer defines them.

    h = (pi_c - pi_r) - (ref_c - ref_r), eps = label_smoothing
    sigmoid (DPO, cDPO): -logsigmoid(beta*h)*(1-eps) - logsigmoid(-beta*h)*eps
    ipo:                 (h - 1/(2*beta))^2   (IPO uses length-averaged logps: sequence_logps(average=True))
    hinge (SLiC):        relu(1 - beta*h)
    robust (rDPO):       (-logsigmoid(beta*h)*(1-eps) + logsigmoid(-beta*h)*eps) / (1 - 2*eps)
    Returns per-pair losses (B,) and detached rewards beta*(pi_c - ref_c), beta*(pi_r - ref_r).
    """
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, ipo, hinge or robust")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
