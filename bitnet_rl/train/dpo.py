"""DPO for BitNet policies: preference pairs, a frozen reference, λ schedule and ternary health.

Runs on our shared loop (see `train/sft.py` for why not TRL's trainer) with the loss from
`rl/losses.py`. The reference is the starting policy, frozen, and by default kept as a 2-bit
packed ternary copy (`dpo.reference: ternary`): at λ = 1 that is exactly the starting policy,
and it never needs a second full-precision copy. `precompute` runs the starting policy once
over the data (at its λ of step 0) and keeps only the log-probs; `full` keeps a full copy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bitnet_rl.data.load import load_records, tokenizer_texts
from bitnet_rl.data.prefs import PrefCollator, model_pref_examples
from bitnet_rl.data.sft import train_val_split
from bitnet_rl.data.tokenizer import pad_id
from bitnet_rl.distributed.launch import process_device
from bitnet_rl.distributed.shards import Shard, process_shard, shard_loader
from bitnet_rl.lora.apply import DisabledAdapterView, apply_lora
from bitnet_rl.models.build import build_policy
from bitnet_rl.models.forward import token_logprobs
from bitnet_rl.models.frozen import frozen_ternary_copy
from bitnet_rl.recipe import STAGE_DEFAULTS, DPOConfig, Recipe
from bitnet_rl.rl.losses import dpo_loss, sequence_logps
from bitnet_rl.train.loop import Stage, current_lambda, train
from bitnet_rl.train.rundir import check_run

DPO_DEFAULTS = STAGE_DEFAULTS["dpo"]  # `bitnet-rl dpo` without a recipe (recipe.STAGE_DEFAULTS)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or averaged) completion log-probs of chosen and rejected, in one (2B, T) forward."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    completion = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    logps = sequence_logps(token_logprobs(model, ids, attention), completion[:, 1:], average=average)
    return logps.chunk(2)


class DPOCollator(PrefCollator):
    """`PrefCollator` plus precomputed reference log-probs when the examples carry them."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
        return batch


def dpo_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo_loss_fn(cfg: DPOConfig, reference: nn.Module | None):
    average = cfg.loss_type == "ipo"

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
        chosen_logps, rejected_logps = pair_logps(model, batch, average)
        if reference is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(reference, batch, average)
        else:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing
        )
        stats = dpo_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        loss = losses.mean()
        if cfg.rpo_alpha > 0:  # mean NLL per chosen token (length-averaged logps are already per token)
            chosen_tokens = 1.0 if average else batch["chosen_completion_mask"][:, 1:].sum(dim=1).clamp(min=1)
            nll = -(chosen_logps / chosen_tokens).mean()
            stats["nll/chosen"] = nll.detach()
            loss = loss + cfg.rpo_alpha * nll
        return loss, stats, tokens

    return loss_fn


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: list[dict], collate, average: bool, batch_size: int = 16) -> None:
    """Store the starting policy's log-probs in each example (`ref_chosen_logps`, `ref_rejected_logps`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        chosen, rejected = pair_logps(model, batch, average)
        for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            example["ref_chosen_logps"], example["ref_rejected_logps"] = c, r
    model.train(was_training)


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module, reference: nn.Module | None, examples: list[dict], collate, cfg: DPOConfig, batch_size: int = 16, shard: Shard | None = None
) -> dict[str, float]:
    """Held-out preference accuracy (implicit reward of chosen > rejected), margin and loss: means
    over the pairs. Several processes score their shares and all-reduce the sums (`distributed.shards`)."""
    device = next(model.parameters()).device
    shard = shard or process_shard(device)
    sums = torch.zeros(4, dtype=torch.float64)  # Σ loss·n, Σ margin·n, Σ accuracy·n, Σ n
    loss_fn = dpo_loss_fn(cfg, reference)
    for batch, padding in shard_loader(examples, collate, batch_size, shard, device):
        losses, stats, _ = loss_fn(model, batch)
        if not padding:
            n = batch["chosen_input_ids"].shape[0]
            sums += torch.tensor([float(losses) * n, float(stats["rewards/margin"]) * n, float(stats["rewards/accuracy"]) * n, n], dtype=torch.float64)
    loss, margin, accuracy, count = shard.all_reduce(sums).tolist()
    return {f"val_{key}": value / max(count, 1) for key, value in (("loss", loss), ("margin", margin), ("accuracy", accuracy))}


def make_reference(policy: nn.Module, kind: str) -> nn.Module | None:
    if kind == "ternary":
        return frozen_ternary_copy(policy)
    if kind == "full":
        return copy.deepcopy(policy).requires_grad_(False).eval()
    return None


def lora_base_reference(recipe: Recipe) -> bool:
    return recipe.lora.enabled and recipe.lora.reference == "base"


def run_dpo(recipe: Recipe, resume: str | None = None, device: str | None = None, overwrite: bool = False) -> Path:
    """DPO of the recipe's policy on its preference data; returns the final checkpoint directory."""
    device = device or process_device()  # this worker's GPU under `--num-processes`
    check_run(recipe.out, "dpo", resume, overwrite)  # OUT and --resume, before loading anything
    data, cfg = recipe.data, recipe.dpo
    records, fmt = load_records(data, data.path, "prefs", seed=recipe.train.seed)
    texts = tokenizer_texts(data.path, records)
    model, tokenizer = build_policy(recipe.model, recipe.quant, lam=current_lambda(recipe, 0), device=device, seed=recipe.train.seed, texts=texts)
    examples = model_pref_examples(records, fmt, tokenizer, model, data)
    train_examples, val_examples = train_val_split(examples, data.val_fraction, recipe.train.seed)
    collate = DPOCollator(pad_id(tokenizer))
    reference = make_reference(model, cfg.reference) if not lora_base_reference(recipe) else None
    if recipe.lora.enabled:
        apply_lora(model, recipe.lora, seed=recipe.train.seed)
        if lora_base_reference(recipe):  # the base is the policy with adapters off: no second copy
            reference = DisabledAdapterView(model)
    if reference is None:
        precompute_reference(model, train_examples + val_examples, collate, average=cfg.loss_type == "ipo")
    stage = Stage(
        name="dpo",
        model=model,
        tokenizer=tokenizer,
        examples=train_examples,
        collate=collate,
        loss_fn=dpo_loss_fn(cfg, reference),
        eval_fn=(lambda m: evaluate_pairs(m, reference, val_examples, collate, cfg)) if val_examples else None,
        extra_modules={"reference": reference} if isinstance(reference, nn.Module) else {},
    )
    return train(stage, recipe, resume=resume, overwrite=overwrite)
