"""Teacher-forced passes for evaluation: log-probs of sampled completions under the policy and the
reference (for KL), and per-token negative log-likelihood of given data (for perplexity).

Both models score the same token sequences in float32 from full logits, so a model compared
with itself gives exactly zero KL; the rollout generator's own log-probs (packed kernels) are
not used here because their numerical gap to the training-form model would show up as KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.data.sft import IGNORE_INDEX, SFTCollator
from bitnet_rl.train.experience import completion_columns, pack_sequences


@dataclass
class PairedLogprobs:
    """One entry per sequence; entry i has one value per completion token of sequence i (T_i,)."""

    policy: list[torch.Tensor]  # log π(y_t | y_<t)
    reference: list[torch.Tensor]  # log π_ref(y_t | y_<t)
    exact_kl: list[torch.Tensor]  # Σ_v π(v | y_<t) (log π(v | y_<t) − log π_ref(v | y_<t)), the full-vocabulary KL at each position


@torch.no_grad()
def paired_logprobs(
    policy: nn.Module, reference: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, batch_size: int = 8
) -> PairedLogprobs:
    """Score every (prompt, completion) under both models; see `PairedLogprobs`.

    Log-softmax over the full vocabulary in float32 for both models at every completion
    position; `batch_size` bounds the (B, L, V) logits held at once."""
    device = next(policy.parameters()).device
    out = PairedLogprobs([], [], [])
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        completions = completion_ids[start : start + batch_size]
        padded = [c or [pad_id] for c in completions]
        ids, attention, prompt_lens, _ = (x.to(device) for x in pack_sequences(prompts, padded, pad_id))
        width = max(len(c) for c in padded)
        logp = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        logq = reference(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        targets = ids[:, 1:, None]
        columns = [
            completion_columns(values, prompt_lens, width).cpu()
            for values in (logp.gather(-1, targets).squeeze(-1), logq.gather(-1, targets).squeeze(-1), (logp.exp() * (logp - logq)).sum(-1))
        ]
        for i, c in enumerate(completions):
            out.policy.append(columns[0][i, : len(c)])
            out.reference.append(columns[1][i, : len(c)])
            out.exact_kl.append(columns[2][i, : len(c)])
    return out


@torch.no_grad()
def token_nll(model: nn.Module, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """−log p of every trainable token (labels ≠ −100) of SFT-style examples, flattened, float64.

    With `tokenize_sft` examples this scores completion tokens only for prompt/completion and
    chat data (the prompt is context) and every token for plain text."""
    device = next(model.parameters()).device
    collate = SFTCollator(pad_id)
    parts = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        parts.append(losses[labels.reshape(-1) != IGNORE_INDEX].double().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
