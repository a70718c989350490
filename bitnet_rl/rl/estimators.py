"""Advantage estimators registered by name (verl's `register_adv_est` idea, without mutable state).

Each estimator maps one rollout batch to (advantages, returns) `(B, T)`; the trainer looks the
name up in `ADVANTAGE_ESTIMATORS` and never branches on it. Token rewards already hold the
sequence score on the last completion token and, with `kl_mode=reward`, the KL penalty.

    gae           Generalized advantage estimation with a critic; returns train the critic.
    grpo          (R_i − mean_group) / (std_group + eps), R_i = Σ_t r_t   (eps 1e-4 as TRL 1.16)
    rloo          R_i − mean of the other samples of the group            (TRL's RLOO)
    reinforce_pp  whiten(return-to-go) over the batch                      (REINFORCE++)

Whitening (`ppo.whiten_advantages`): GAE whitens over all valid tokens (OpenRLHF, TRL's old PPO);
the group estimators whiten per sequence, each sequence counting once whatever its length (TRL's
RLOO `normalize_advantages`), and default to off as TRL does (GRPO already divides by the group
std). REINFORCE++ is defined by its batch whitening, so the flag does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch

from bitnet_rl.distributed.reduce import AllReduce, global_masked_whiten, global_whiten_per_sequence
from bitnet_rl.rl.advantages import discounted_returns, gae, grpo_advantages, masked_whiten, reinforce_pp_advantages, rloo_advantages


@dataclass(frozen=True)
class AdvantageInputs:
    token_rewards: torch.Tensor  # (B, T) score on the last token (+ KL penalty in reward mode)
    values: torch.Tensor  # (B, T) critic values (zeros without a critic)
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    group_size: int = 1  # consecutive rows that share a prompt
    gamma: float = 1.0
    gae_lambda: float = 0.95
    std_eps: float = 1e-4  # GRPO's group-std epsilon
    all_reduce: AllReduce | None = None  # with several processes: whitening uses all ranks' moments (distributed.reduce)


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs, bool], tuple[torch.Tensor, torch.Tensor]]  # (inputs, whiten) -> (adv, returns)
    needs_critic: bool
    grouped: bool  # needs ≥ 2 samples per prompt
    whiten_default: bool


@torch.no_grad()
def whiten_per_sequence(per_sequence: torch.Tensor) -> torch.Tensor:
    """(a − mean(a)) / (std(a) + 1e-8) over the B sequences (unbiased std). (B,) -> (B,)"""
    if per_sequence.numel() < 2:
        return per_sequence - per_sequence.mean()
    return (per_sequence - per_sequence.mean()) / (per_sequence.std() + 1e-8)


def _sequence_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    return (inputs.token_rewards * inputs.mask).sum(dim=1)  # (B,)


def _whiten_tokens(values: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
    if inputs.all_reduce is None:
        return masked_whiten(values, inputs.mask)
    return global_masked_whiten(values, inputs.mask, inputs.all_reduce)


def _broadcast(per_sequence: torch.Tensor, inputs: AdvantageInputs, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mask = inputs.mask
    if whiten:
        reduce = inputs.all_reduce
        per_sequence = whiten_per_sequence(per_sequence) if reduce is None else global_whiten_per_sequence(per_sequence, reduce)
    advantages = per_sequence.unsqueeze(1) * mask
    return advantages, advantages.clone()


def _gae(inputs: AdvantageInputs, whiten: bool):
    advantages, returns = gae(inputs.token_rewards, inputs.values, inputs.mask, inputs.gamma, inputs.gae_lambda)
    return (_whiten_tokens(advantages, inputs) if whiten else advantages), returns


def _grpo(inputs: AdvantageInputs, whiten: bool):
    per_sequence = grpo_advantages(_sequence_rewards(inputs), inputs.group_size, eps=inputs.std_eps)
    return _broadcast(per_sequence, inputs, whiten)


def _rloo(inputs: AdvantageInputs, whiten: bool):
    return _broadcast(rloo_advantages(_sequence_rewards(inputs), inputs.group_size), inputs, whiten)


def _reinforce_pp(inputs: AdvantageInputs, whiten: bool):
    if inputs.all_reduce is None:
        advantages = reinforce_pp_advantages(inputs.token_rewards, inputs.mask, inputs.gamma)
    else:  # the same estimator, whitened with all ranks' moments
        advantages = global_masked_whiten(discounted_returns(inputs.token_rewards, inputs.mask, inputs.gamma), inputs.mask, inputs.all_reduce)
    return advantages, advantages.clone()


ADVANTAGE_ESTIMATORS: MappingProxyType[str, Estimator] = MappingProxyType(
    {
        "gae": Estimator(_gae, needs_critic=True, grouped=False, whiten_default=True),
        "grpo": Estimator(_grpo, needs_critic=False, grouped=True, whiten_default=False),
        "rloo": Estimator(_rloo, needs_critic=False, grouped=True, whiten_default=False),
        "reinforce_pp": Estimator(_reinforce_pp, needs_critic=False, grouped=False, whiten_default=True),
    }
)


def estimate_advantages(name: str, inputs: AdvantageInputs, whiten: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) `(B, T)` of the estimator registered as `name`; `whiten=None` uses its default."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    estimator = ADVANTAGE_ESTIMATORS[name]
    return estimator.fn(inputs, estimator.whiten_default if whiten is None else whiten)
