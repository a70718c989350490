"""Per-token KL estimators between the policy and the reference, and KL-coefficient controllers.

With r = ref_logp - logp and tokens sampled from the policy, Schulman's estimators of
KL(policy || reference) are (http://joschu.net/blog/kl-approx.html):
    k1 = -r                      unbiased, high variance, can be negative
    k2 = 0.5 * r^2               biased, low variance, >= 0
    k3 = exp(r) - r - 1          unbiased, low variance, >= 0
"""

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp. (B, T), (B, T) -> (B, T)"""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2. (B, T), (B, T) -> (B, T)"""
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1. (B, T), (B, T) -> (B, T)"""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token KL estimate of the given kind ("k1", "k2" or "k3"). (B, T) -> (B, T)"""
    if kind == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if kind == "k2":
        return kl_k2(logprobs, ref_logprobs)
    if kind == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'")


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593).

    error = clip(current_kl / target - 1, -0.2, 0.2)
    coef <- coef * (1 + error * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient; same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
