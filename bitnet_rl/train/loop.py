"""The optimizer loop shared by SFT, DPO and reward-model training, on accelerate.

A stage hands in its examples, a collator and a loss function; the loop owns everything
around them: the λ schedule (set before every optimizer step), AdamW and the LR schedule,
deterministic data order, gradient accumulation and clipping, ternary health, metrics
(`metrics.jsonl`, progress bar, accelerate trackers) and atomic, exactly resumable checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bitnet_rl.distributed.collective import all_reduce_sum, main_then_wait, reduce_step_stats
from bitnet_rl.distributed.fsdp import accelerator_options, check_uniform_dtypes, full_model_state, full_optimizer_state, gathered_params, load_model_state, load_optimizer_state
from bitnet_rl.distributed.reduce import rank_share
from bitnet_rl.errors import UserError
from bitnet_rl.lora.apply import apply_lora, finish_lora, has_lora
from bitnet_rl.models.convert import enable_checkpointing
from bitnet_rl.models.io import save_checkpoint
from bitnet_rl.quant.bitlinear import set_lambda
from bitnet_rl.quant.health import code_snapshot, ternary_health
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
        if accelerator is not None and not accelerator.is_main_process:
            return  # only the main process writes metrics
        lines = []
        if keep_until is not None and path.exists():
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= keep_until]
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict[str, Any]) -> None:
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
    """What one training stage hands to the loop."""

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


def train(stage: Stage, recipe: Recipe, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run `recipe.train.max_steps` optimizer steps; returns the final model directory `OUT/final`.

    `resume` continues OUT (`latest` or a checkpoint dir); `overwrite` replaces a previous run in OUT.
    """
    out_dir = Path(recipe.out)
    checkpoint = check_run(out_dir, stage.name, resume, overwrite)
    accelerator = make_accelerator(recipe, out_dir)
    model, tcfg = stage.model, recipe.train
    if tcfg.epochs is not None:
        per_step = tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes
        tcfg.max_steps = max(1, math.ceil(tcfg.epochs * len(stage.examples) / per_step))
    state = LoopState()
    if recipe.lora.enabled and not has_lora(model):  # LoRA: adapters go in before resume, so their weights load too
        apply_lora(model, recipe.lora, seed=tcfg.seed)
    if checkpoint is not None:
        state = LoopState(**json.loads((checkpoint / "trainer_state" / "state.json").read_text()))
        check_not_finished(checkpoint, state.step, tcfg.max_steps)
        load_weights(model, checkpoint)
    main_then_wait(accelerator, lambda: begin_run(out_dir, recipe, stage.name, checkpoint, overwrite))
    if recipe.distributed.strategy == "fsdp2":
        check_uniform_dtypes(model)
    if tcfg.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, tcfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    for module in stage.extra_modules.values():
        module.to(accelerator.device)
    torch.manual_seed(tcfg.seed)
    if checkpoint is not None:
        trainer_dir = checkpoint / "trainer_state"
        load_optimizer_state(model, optimizer, load_trainer_file(trainer_dir / "optimizer.pt", map_location=accelerator.device, weights_only=True))
        scheduler.load_state_dict(load_trainer_file(trainer_dir / "scheduler.pt", weights_only=True))
        load_rng(trainer_dir / "rng.pt")
    if accelerator.is_main_process:
        (out_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))

    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_until=state.step, accelerator=accelerator)
    if recipe.logging.report_to:
        accelerator.init_trackers(stage.name)
    sampler = EpochSampler(len(stage.examples), tcfg.seed, state)
    world, rank = accelerator.num_processes, accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    with gathered_params(unwrapped):
        snapshot = code_snapshot(unwrapped) if recipe.logging.health_every else None
    warned_collapse: set[str] = set()
    bar = tqdm(
        total=tcfg.max_steps,
        initial=state.step,
        desc=stage.name,
        disable=not recipe.logging.progress or not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    if stage.eval_fn is not None and state.step == 0:  # a baseline point for the validation curves
        set_lambda(unwrapped, current_lambda(recipe, 0))
        model.eval()
        baseline = {"step": 0, "lambda": current_lambda(recipe, 0), **stage.eval_fn(unwrapped)}
        if accelerator.is_main_process:
            metrics.write(baseline)
    model.train()
    while state.step < tcfg.max_steps:
        lam = current_lambda(recipe, state.step)
        set_lambda(unwrapped, lam)
        started = time.perf_counter()
        step_tokens, stats_sum = 0, {}
        for micro in range(tcfg.grad_accum):
            indices = sampler.next(tcfg.batch_size * world)[rank::world]
            batch = {k: v.to(accelerator.device) for k, v in stage.collate([stage.examples[i] for i in indices]).items()}
            sync = micro == tcfg.grad_accum - 1
            with accelerator.no_sync(model) if not sync and world > 1 else nullcontext():
                with accelerator.autocast():
                    loss, stats, n_tokens = stage.loss_fn(model, batch)
                if stage.loss_items is not None and world > 1:  # the global micro-batch's mean, not the mean of ranks' means
                    loss = loss * rank_share(stage.loss_items(batch), world, all_reduce_sum(accelerator))
                accelerator.backward(loss / tcfg.grad_accum)
            step_tokens += n_tokens
            for key, value in {"loss": loss, **stats}.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(torch.as_tensor(value).detach()) / tcfg.grad_accum
        stats_sum, totals = reduce_step_stats(accelerator, stats_sum, tcfg.batch_size, {"tokens": step_tokens})  # global means
        grad_norm = (
            accelerator.clip_grad_norm_(model.parameters(), recipe.optimizer.max_grad_norm)
            if recipe.optimizer.max_grad_norm > 0
            else _grad_norm(model)
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += int(totals["tokens"])
        elapsed = time.perf_counter() - started
        record = {"step": state.step, **stats_sum, "lambda": lam, "lr": lr, "grad_norm": float(grad_norm)}
        record["tokens_per_s"] = totals["tokens"] / max(elapsed, 1e-9)
        record["tokens"] = state.tokens
        if snapshot is not None and state.step % recipe.logging.health_every == 0:
            with gathered_params(unwrapped):
                report = ternary_health(unwrapped, previous=snapshot)
            snapshot = report.codes
            record.update(report.overall())
            new_collapse = set(report.collapsed) - warned_collapse
            if new_collapse:
                warned_collapse |= new_collapse
                bar.write(f"warning: weight collapse (std < 1e-3) in {len(new_collapse)} BitLinear layers, e.g. {sorted(new_collapse)[0]}")
                record["collapsed_layers"] = len(report.collapsed)
        last = state.step == tcfg.max_steps
        if stage.eval_fn is not None and ((tcfg.eval_every and state.step % tcfg.eval_every == 0) or last):
            model.eval()
            record.update(stage.eval_fn(unwrapped))
            model.train()
        if state.step % recipe.logging.every == 0 or last:
            if accelerator.is_main_process:
                metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lam=f"{lam:.2f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if recipe.checkpoint.every and state.step % recipe.checkpoint.every == 0 and not last:
            _save_step_checkpoint(accelerator, unwrapped, stage.tokenizer, optimizer, scheduler, state, out_dir, recipe)
    bar.close()
    accelerator.wait_for_everyone()
    final = out_dir / "final"
    full_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)  # collective under FSDP2
    model.eval()
    files = stage.final_files(unwrapped) if stage.final_files is not None else {}  # every rank: forwards are collective under FSDP2
    if accelerator.is_main_process:
        extra = {"trainer_state": _state_writer(optimizer_state, scheduler, state), **files}
        extra.update(finish_lora(unwrapped, recipe.lora))  # merged ternary model, or base + adapter/
        save_checkpoint(unwrapped, stage.tokenizer, final, extra=extra, state_dict=full_state)
    accelerator.wait_for_everyone()  # every rank returns once final/ is complete
    if recipe.logging.report_to:
        accelerator.end_training()
    return final


def _grad_norm(model: nn.Module) -> torch.Tensor:
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


def _state_writer(optimizer_state: dict[str, Any], scheduler, state: LoopState) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.mkdir()
        torch.save(optimizer_state, path / "optimizer.pt")
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
        save_rng(path / "rng.pt")
        (path / "state.json").write_text(json.dumps(asdict(state)))

    return write


def _save_step_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, state, out_dir: Path, recipe: Recipe) -> None:
    full_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)  # collective under FSDP2
    if not accelerator.is_main_process:
        return
    root = out_dir / "checkpoints"
    save_checkpoint(model, tokenizer, root / f"step-{state.step:07d}", extra={"trainer_state": _state_writer(optimizer_state, scheduler, state)}, state_dict=full_state)
    prune_checkpoints(root, recipe.checkpoint.keep_last)
