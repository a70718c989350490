"""SFT warm-start of a BitNet policy: next-token loss on completion / assistant tokens, λ warm-up.

Our own loop (`train/loop.py`) rather than TRL's `SFTTrainer`: the loop must set λ before
every optimizer step and restore it on resume, write checkpoints that are plain HF
directories (atomic, with `trainer_state/`), aggregate the loss by sum as the BitNet 2B4T
recipe does, and share all of that with DPO and reward-model training. SFTTrainer would need
its `compute_loss`, checkpointing and resume overridden for that, which is most of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.data.load import check_fits_context, choose_chat, load_records, tokenizer_texts
from bitnet_rl.data.prompts import context_length
from bitnet_rl.data.sft import IGNORE_INDEX, SFTCollator, pack_examples, tokenize_sft, train_val_split
from bitnet_rl.data.tokenizer import pad_id
from bitnet_rl.distributed.launch import process_device
from bitnet_rl.distributed.shards import Shard, process_shard, shard_loader
from bitnet_rl.models.build import build_policy
from bitnet_rl.models.io import prompt_format_of, set_prompt_format
from bitnet_rl.recipe import Recipe
from bitnet_rl.train.loop import Stage, current_lambda, train
from bitnet_rl.train.rundir import check_run


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy `(B, T-1)` (float32) and its mask (labels ≠ -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    return losses, (shift_labels != IGNORE_INDEX)


def aggregate(losses: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`mean`: average over trainable tokens; `sum`: their sum (BitNet b1.58 2B4T SFT)."""
    total = (losses * mask).sum()
    return total if how == "sum" else total / mask.sum().clamp(min=1)


def sft_loss_fn(aggregation: str):
    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any], int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        losses, mask = token_losses(logits, batch["labels"])
        n = int(mask.sum())
        token_loss = (losses * mask).sum().detach() / max(n, 1)
        return aggregate(losses, mask, aggregation), {"token_loss": token_loss}, int(batch["attention_mask"].sum())

    return loss_fn


def label_tokens(batch: dict[str, torch.Tensor]) -> float:
    """Tokens the mean loss averages over: shifted labels that are not IGNORE_INDEX."""
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[dict], collate, batch_size: int = 16, shard: Shard | None = None) -> dict[str, float]:
    """Mean next-token loss over all trainable tokens of `examples`, and its perplexity.

    Several processes: each scores its share of the examples (`distributed.shards`) and the
    sums of losses and tokens are all-reduced, so the result is one process's over all of them."""
    device = next(model.parameters()).device
    shard = shard or process_shard(device)
    sums = torch.zeros(2, dtype=torch.float64)  # Σ token losses, Σ tokens
    for batch, padding in shard_loader(examples, collate, batch_size, shard, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        losses, mask = token_losses(logits, batch["labels"])
        if not padding:
            sums += torch.tensor([float((losses * mask).sum()), float(mask.sum())], dtype=torch.float64)
    total, count = shard.all_reduce(sums).tolist()
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def run_sft(recipe: Recipe, resume: str | None = None, device: str | None = None, overwrite: bool = False) -> Path:
    """Train the recipe's policy on its data; returns the final checkpoint directory."""
    device = device or process_device()  # this worker's GPU under `--num-processes`
    check_run(recipe.out, "sft", resume, overwrite)  # OUT and --resume, before loading anything
    data = recipe.data
    records, fmt = load_records(data, data.path, "sft", seed=recipe.train.seed)
    texts = tokenizer_texts(data.path, records)
    model, tokenizer = build_policy(recipe.model, recipe.quant, lam=current_lambda(recipe, 0), device=device, seed=recipe.train.seed, texts=texts)
    chat = choose_chat(data, records, fmt, prompt_format_of(model))
    if chat is not None:
        set_prompt_format(model, "chat" if chat else "plain")
    examples = tokenize_sft(records, tokenizer, fmt, data.max_length, data.train_on_prompt, chat=chat)
    check_fits_context(max(len(e["input_ids"]) for e in examples), context_length(model), data.path)
    train_examples, val_examples = train_val_split(examples, data.val_fraction, recipe.train.seed)
    if data.packing:
        train_examples = pack_examples(train_examples, data.max_length)
    collate = SFTCollator(pad_id(tokenizer))
    stage = Stage(
        name="sft",
        model=model,
        tokenizer=tokenizer,
        examples=train_examples,
        collate=collate,
        loss_fn=sft_loss_fn(recipe.train.loss_aggregation),
        eval_fn=(lambda m: evaluate_loss(m, val_examples, collate)) if val_examples else None,
        loss_items=label_tokens if recipe.train.loss_aggregation == "mean" else None,
        loss_sums=recipe.train.loss_aggregation == "sum",
    )
    return train(stage, recipe, resume=resume, overwrite=overwrite)
