"""Frozen models on the generator's prefill path: reference log-probs and reward-model scores.

`PackedPrefill` runs a frozen 2-bit copy (`models.frozen.frozen_ternary_copy`) of a BitNet or
Llama-style model with the rollout generator's packed forward (`rollout/forward.py`): fused
q|k|v and gate|up W2A8 GEMMs, the fused norm + int8-quantization kernels, no KV cache. For a
causal LM it gives per-token log-probs (chunked LM head, no `(B, L, V)` logits); for a
scalar-head model (`*ForSequenceClassification`: reward models) the `score` head's output
at every position or at each row's last real token.

It computes the same function as the frozen copy's own forward (ternary weights at λ = 1,
per-token int8 activations), in the generator's activation dtype (bf16 on CUDA, float32
elsewhere): the integer sums are exact, so the two differ only by the rounding of norms,
attention and scales. Inputs are right-padded (every real token at its true position), as
PPO's experience and the reward model's batches are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.errors import UserError
from bitnet_rl.rollout import forward
from bitnet_rl.rollout.arch import inspect_policy
from bitnet_rl.rollout.tuning import Tuner
from bitnet_rl.rollout.weights import PackedModel


class PackedPrefill:
    """The packed prefill forward of one frozen model (`from_model`); inference only."""

    def __init__(self, model: PackedModel, tuner: Tuner, *, prefill_tokens: int, score: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        self.model, self.tuner, self.prefill_tokens = model, tuner, prefill_tokens
        self.score = score  # (weight (1, D) float32, bias (1,) | None) of a scalar head

    @classmethod
    @torch.no_grad()
    def from_model(
        cls, model: nn.Module, *, dtype: torch.dtype | None = None, prefill_tokens: int = 16384, autotune: bool = True
    ) -> "PackedPrefill":
        """Pack `model` (a frozen copy or a BitLinear model; causal LM, or backbone + `score` head).

        `dtype` (embeddings, norms, attention) defaults to bf16 on CUDA and float32 elsewhere.
        Raises `UserError` for models the packed forward does not support.
        """
        causal = hasattr(model, "lm_head")
        if not causal and not isinstance(getattr(model, "score", None), nn.Linear):
            raise UserError(f"packed prefill: {type(model).__name__} has neither lm_head nor a linear score head")
        arch = inspect_policy(model, lm_head=causal)
        device = next(model.parameters()).device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        max_len = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        packed = PackedModel(arch, model, device=device, dtype=dtype, max_seq_len=max_len, lm_head=causal)
        packed.sync_from(model)
        score = None
        if not causal:
            bias = model.score.bias
            score = (model.score.weight.detach().float().clone(), None if bias is None else bias.detach().float().clone())
        tuner = Tuner(autotune=autotune and device.type == "cuda")
        return cls(packed, tuner, prefill_tokens=prefill_tokens, score=score)

    @torch.no_grad()
    def sync_from(self, model: nn.Module) -> None:
        """Re-pack a model that trains (a BitLinear critic at λ = 1) into these buffers, score head included."""
        self.model.sync_from(model)
        if self.score is not None:
            self.score[0].copy_(model.score.weight)
            if self.score[1] is not None:
                self.score[1].copy_(model.score.bias)

    @property
    def max_positions(self) -> int:
        """The longest sequence it runs (RoPE tables of `max_position_embeddings`)."""
        return self.model.cos.shape[0]

    def _ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.model.device)
        if ids.shape[1] > self.max_positions:
            raise UserError(f"packed prefill: sequences of {ids.shape[1]} tokens exceed the model's {self.max_positions} positions")
        return ids

    @torch.inference_mode()
    def token_logprobs(self, input_ids: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
        """Log-probs `(B, L-1)` float32 of `input_ids[:, 1:]` (right-padded `(B, L)`; causal LMs)."""
        if self.model.lm_head is None:
            raise UserError("packed prefill: token_logprobs needs a causal LM (this model has a score head)")
        return forward.prefill_logprobs(
            self.model, self._ids(input_ids), prefill_tokens=self.prefill_tokens, tuner=self.tuner, chunk_rows=chunk_rows
        )

    def _head(self, residual: torch.Tensor) -> torch.Tensor:
        weight, bias = self.score
        return F.linear(forward.final_hidden(self.model, residual).float(), weight, bias).squeeze(-1)

    @torch.inference_mode()
    def token_values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The score head at every position, float32 `(B, L)` (scalar-head models)."""
        self._needs_score()
        return forward.prefill(
            self.model, self._ids(input_ids), None, None, prefill_tokens=self.prefill_tokens, tuner=self.tuner,
            project=lambda h, r0: self._head(h),
        )

    @torch.inference_mode()
    def sequence_scores(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The score head at each row's last real token `lengths − 1`, float32 `(B,)` (scalar-head models)."""
        self._needs_score()
        ids = self._ids(input_ids)
        last = (lengths.to(ids.device).long() - 1).clamp(min=0)

        def project(h: torch.Tensor, r0: int) -> torch.Tensor:
            rows = torch.arange(h.shape[0], device=h.device)
            return self._head(h[rows, last[r0 : r0 + h.shape[0]]])

        return forward.prefill(self.model, ids, None, None, prefill_tokens=self.prefill_tokens, tuner=self.tuner, project=project)

    def _needs_score(self) -> None:
        if self.score is None:
            raise UserError("packed prefill: scores need a scalar-head model (this one is a causal LM)")

