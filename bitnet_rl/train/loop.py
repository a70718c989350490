"""The batch step of SFT, DPO and reward-model training, and the parts every run is made of.

A batch-trained stage hands in its examples, a collator and a loss function (`Stage`);
`BatchSteps` turns them into one optimizer step over `train.grad_accum` micro-batches, in a
deterministic, resumable data order, and the run object (`train/run.py`, which PPO drives too)
owns everything around the steps: accelerator, λ per optimizer step, resume, checkpoints,
metrics, progress, ternary health and evaluation. The building blocks it uses live here:
`LoopState`, `MetricsLog`, AdamW and the LR schedule, RNG state, weight loading.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from bitnet_rl.distributed.collective import all_reduce_sum, reduce_step_stats
from bitnet_rl.distributed.fsdp import accelerator_options, load_model_state
from bitnet_rl.distributed.reduce import rank_share
from bitnet_rl.errors import UserError
from bitnet_rl.lora.apply import apply_lora, has_lora
from bitnet_rl.quant.schedule import lambda_at
from bitnet_rl.recipe import Recipe
from bitnet_rl.train.rundir import begin_run, check_not_finished, check_run, find_checkpoint, load_trainer_file, prune_checkpoints  # noqa: F401 (re-exported)

# loss_fn(model, batch) -> (loss to backpropagate, stats to log, tokens in the batch)
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any], int]]
EvalFn = Callable[[nn.Module], dict[str, float]]


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR at `step`: linear warm-up, then cosine / linear decay / constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def current_lambda(recipe: Recipe, step: int) -> float:
    s = recipe.quant.schedule
    return lambda_at(step, s.kind, s.warmup_steps, s.k, s.value)


@dataclass
class LoopState:
    """Where training is; saved with every checkpoint so resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # examples consumed in the current epoch
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class EpochSampler:
    """Deterministic batches: epoch e is a permutation drawn from `seed + e`; resumable by (epoch, cursor)."""

    def __init__(self, n: int, seed: int, state: LoopState) -> None:
        self.n, self.seed, self.state = n, seed, state
        self._order = self._permutation(state.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next(self, size: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < size:
            if self.state.cursor >= self.n:
                self.state.epoch += 1
                self.state.cursor = 0
                self._order = self._permutation(self.state.epoch)
            take = min(size - len(picked), self.n - self.state.cursor)
            picked += self._order[self.state.cursor : self.state.cursor + take]
            self.state.cursor += take
        return picked


class MetricsLog:
    """`OUT/metrics.jsonl`, one JSON object per logged step; truncated to `keep_until` on resume."""

    def __init__(self, path: Path, keep_until: int | None, accelerator=None) -> None:
        self.path = path
        self.accelerator = accelerator
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if keep_until is not None and path.exists():
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= keep_until]
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return  # only the main process writes metrics
        clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=clean.get("step"))


def make_accelerator(recipe: Recipe, out_dir: Path):
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"mixed_precision": recipe.train.mixed_precision, **accelerator_options(recipe)}
    if recipe.logging.report_to:
        kwargs.update(log_with=list(recipe.logging.report_to), project_dir=str(out_dir))
    return Accelerator(**kwargs)


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (`lr` overrides `optimizer.lr`, e.g. for a critic).

    On a CUDA machine the fused kernel is used: one launch per step instead of several per
    parameter group (measured on an H200, 2B4T PPO update: 2.58 s → 2.02 s, benchmarks/ppo_update.py).
    """
    opt = recipe.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.cuda.is_available() or None
    return torch.optim.AdamW(params, lr=opt.lr if lr is None else lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    sched = recipe.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, sched.kind, sched.warmup_steps, total_steps, sched.min_lr_ratio)
    )


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's safetensors into `model` (same architecture), checking every key and shape."""
    from bitnet_rl.models.io import read_weight_files

    state = read_weight_files(checkpoint)
    try:
        missing, unexpected = load_model_state(model, state)
    except RuntimeError as err:  # shape mismatches: name the first one
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise UserError(f"{checkpoint}: weights do not match the model being trained ({detail.rstrip('.')})") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


@dataclass
class Stage:
    """What one batch-trained stage (SFT, DPO, RM) hands to `train`."""

    name: str
    model: nn.Module
    tokenizer: Any
    examples: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: LossFn
    eval_fn: EvalFn | None = None
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)  # e.g. a frozen reference, moved to device
    final_files: Callable[[nn.Module], dict[str, Callable[[Path], None]]] | None = None  # more files for OUT/final
    loss_items: Callable[[dict[str, torch.Tensor]], float] | None = None  # what a mean loss averages over (tokens); ranks rescale by it
    loss_sums: bool = False  # the loss is a sum over the micro-batch: ranks scale it by the process count (DDP averages gradients)


class BatchSteps:
    """The step of SFT, DPO and RM for the run object (`train/run.py`): one optimizer step over
    `train.grad_accum` micro-batches of `train.batch_size` examples, drawn in a deterministic,
    resumable order, with the stage's loss function."""

    baseline_eval = True
    total_key = "train.max_steps"

    def __init__(self, stage: Stage, recipe: Recipe) -> None:
        self.stage, self.recipe = stage, recipe
        self.command, self.total, self.eval_every = stage.name, recipe.train.max_steps, recipe.train.eval_every
        self.evaluate = stage.eval_fn
        self.sampler: EpochSampler | None = None

    def begin(self, run) -> None:
        self.sampler = EpochSampler(len(self.stage.examples), self.recipe.train.seed, run.state)

    def step(self, run) -> dict[str, Any]:
        tcfg, acc, stage = self.recipe.train, run.accelerator, self.stage
        lam = run.set_lambda()
        started = time.perf_counter()
        world, rank = acc.num_processes, acc.process_index
        step_tokens, stats_sum = 0, {}
        for micro in range(tcfg.grad_accum):
            indices = self.sampler.next(tcfg.batch_size * world)[rank::world]
            batch = {k: v.to(acc.device) for k, v in stage.collate([stage.examples[i] for i in indices]).items()}
            sync = micro == tcfg.grad_accum - 1
            with acc.no_sync(run.model) if not sync and world > 1 else nullcontext():
                with acc.autocast():
                    loss, stats, n_tokens = stage.loss_fn(run.model, batch)
                if stage.loss_items is not None and world > 1:  # the global micro-batch's mean, not the mean of ranks' means
                    loss = loss * rank_share(stage.loss_items(batch), world, all_reduce_sum(acc))
                elif stage.loss_sums and world > 1:  # Σ_r S_r over the global micro-batch, as one process sums it (HF Trainer does the same)
                    loss = loss * world
                acc.backward(loss / tcfg.grad_accum)
            step_tokens += n_tokens
            for key, value in {"loss": loss, **stats}.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(torch.as_tensor(value).detach()) / tcfg.grad_accum
        stats_sum, totals = reduce_step_stats(acc, stats_sum, tcfg.batch_size, {"tokens": step_tokens})  # global means
        update = run.optimizer_step()
        run.state.tokens += int(totals["tokens"])
        elapsed = time.perf_counter() - started
        record = {**stats_sum, "lambda": lam, "lr": update["lr"], "grad_norm": update["grad_norm"]}
        record["tokens_per_s"] = totals["tokens"] / max(elapsed, 1e-9)
        record["tokens"] = run.state.tokens
        return record

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def final_files(self, model: nn.Module) -> dict[str, Callable[[Path], None]]:
        return self.stage.final_files(model) if self.stage.final_files is not None else {}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "lam": f"{record['lambda']:.2f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}


def train(stage: Stage, recipe: Recipe, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run `recipe.train.max_steps` optimizer steps of `stage` on the run object; returns `OUT/final`.

    `resume` continues OUT (`latest` or a checkpoint dir); `overwrite` replaces a previous run in OUT.
    """
    from bitnet_rl.train.run import Run

    run = Run(recipe, stage.name)
    tcfg = recipe.train
    if tcfg.epochs is not None:
        per_step = tcfg.batch_size * tcfg.grad_accum * run.accelerator.num_processes
        tcfg.max_steps = max(1, math.ceil(tcfg.epochs * len(stage.examples) / per_step))
    if recipe.lora.enabled and not has_lora(stage.model):  # LoRA: adapters go in before resume, so their weights load too
        apply_lora(stage.model, recipe.lora, seed=tcfg.seed)
    run.add_model(stage.model, stage.tokenizer, total_steps=tcfg.max_steps)
    for module in stage.extra_modules.values():
        module.to(run.device)
    return run.train(BatchSteps(stage, recipe), resume=resume, overwrite=overwrite)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients of `model` (what clipping would report, without clipping)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def save_rng(path: Path) -> None:
    """Python, torch and (when present) CUDA RNG states, so a resumed run draws the same numbers."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.save(rng, path)


def load_rng(path: Path) -> None:
    rng = load_trainer_file(path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if torch.cuda.is_available() and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
