"""PPO experience: one rollout batch as a typed dataclass, and the forward passes that fill it.

Sequences are prompt + completion, right-padded (B, L). Per-token quantities live on the
completion only, aligned at t = 0 for every row: `(B, T)` with T = longest completion, read
from the shifted `(B, L-1)` log-prob grid at column `prompt_len - 1 + t`. Right padding keeps
every row's positions exact, whatever its prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from bitnet_rl.data.batching import right_pad
from bitnet_rl.models.forward import causal_lm_logprobs
from bitnet_rl.models.frozen import packed_prefill
from bitnet_rl.models.value import token_values
from bitnet_rl.rl.losses import entropy_from_logits, logprobs_from_logits
from bitnet_rl.rollout.output import RolloutOutput


@dataclass
class Experience:
    input_ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    prompt_lens: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    old_logprobs: torch.Tensor  # (B, T) training-policy log-probs at rollout time
    rollout_logprobs: torch.Tensor  # (B, T) the generator's temperature-1 log-probs of the same tokens
    ref_logprobs: torch.Tensor  # (B, T) frozen reference
    values: torch.Tensor  # (B, T) critic values (zeros without a critic)
    scores: torch.Tensor  # (B,) sequence rewards after penalties
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    is_weights: torch.Tensor  # (B, T) rollout-correction weights on the policy-gradient term (1: none)
    loss_mask: torch.Tensor  # (B, T) mask minus tokens the rollout correction drops

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` of every field (a minibatch)."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device) -> "Experience":
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def experience_from_rollout(out: RolloutOutput, scores: torch.Tensor, device: torch.device | str | None = None) -> Experience:
    """An `Experience` built from a generator's `RolloutOutput` with tensor ops only (no lists).

    Row b is prompt b followed by its completion, right-padded with the output's pad id:
    input_ids[b, :p_b] = prompt, input_ids[b, p_b : p_b + n_b] = completion. `rollout_logprobs`
    are the generator's `logprobs_t1`. Log-probs, values and advantages start at 0 and
    `is_weights` / `loss_mask` at "no correction"; the trainer fills them.
    """
    device = device or out.completion_ids.device
    prompt_ids, completion_ids = out.prompt_ids.to(device), out.completion_ids.to(device)
    prompt_lens, lengths = out.prompt_lengths.to(device).long(), out.lengths.to(device).long()
    batch, width = completion_ids.shape
    if width == 0:  # keep one (masked) completion column so every per-token tensor has T >= 1
        completion_ids = torch.full((batch, 1), out.pad_token_id, dtype=torch.long, device=device)
        width = 1
    steps = torch.arange(width, device=device)
    mask = (steps[None, :] < lengths[:, None]).float()  # (B, T)
    total = prompt_ids.shape[1] + width
    input_ids = torch.full((batch, total), out.pad_token_id, dtype=torch.long, device=device)
    prompt_cols = torch.arange(prompt_ids.shape[1], device=device)
    input_ids[:, : prompt_ids.shape[1]] = torch.where(prompt_cols[None, :] < prompt_lens[:, None], prompt_ids, out.pad_token_id)
    completion = torch.where(mask.bool(), completion_ids, out.pad_token_id)
    input_ids.scatter_(1, prompt_lens[:, None] + steps[None, :], completion)  # columns past p_b + n_b get padding
    seq_lens = prompt_lens + lengths
    input_ids = input_ids[:, : int(seq_lens.max())]
    attention_mask = (torch.arange(input_ids.shape[1], device=device)[None, :] < seq_lens[:, None]).long()
    rollout_logprobs = torch.zeros_like(mask)
    if out.logprobs_t1.numel():
        rollout_logprobs[:, : out.logprobs_t1.shape[1]] = out.logprobs_t1.to(device).float()
    zeros = torch.zeros_like(mask)
    return Experience(
        input_ids, attention_mask, prompt_lens, mask,
        old_logprobs=zeros, rollout_logprobs=rollout_logprobs * mask, ref_logprobs=zeros, values=zeros,
        scores=scores.to(device).float(), advantages=zeros, returns=zeros, is_weights=mask.clone(), loss_mask=mask.clone(),
    )  # fmt: skip


def select_rollout(out: RolloutOutput, rows: torch.Tensor) -> RolloutOutput:
    """Rows `rows` (long indices) of a `RolloutOutput`, completions trimmed to the longest kept."""
    lengths = out.lengths[rows]
    width = int(lengths.max()) if rows.numel() else 0
    prompt_lengths = out.prompt_lengths[rows]
    prompt_width = int(prompt_lengths.max()) if rows.numel() else 0
    return replace(
        out,
        prompt_ids=out.prompt_ids[rows, :prompt_width],
        prompt_lengths=prompt_lengths,
        completion_ids=out.completion_ids[rows, :width],
        logprobs=out.logprobs[rows, :width],
        logprobs_t1=out.logprobs_t1[rows, :width],
        lengths=lengths,
        finish_reasons=[out.finish_reasons[i] for i in rows.tolist()],
    )


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
    """Completion log-probs `(B, T)` (and entropies) under `model`, with gradients if enabled.

    A frozen 2-bit copy (the reference) runs on the generator's packed prefill path on CUDA
    (`models.frozen.packed_prefill`); a trained model always runs its own forward.
    """
    width = exp.mask.shape[1]
    fast = None if with_entropy or torch.is_grad_enabled() else packed_prefill(model)
    if fast is not None and exp.input_ids.shape[1] <= fast.max_positions:
        return completion_columns(fast.token_logprobs(exp.input_ids), exp.prompt_lens, width), None
    inner = getattr(model, "module", model)  # a DDP wrapper's model
    if hasattr(inner, "base_model") and inner.get_output_embeddings() is not None:  # no (B, T, V) logits (issue 13)
        logprobs, entropy = causal_lm_logprobs(model, exp.input_ids, exp.attention_mask, with_entropy=with_entropy)
        return completion_columns(logprobs, exp.prompt_lens, width), None if entropy is None else completion_columns(entropy, exp.prompt_lens, width)
    logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, use_cache=False).logits[:, :-1]
    logprobs = logprobs_from_logits(logits, exp.input_ids[:, 1:])
    entropy = completion_columns(entropy_from_logits(logits), exp.prompt_lens, width) if with_entropy else None
    return completion_columns(logprobs, exp.prompt_lens, width), entropy


def critic_forward(critic: nn.Module, exp: Experience) -> torch.Tensor:
    """Values `(B, T)` of the state before each completion token."""
    values = token_values(critic, exp.input_ids, exp.attention_mask)[:, :-1]
    return completion_columns(values, exp.prompt_lens, exp.mask.shape[1])
