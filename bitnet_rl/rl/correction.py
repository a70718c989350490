"""Rollout correction: the generator's distribution is not the training policy's.

Rollouts come from the 2-bit `PackedGenerator` (int8 activations, its own kernels) or, during a
λ warm-up, from the fully quantized model while the policy trains a λ-blend. PPO's ratio is taken
against `old_logprobs`, the training policy's log-probs on the rollout tokens, so the samples are
off-policy by π_old / π_rollout. The corrections below follow FlashRL / verl (truncated importance
sampling, "TIS"), verl's masked importance sampling ("MIS") and TRL's
`vllm_importance_sampling_correction` modes:

    token_tis    w_t = min(π_old(y_t) / π_rollout(y_t), C)                      per token
    seq_tis      w_t = min(Π_t π_old(y_t) / π_rollout(y_t), C)                   one weight per sequence
    token_mask   keep token t iff 1/C ≤ π_old(y_t) / π_rollout(y_t) ≤ C
    seq_mask     keep a sequence iff 1/C ≤ Π_t π_old(y_t) / π_rollout(y_t) ≤ C
    none         w = 1, every token kept

The weights multiply the clipped PPO term of each token; masked tokens leave the loss and its
denominator. Log-ratios are clamped to [-20, 20] before `exp`, as verl does. Every function is
pure: (old_logprobs, rollout_logprobs, mask) `(B, T)` and cap C > 1 -> (weights, keep) `(B, T)`.
`ROLLOUT_CORRECTIONS` maps each name to its function; the trainer looks names up there.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import torch

from bitnet_rl.rl.advantages import masked_mean

LOG_RATIO_CLAMP = 20.0
QUANTILE_MAX = 1 << 24

Correction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def token_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π_old(y_t) − log π_rollout(y_t), clamped to ±20, 0 on padding. (B, T) -> (B, T)"""
    return ((old_logprobs - rollout_logprobs) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t (log π_old − log π_rollout) over valid tokens, clamped to ±20. (B, T) -> (B,)"""
    return ((old_logprobs - rollout_logprobs) * mask).sum(dim=1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def no_correction(old_logprobs, rollout_logprobs, mask, cap):
    """w = 1, keep = mask."""
    return torch.ones_like(old_logprobs) * mask, mask.clone()


def token_tis(old_logprobs, rollout_logprobs, mask, cap):
    """w_t = min(exp(old_t − rollout_t), C), keep = mask (FlashRL / verl token TIS)."""
    weights = torch.exp(token_log_ratio(old_logprobs, rollout_logprobs, mask)).clamp(max=cap)
    return weights * mask, mask.clone()


def seq_tis(old_logprobs, rollout_logprobs, mask, cap):
    """w_t = min(exp(Σ_s old_s − rollout_s), C) on every token of the row, keep = mask."""
    weights = torch.exp(sequence_log_ratio(old_logprobs, rollout_logprobs, mask)).clamp(max=cap)
    return weights.unsqueeze(1) * mask, mask.clone()


def token_mask(old_logprobs, rollout_logprobs, mask, cap):
    """keep_t = mask_t · [1/C ≤ exp(old_t − rollout_t) ≤ C], w = keep."""
    log_ratio = token_log_ratio(old_logprobs, rollout_logprobs, mask)
    bound = torch.log(torch.tensor(cap, dtype=log_ratio.dtype))
    keep = mask * (log_ratio.abs() <= bound).to(mask.dtype)
    return keep.clone(), keep


def seq_mask(old_logprobs, rollout_logprobs, mask, cap):
    """keep = mask on rows with 1/C ≤ exp(Σ_t old_t − rollout_t) ≤ C, 0 on other rows; w = keep."""
    log_ratio = sequence_log_ratio(old_logprobs, rollout_logprobs, mask)
    bound = torch.log(torch.tensor(cap, dtype=log_ratio.dtype))
    keep = mask * (log_ratio.abs() <= bound).to(mask.dtype).unsqueeze(1)
    return keep.clone(), keep


ROLLOUT_CORRECTIONS: MappingProxyType[str, Correction] = MappingProxyType(
    {"none": no_correction, "token_tis": token_tis, "seq_tis": seq_tis, "token_mask": token_mask, "seq_mask": seq_mask}
)


@torch.no_grad()
def rollout_correction(name: str, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep) `(B, T)` of the correction registered as `name`."""
    if name not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {name!r}; expected one of {', '.join(ROLLOUT_CORRECTIONS)}")
    if cap <= 1.0:
        raise ValueError(f"rollout correction cap must be > 1 (got {cap})")
    mask = mask.to(old_logprobs.dtype)
    return ROLLOUT_CORRECTIONS[name](old_logprobs, rollout_logprobs, mask, cap)


@torch.no_grad()
def rollout_mismatch(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float) -> dict[str, float]:
    """How far the generator is from the training policy on the sampled tokens.

    With d_t = log π_old(y_t) − log π_rollout(y_t) over valid tokens (tokens drawn from π_rollout):
        kl_k3        mean(exp(d) − d − 1)    k3 estimate of KL(π_rollout ‖ π_old) per token
        abs_logp_diff  mean |d|
        ratio_p01/p50/p99  quantiles of exp(d)
        frac_outside   share of tokens with exp(d) outside [1/C, C]
    Keys are prefixed `mismatch/`. (B, T) x3 -> dict of floats.
    """
    mask = mask.to(old_logprobs.dtype)
    d = (old_logprobs - rollout_logprobs).float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    valid = d[mask.bool()]
    if valid.numel() == 0:
        return {}
    ratio = valid.exp()
    stride = -(-ratio.numel() // QUANTILE_MAX)  # torch.quantile takes at most 2^24 values: every k-th one past that
    q = torch.quantile(ratio[::stride], torch.tensor([0.01, 0.5, 0.99], dtype=ratio.dtype, device=ratio.device))
    bound = float(torch.log(torch.tensor(cap)))
    return {
        "mismatch/kl_k3": float(masked_mean(torch.expm1(d) - d, mask)),
        "mismatch/abs_logp_diff": float(valid.abs().mean()),
        "mismatch/ratio_p01": float(q[0]),
        "mismatch/ratio_p50": float(q[1]),
        "mismatch/ratio_p99": float(q[2]),
        "mismatch/frac_outside": float((valid.abs() > bound).float().mean()),
    }
