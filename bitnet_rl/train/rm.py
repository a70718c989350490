"""Bradley-Terry reward-model training: a scalar head on a BitNet (or any HF) backbone.

Loss `-log σ(r(chosen) − r(rejected))` on preference pairs, with BitLinear and the λ schedule
like the policy, on the shared loop (see `train/sft.py` for why not TRL's trainer: the same
λ, checkpoint and resume machinery, and TRL's RewardTrainer pools scores by pad id). The saved
directory is what `--reward DIR` takes; it carries `reward_stats.json`, the mean and std of its
scores over its training data, which scoring applies to normalize rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.data.load import load_records
from bitnet_rl.data.prefs import PrefCollator, model_pref_examples
from bitnet_rl.data.sft import train_val_split
from bitnet_rl.data.tokenizer import pad_id
from bitnet_rl.distributed.launch import process_device
from bitnet_rl.distributed.reduce import global_masked_moments
from bitnet_rl.distributed.shards import Shard, process_shard, shard_loader
from bitnet_rl.errors import UserError
from bitnet_rl.models.build import resolve_dtype, resolve_model_dir
from bitnet_rl.models.io import load_tokenizer
from bitnet_rl.models.value import load_scalar_model, sequence_scores
from bitnet_rl.recipe import STAGE_DEFAULTS, Recipe
from bitnet_rl.train.loop import Stage, current_lambda, train
from bitnet_rl.train.rundir import check_run

STATS_FILE = "reward_stats.json"
RM_DEFAULTS = STAGE_DEFAULTS["rm"]  # `bitnet-rl rm` without a recipe (recipe.STAGE_DEFAULTS)


def pair_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected completions `(B,)` each, in one (2B, T) forward."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return sequence_scores(model, ids, attention).chunk(2)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair `-log σ(r_c − r_r)`, `(B,)`."""
    return -F.logsigmoid(chosen - rejected)


def rm_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
    chosen, rejected = pair_scores(model, batch)
    losses = bradley_terry_loss(chosen, rejected)
    stats = {
        "accuracy": (chosen > rejected).float().mean(),
        "margin": (chosen - rejected).detach().mean(),
        "score/chosen": chosen.detach().mean(),
        "score/rejected": rejected.detach().mean(),
    }
    return losses.mean(), stats, int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


@torch.no_grad()
def all_pair_scores(model: nn.Module, examples: list[dict], collate, batch_size: int = 32, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected completions, float32 `(N,)` each, on the CPU: of every
    example in one process, of this rank's share (`distributed.shards`) with several."""
    device = next(model.parameters()).device
    shard = shard or process_shard(device)
    chosen_all, rejected_all = [torch.zeros(0)], [torch.zeros(0)]
    for batch, padding in shard_loader(examples, collate, batch_size, shard, device):
        chosen, rejected = pair_scores(model, batch)
        if not padding:
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
    return torch.cat(chosen_all), torch.cat(rejected_all)


def evaluate_rm(model: nn.Module, examples: list[dict], collate, batch_size: int = 32, shard: Shard | None = None) -> dict[str, float]:
    """Held-out Bradley-Terry loss, accuracy (chosen scored higher) and margin: means over the pairs,
    each rank scoring its share with the sums all-reduced."""
    shard = shard or process_shard(next(model.parameters()).device)
    chosen, rejected = all_pair_scores(model, examples, collate, batch_size, shard=shard)
    sums = [bradley_terry_loss(chosen, rejected).sum(), (chosen > rejected).sum(), (chosen - rejected).sum(), len(chosen)]
    loss, accuracy, margin, count = shard.all_reduce(torch.tensor([float(x) for x in sums], dtype=torch.float64)).tolist()
    count = max(count, 1)
    return {"val_loss": loss / count, "val_accuracy": accuracy / count, "val_margin": margin / count}


def score_stats(model: nn.Module, examples: list[dict], collate, batch_size: int = 32, shard: Shard | None = None) -> dict[str, float]:
    """Mean and (unbiased) std of the model's scores over chosen and rejected completions of
    `examples`, each rank scoring its share (`global_masked_moments` over the ranks)."""
    shard = shard or process_shard(next(model.parameters()).device)
    scores = torch.cat(all_pair_scores(model, examples, collate, batch_size, shard=shard)).double()
    mean, var, count = global_masked_moments(scores, torch.ones_like(scores), shard.all_reduce)
    return {"mean": float(mean), "std": max(float(var.sqrt()), 1e-6), "count": int(count)}


def run_rm(recipe: Recipe, resume: str | None = None, device: str | None = None, overwrite: bool = False) -> Path:
    """Train a reward model on the recipe's preference data; returns its directory (`OUT/final`)."""
    device = device or process_device()  # this worker's GPU under `--num-processes`
    check_run(recipe.out, "rm", resume, overwrite)  # OUT and --resume, before loading anything
    if not recipe.model.path:
        raise UserError("model.path is not set: give --model DIR (an SFT checkpoint or any causal/classifier LM)")
    path = resolve_model_dir(recipe.model.path)
    dtype = resolve_dtype(recipe.model.dtype, device)
    data = recipe.data
    records, fmt = load_records(data, data.path, "prefs", seed=recipe.train.seed)  # a bad --prefs stops here, before the model loads
    model = load_scalar_model(path, quant=recipe.quant, lam=current_lambda(recipe, 0), dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    examples = model_pref_examples(records, fmt, tokenizer, model, data)
    train_examples, val_examples = train_val_split(examples, data.val_fraction, recipe.train.seed)
    collate = PrefCollator(pad_id(tokenizer))

    def final_files(trained: nn.Module):
        stats = score_stats(trained, train_examples, collate)
        return {STATS_FILE: lambda p: p.write_text(json.dumps(stats, indent=2))}

    stage = Stage(
        name="rm",
        model=model,
        tokenizer=tokenizer,
        examples=train_examples,
        collate=collate,
        loss_fn=rm_loss_fn,
        eval_fn=(lambda m: evaluate_rm(m, val_examples, collate)) if val_examples else None,
        final_files=final_files,
    )
    return train(stage, recipe, resume=resume, overwrite=overwrite)
