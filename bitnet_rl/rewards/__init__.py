"""Reward sources behind one interface: `score(prompts, completions, **meta) -> (N,) tensor`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from bitnet_rl.errors import UserError
from bitnet_rl.rewards.base import RewardError, RewardSource, call_reward, checked_scores


class WeightedReward:
    """A weighted sum of reward sources: `Σ_i w_i · r_i`."""

    def __init__(self, parts: list[tuple[float, RewardSource]]) -> None:
        self.parts = parts
        self.name = " + ".join(f"{w:g}*{s.name}" for w, s in parts)

    def score(self, prompts: Sequence[Any], completions: Sequence[str], **meta: Any) -> torch.Tensor:
        return sum(w * s.score(prompts, completions, **meta) for w, s in self.parts)


def load_reward(spec: str, device: str | torch.device = "cpu") -> RewardSource:
    """`python:FILE.py:fn`, `module.path:fn`, or a reward-model directory."""
    if spec.startswith("python:") or (":" in spec and not Path(spec).exists()):
        from bitnet_rl.rewards.python_fn import PythonReward

        return PythonReward(spec)
    if Path(spec).is_dir():
        from bitnet_rl.models.build import resolve_model_dir
        from bitnet_rl.rewards.learned import LearnedReward

        return LearnedReward(resolve_model_dir(spec), device=device)
    raise UserError(f"reward {spec!r}: not a reward-model directory nor python:FILE.py:FUNCTION")


def load_rewards(specs: list[tuple[float, str]], device: str | torch.device = "cpu") -> RewardSource:
    """One source, or the weighted sum of several (`ppo.rewards` in a recipe)."""
    if not specs:
        raise UserError("no reward given: pass --reward or set ppo.rewards")
    if len(specs) == 1 and specs[0][0] == 1.0:
        return load_reward(specs[0][1], device)
    return WeightedReward([(w, load_reward(s, device)) for w, s in specs])


__all__ = ["RewardError", "RewardSource", "WeightedReward", "call_reward", "checked_scores", "load_reward", "load_rewards"]
