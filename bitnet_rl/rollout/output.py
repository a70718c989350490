"""The result of one `generate` call, shared by every rollout backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
