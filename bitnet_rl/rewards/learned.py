"""A learned reward model directory as a reward source, frozen at 2 bits a weight.

Scores are normalized with the mean/std the model saw over its training data
(`reward_stats.json`), so a reward of 0 is "as good as the average training completion".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from bitnet_rl.data.batching import right_pad
from bitnet_rl.data.chat import encode_prompt_completion
from bitnet_rl.models.frozen import frozen_ternary_copy, packed_prefill
from bitnet_rl.models.io import load_tokenizer, prompt_format_of
from bitnet_rl.models.value import load_scalar_model, sequence_scores
from bitnet_rl.rewards.base import checked_scores

STATS_FILE = "reward_stats.json"


class LearnedReward:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", normalize: bool = True, batch_size: int = 32) -> None:
        self.name = str(path)
        model = load_scalar_model(path, device="cpu", kinds=("reward_model",))
        self.chat = {"chat": True, "plain": False}.get(prompt_format_of(model))  # as it was trained; None: per pair
        self.model = frozen_ternary_copy(model).to(device)
        del model
        self.tokenizer = load_tokenizer(path)
        self.device, self.batch_size = torch.device(device), batch_size
        stats_file = Path(path) / STATS_FILE
        stats = json.loads(stats_file.read_text()) if normalize and stats_file.is_file() else {"mean": 0.0, "std": 1.0}
        self.mean, self.std = float(stats["mean"]), float(stats["std"])

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt, completion in zip(prompts, completions):
            prompt_ids, completion_ids = encode_prompt_completion(self.tokenizer, prompt, completion, chat=self.chat)
            rows.append(prompt_ids + completion_ids)
        fast = packed_prefill(self.model)  # CUDA: the generator's packed prefill path, all rows at once
        if fast is not None and max((len(r) for r in rows), default=0) > fast.max_positions:
            fast = None
        step = max(len(rows), 1) if fast is not None else self.batch_size
        out = []
        for start in range(0, len(rows), step):
            ids, mask = right_pad(rows[start : start + step], self.tokenizer.pad_token_id)
            if fast is not None:
                out.append(fast.sequence_scores(ids, mask.sum(1)).cpu())
            else:
                out.append(sequence_scores(self.model, ids.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: Sequence[Any], completions: Sequence[str], **meta: Any) -> torch.Tensor:
        scores = (self.raw_scores(prompts, completions) - self.mean) / self.std
        return checked_scores(self.name, scores, len(completions))
