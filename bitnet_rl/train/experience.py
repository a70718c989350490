"""PPO experience: one rollout batch as a typed dataclass, and the forward passes that fill it.

Sequences are prompt + completion, right-padded (B, L). Per-token quantities live on the
completion only, aligned at t = 0 for every row: `(B, T)` with T = longest completion, read
from the shifted `(B, L-1)` log-prob grid at column `prompt_len - 1 + t`. Right padding keeps
every row's positions exact, whatever its prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from bitnet_rl.data.batching import right_pad
from bitnet_rl.models.forward import causal_lm_logprobs
from bitnet_rl.models.value import token_values
from bitnet_rl.rl.losses import entropy_from_logits, logprobs_from_logits


@dataclass
class Experience:
    input_ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    prompt_lens: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    old_logprobs: torch.Tensor  # (B, T) policy log-probs at rollout time
    ref_logprobs: torch.Tensor  # (B, T) frozen reference
    values: torch.Tensor  # (B, T) critic values (zeros without a critic)
    scores: torch.Tensor  # (B,) sequence rewards after penalties
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` of every field (a minibatch)."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device) -> "Experience":
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def pack_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids (B, L), attention_mask (B, L), prompt_lens (B,), mask (B, T)) from token lists."""
    input_ids, attention_mask = right_pad([p + c for p, c in zip(prompt_ids, completion_ids)], pad_id)
    longest = max(max(len(c) for c in completion_ids), 1)
    mask = torch.zeros((len(completion_ids), longest), dtype=torch.float32)
    for i, c in enumerate(completion_ids):
        mask[i, : len(c)] = 1
    prompt_lens = torch.tensor([len(p) for p in prompt_ids])
    return input_ids, attention_mask, prompt_lens, mask


def completion_columns(per_position: torch.Tensor, prompt_lens: torch.Tensor, width: int) -> torch.Tensor:
    """Gather `(B, L-1)` shifted per-position values into completion-aligned `(B, width)`.

    Completion token t of row b is predicted at shifted column `prompt_lens[b] - 1 + t`.
    Columns past the sequence are clamped (and masked by the caller).
    """
    offsets = torch.arange(width, device=per_position.device)
    index = (prompt_lens.to(per_position.device).unsqueeze(1) - 1 + offsets).clamp(max=per_position.shape[1] - 1)
    return per_position.gather(1, index)


def policy_forward(model: nn.Module, exp: Experience, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion log-probs `(B, T)` (and entropies) under `model`, with gradients if enabled."""
    width = exp.mask.shape[1]
    if hasattr(model, "base_model") and model.get_output_embeddings() is not None:  # no (B, T, V) logits (issue 13)
        logprobs, entropy = causal_lm_logprobs(model, exp.input_ids, exp.attention_mask, with_entropy=with_entropy)
        return completion_columns(logprobs, exp.prompt_lens, width), None if entropy is None else completion_columns(entropy, exp.prompt_lens, width)
    logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits[:, :-1]
    logprobs = logprobs_from_logits(logits, exp.input_ids[:, 1:])
    entropy = completion_columns(entropy_from_logits(logits), exp.prompt_lens, width) if with_entropy else None
    return completion_columns(logprobs, exp.prompt_lens, width), entropy


def critic_forward(critic: nn.Module, exp: Experience) -> torch.Tensor:
    """Values `(B, T)` of the state before each completion token."""
    values = token_values(critic, exp.input_ids, exp.attention_mask)[:, :-1]
    return completion_columns(values, exp.prompt_lens, exp.mask.shape[1])
