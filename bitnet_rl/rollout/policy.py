"""PolicyGenerator: rollouts from the training policy itself through transformers' `generate`.

Backend "policy". Slower than the packed generator, but its samples are exactly on-policy for
whatever the policy computes, including the λ-blended weights of λ warm-up (λ < 1) and
architectures the packed generator does not support.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
from transformers import GenerationConfig

from bitnet_rl.rollout.output import RolloutOutput
from bitnet_rl.rollout.sampling import checked_request


class PolicyGenerator:
    """Same `generate` signature and `RolloutOutput` as `PackedGenerator`, via `policy.generate`."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        config = policy.config
        eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))

    @classmethod
    def from_model(cls, policy: nn.Module, **_ignored) -> "PolicyGenerator":
        return cls(policy)

    def sync_from(self, policy: nn.Module) -> None:
        """Nothing to copy: this backend samples with the policy object itself."""
        self.policy = policy

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        return_logprobs: bool = True,
    ) -> RolloutOutput:
        """See `PackedGenerator.generate`. Prompts are left-padded for transformers internally."""
        prompts = checked_request(input_ids, max_new_tokens, temperature, top_k, top_p)
        dev, pad = self.device, self.pad_token_id
        stops = self.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        batch, width = len(prompts), max(len(p) for p in prompts)
        left = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        right = torch.full((batch, width), pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            left[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
            right[i, : len(p)] = torch.tensor(p)
        greedy = temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else top_k,
            top_p=None if greedy else top_p,
            eos_token_id=list(stops) if stops else None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
        )
        rng = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.policy.generate(input_ids=left.to(dev), attention_mask=mask.to(dev), generation_config=config)

        completion = out.sequences[:, width:]
        steps = completion.shape[1]
        is_stop = torch.isin(completion, torch.tensor(stops, dtype=torch.long, device=dev)) if stops else torch.zeros_like(completion, dtype=torch.bool)
        first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), torch.full((batch,), steps, device=dev))
        stopped = is_stop.any(1)
        lengths = torch.where(stopped, first_stop + 1, torch.full_like(first_stop, steps)).long()
        valid = torch.arange(steps, device=dev)[None, :] < lengths[:, None]
        completion = torch.where(valid, completion, pad)
        logprobs = torch.zeros(completion.shape, dtype=torch.float32, device=dev)
        logprobs_t1 = torch.zeros_like(logprobs)
        if return_logprobs and steps:
            raw = torch.stack(out.logits, 1).float()
            logprobs_t1 = raw.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
            if not greedy:
                processed = torch.stack(out.scores, 1).float()
                logprobs = processed.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
            logprobs = torch.where(valid, logprobs, 0.0)
            logprobs_t1 = torch.where(valid, logprobs_t1, 0.0)
        width_out = int(lengths.max()) if batch else 0
        return RolloutOutput(
            prompt_ids=right.to(dev),
            prompt_lengths=torch.tensor([len(p) for p in prompts], device=dev),
            completion_ids=completion[:, :width_out],
            logprobs=logprobs[:, :width_out],
            logprobs_t1=logprobs_t1[:, :width_out],
            lengths=lengths,
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            pad_token_id=pad,
        )
