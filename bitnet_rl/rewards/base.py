"""One interface for every reward source: `score(prompts, completions, **meta) -> (N,) float32 tensor`."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from bitnet_rl.errors import UserError


class RewardError(UserError):
    """A reward source raised or returned something unusable; PPO saves a checkpoint, then stops."""


class RewardSource(Protocol):
    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> torch.Tensor: ...


def checked_scores(name: str, values: Any, expected: int) -> torch.Tensor:
    """`values` as a float32 tensor of length `expected`, or a `RewardError` naming the source."""
    try:
        scores = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float32).flatten()
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward {name}: returned {type(values).__name__}, not a list of numbers ({err})") from None
    if scores.numel() != expected:
        raise RewardError(f"reward {name}: returned {scores.numel()} scores for {expected} completions")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name}: non-finite score {scores[bad[0]].item()} at index {bad[0]} ({len(bad)} in all)")
    return scores


def call_reward(name: str, fn, prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> torch.Tensor:
    """Call a user reward and check its result; any exception it raises becomes a `RewardError`."""
    try:
        values = fn(list(prompts), list(completions), **meta)
    except Exception as err:  # noqa: BLE001 - user code: anything it raises stops the run with its name
        message = str(err).splitlines()[0] if str(err) else ""
        raise RewardError(f"reward {name} raised {type(err).__name__}: {message}") from err
    return checked_scores(name, values, len(completions))
