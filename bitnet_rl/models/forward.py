"""Forward passes the trainers share: per-token log-probs of a batch under a causal LM."""

from __future__ import annotations

import torch
import torch.nn as nn

from bitnet_rl.rl.losses import logprobs_from_logits


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T-1, float32 `(B, T-1)`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], chunk_size=chunk_size)
