"""The result of one `generate` call, shared by every rollout backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RolloutOutput:
    """Completions for a batch of prompts. B = number of prompts, P = longest prompt,
    T = longest completion (≤ max_new_tokens). Rows are right-padded with `pad_token_id`.

    `logprobs` are under the distribution the tokens were drawn from (temperature, top-k and
    top-p applied); for greedy decoding (temperature 0) that distribution is a point mass and
    `logprobs` is 0. `logprobs_t1` are under the model's unfiltered temperature-1 distribution,
    the one PPO's ratio and KL use. Both are 0 on padding.
    """

    prompt_ids: torch.Tensor  # (B, P) long, right-padded
    prompt_lengths: torch.Tensor  # (B,) long
    completion_ids: torch.Tensor  # (B, T) long, right-padded; includes the stop token
    logprobs: torch.Tensor  # (B, T) float32
    logprobs_t1: torch.Tensor  # (B, T) float32
    lengths: torch.Tensor  # (B,) long, completion tokens per row
    finish_reasons: list[str]  # B entries, "stop" | "length"
    pad_token_id: int = 0

    @property
    def completion_mask(self) -> torch.Tensor:
        """(B, T) bool, True on generated tokens."""
        steps = torch.arange(self.completion_ids.shape[1], device=self.lengths.device)
        return steps[None, :] < self.lengths[:, None]

    def completions(self) -> list[list[int]]:
        """The generated token ids of each row, without padding."""
        return [row[: int(n)].tolist() for row, n in zip(self.completion_ids, self.lengths)]


def concat_rollouts(parts: list[RolloutOutput]) -> RolloutOutput:
    """One `RolloutOutput` with the rows of `parts` in order, right-padded to the widest part."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str, fill) -> torch.Tensor:
        tensors = [getattr(p, name) for p in parts]
        width = max(t.shape[1] for t in tensors)
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])

    pad = parts[0].pad_token_id
    return RolloutOutput(
        prompt_ids=cat("prompt_ids", pad),
        prompt_lengths=torch.cat([p.prompt_lengths for p in parts]),
        completion_ids=cat("completion_ids", pad),
        logprobs=cat("logprobs", 0.0),
        logprobs_t1=cat("logprobs_t1", 0.0),
        lengths=torch.cat([p.lengths for p in parts]),
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        pad_token_id=pad,
    )
