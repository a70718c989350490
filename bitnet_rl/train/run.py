"""One training run, whatever the stage: the object SFT, DPO, RM and PPO/GRPO all drive.

A stage supplies its step (`StageSteps.step(run) -> record`): SFT/DPO/RM one optimizer step
over `train.grad_accum` micro-batches (`train/loop.py`); PPO/GRPO one iteration of rollout,
experience and `ppo.epochs` × minibatches optimizer steps (`train/ppo.py`). Inside its step a
stage calls `run.set_lambda()` before, and `run.optimizer_step()` for, each optimizer step.
The run owns everything around the steps:

- the accelerator, and the models it trains with their AdamW and LR schedule (`add_model`);
- λ per optimizer step, on every trained model (also set before each stage step, so a rollout
  samples the policy at the λ its first update will use);
- resume: weights, optimizers, LR schedules, RNG, position and the stage's own state; atomic
  checkpoints every `checkpoint.every` stage steps, and `OUT/final` with the stage's extra files;
- metrics (`metrics.jsonl`, accelerate trackers) every `logging.every` stage steps, the progress bar;
- ternary health whenever the optimizer step passes a multiple of `logging.health_every`;
- evaluation every `eval_every` stage steps and after the last (and, if the stage asks, before the first).

Checkpoint layout (unchanged from the stages' own loops): `trainer_state/` holds `optimizer.pt`,
`scheduler.pt`, `rng.pt`, `state.json` (`LoopState`; `extra` holds `iteration`, the stage steps
done, and the stage's own state) and, per extra trained model NAME (PPO's critic),
`NAME_optimizer.pt` and the model itself in `NAME/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bitnet_rl.distributed.collective import all_reduce_max, main_then_wait
from bitnet_rl.distributed.launch import check_strategy, check_worker_env, visible_gpus
from bitnet_rl.distributed.fsdp import check_uniform_dtypes, full_model_state, full_optimizer_state, gathered_params, load_optimizer_state
from bitnet_rl.lora.apply import finish_lora
from bitnet_rl.models.convert import enable_checkpointing
from bitnet_rl.models.forward import compile_decoder_layers
from bitnet_rl.models.io import save_checkpoint
from bitnet_rl.quant.bitlinear import clear_quantized_weights, set_lambda
from bitnet_rl.quant.health import code_snapshot, ternary_health
from bitnet_rl.recipe import CommonSections
from bitnet_rl.train.loop import (
    LoopState,
    MetricsLog,
    build_optimizer,
    build_scheduler,
    current_lambda,
    grad_norm,
    load_rng,
    load_weights,
    make_accelerator,
    save_rng,
)
from bitnet_rl.train.rundir import begin_run, check_not_finished, check_run, load_trainer_file, prune_checkpoints

Evaluate = Callable[[nn.Module], dict[str, float]]


class StageSteps(Protocol):
    """What a stage hands to `Run.train`."""

    command: str  # sft | dpo | rm | ppo: the run's identity, tracker project and progress-bar label
    total: int  # stage steps to run
    total_key: str  # the recipe key that sets `total` (named when a resume has nothing left to do)
    eval_every: int  # evaluate every N stage steps (0: only after the last)
    baseline_eval: bool  # also evaluate before the first step (a starting point for the curves)
    evaluate: Evaluate | None  # unwrapped policy -> held-out metrics, or None

    def begin(self, run: Run) -> None:
        """After resume, before the first step (e.g. a data sampler over `run.state`)."""

    def step(self, run: Run) -> dict[str, Any]:
        """One stage step; returns its metrics record (the run adds `step`, health and evaluation)."""

    def state_dict(self) -> dict[str, Any]:
        """The stage's own state to checkpoint (JSON), beside the run's."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def final_files(self, model: nn.Module) -> dict[str, Callable[[Path], None]]:
        """More files for `OUT/final` (name -> writer)."""

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a record."""


@dataclass
class Trained:
    """A model the run trains: as accelerate prepared it, with its optimizer and (the policy's) LR schedule."""

    name: str  # `policy`, or the trainer_state/ name of an extra model (`critic`)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None


class Run:
    """A training run in `recipe.out` for `command`; see the module docstring for what it owns.

    It reads only the sections every command has (`CommonSections`), so any command's recipe class works."""

    def __init__(self, recipe: CommonSections, command: str) -> None:
        self.recipe, self.command, self.out = recipe, command, Path(recipe.out)
        check_worker_env(recipe.distributed.strategy)  # also in workers a user started with `accelerate launch`
        check_strategy(recipe, command, visible_gpus())
        self.accelerator = make_accelerator(recipe, self.out)
        if self.accelerator.num_processes != recipe.distributed.num_processes:  # e.g. counted by an accelerate config file
            recipe.distributed.num_processes = self.accelerator.num_processes  # recipe.json records what ran
        self.state = LoopState()  # optimizer steps, data position, tokens
        self.iteration = 0  # stage steps done (SFT/DPO/RM: = state.step; PPO: iterations)
        self.trained: list[Trained] = []
        self.tokenizer: Any = None
        self.bar: Any = None
        self._stage: StageSteps | None = None
        self._codes: dict[str, torch.Tensor] | None = None
        self._warned_collapse: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def model(self) -> nn.Module:
        """The policy (the checkpoint's model) as accelerate prepared it."""
        return self.trained[0].model

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ---- setup ---------------------------------------------------------------------------
    def add_model(self, model: nn.Module, tokenizer: Any = None, total_steps: int | None = None, name: str = "policy", lr: float | None = None) -> nn.Module:
        """Train `model` (gradient checkpointing as the recipe says, AdamW, prepared by accelerate); returns it prepared.

        The first model is the policy: the checkpoint's weights, with `tokenizer`, and an LR schedule
        over `total_steps` optimizer steps. A later one (PPO's critic) keeps a constant `lr` and is
        checkpointed in `trainer_state/NAME/`.
        """
        if self.recipe.train.gradient_checkpointing:
            enable_checkpointing(model)
        if self.recipe.train.compile:  # regional torch.compile of the decoder layers (issue 13), every stage and model
            compile_decoder_layers(model)
        if self.recipe.distributed.strategy == "fsdp2":
            check_uniform_dtypes(model)
        optimizer = build_optimizer(model, self.recipe, lr=lr)
        scheduler = build_scheduler(optimizer, self.recipe, total_steps) if not self.trained else None
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if not self.trained:
            self.tokenizer = tokenizer
        self.trained.append(Trained(name, model, optimizer, scheduler))
        return model

    # ---- what a stage calls inside its step -----------------------------------------------
    def set_lambda(self) -> float:
        """Set λ of the coming optimizer step (`state.step`) on every trained model; returns it."""
        lam = current_lambda(self.recipe, self.state.step)
        for trained in self.trained:
            set_lambda(self.accelerator.unwrap_model(trained.model), lam)
        return lam

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step and zero the gradients of every trained model, advance the LR schedule and
        `state.step`. Returns the policy's `grad_norm` (before clipping) and the `lr` it stepped with."""
        max_norm = self.recipe.optimizer.max_grad_norm
        stats: dict[str, float] = {}
        for index, trained in enumerate(self.trained):
            if max_norm > 0:
                norm = self.accelerator.clip_grad_norm_(trained.model.parameters(), max_norm)
            elif index == 0:
                norm = grad_norm(trained.model)
            if index == 0:
                stats = {"grad_norm": float(norm), "lr": trained.scheduler.get_last_lr()[0]}
            trained.optimizer.step()
            clear_quantized_weights(self.accelerator.unwrap_model(trained.model))  # Q(W) once per step, of the new weights
            if trained.scheduler is not None:
                trained.scheduler.step()
            trained.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return stats

    # ---- the run -------------------------------------------------------------------------
    def train(self, stage: StageSteps, resume: str | None = None, overwrite: bool = False) -> Path:
        """Run `stage.total` stage steps (continuing a checkpoint with `resume`); returns `OUT/final`."""
        recipe, acc = self.recipe, self.accelerator
        self._stage = stage
        checkpoint = check_run(self.out, self.command, resume, overwrite)
        torch.manual_seed(recipe.train.seed)  # a resume restores the RNG state it saved
        if checkpoint is not None:
            self._resume(checkpoint, stage)
        main_then_wait(acc, lambda: begin_run(self.out, recipe, self.command, checkpoint, overwrite))
        if acc.is_main_process:
            (self.out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
        metrics = MetricsLog(self.out / "metrics.jsonl", keep_until=self.iteration, accelerator=acc)
        if recipe.logging.report_to:
            acc.init_trackers(self.command)
        with gathered_params(self.unwrapped):  # FSDP2: codes of the full weights
            self._codes = code_snapshot(self.unwrapped) if recipe.logging.health_every else None
        stage.begin(self)
        show = recipe.logging.progress and acc.is_main_process
        self.bar = tqdm(total=stage.total, initial=self.iteration, desc=self.command, disable=not show, dynamic_ncols=True)
        if stage.baseline_eval and stage.evaluate is not None and self.iteration == 0:
            record = {"step": 0, "lambda": self.set_lambda(), **self._evaluate(stage.evaluate)}
            if acc.is_main_process:
                metrics.write(record)
        self.model.train()
        while self.iteration < stage.total:
            steps_before = self.state.step
            self.set_lambda()  # what the stage does before its first optimizer step sees that step's λ
            record = stage.step(self)
            self.iteration += 1
            record = {"step": self.iteration, **record, **self._health(steps_before), **self._memory()}
            last = self.iteration == stage.total
            if stage.evaluate is not None and ((stage.eval_every and self.iteration % stage.eval_every == 0) or last):
                record.update(self._evaluate(stage.evaluate))
            if acc.is_main_process and (self.iteration % recipe.logging.every == 0 or last):
                metrics.write(record)
            self.bar.set_postfix(**stage.postfix(record))
            self.bar.update(1)
            if recipe.checkpoint.every and self.iteration % recipe.checkpoint.every == 0 and not last:
                self.save(self.out / "checkpoints" / f"step-{self.iteration:07d}")
                if acc.is_main_process:
                    prune_checkpoints(self.out / "checkpoints", recipe.checkpoint.keep_last)
        self.bar.close()
        acc.wait_for_everyone()
        final = self.save(self.out / "final")
        if recipe.logging.report_to:
            acc.end_training()
        return final

    def _evaluate(self, evaluate: Evaluate) -> dict[str, float]:
        self.model.eval()
        metrics = evaluate(self.unwrapped)
        self.model.train()
        return metrics

    def _memory(self) -> dict[str, float]:
        """`memory/peak_gib`: the largest CUDA memory any process has allocated so far (verl's
        perf/max_memory_allocated_gb); nothing off CUDA."""
        if self.device.type != "cuda":
            return {}
        return {"memory/peak_gib": all_reduce_max(self.accelerator, torch.cuda.max_memory_allocated(self.device) / 2**30)}

    def _health(self, steps_before: int) -> dict[str, Any]:
        """Ternary health (code fractions, flip rate since the last report) when the optimizer step
        passed a multiple of `logging.health_every` during the last stage step."""
        every = self.recipe.logging.health_every
        if self._codes is None or steps_before // every == self.state.step // every:
            return {}
        with gathered_params(self.unwrapped):
            report = ternary_health(self.unwrapped, previous=self._codes)
        self._codes = report.codes
        record = report.overall()
        new_collapse = set(report.collapsed) - self._warned_collapse
        if new_collapse:
            self._warned_collapse |= new_collapse
            self.bar.write(f"warning: weight collapse (std < 1e-3) in {len(new_collapse)} BitLinear layers, e.g. {sorted(new_collapse)[0]}")
            record["collapsed_layers"] = len(report.collapsed)
        return record

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        """A complete, atomic checkpoint of the run at `path` (`OUT/final` also gets the stage's
        final files and, with LoRA, the merged model or base + adapter/). Every process calls it
        (gathering FSDP2 shards and the final files' forwards are collective); the main one writes,
        and every one returns once the checkpoint is complete."""
        acc = self.accelerator
        # (model state, optimizer state) of each trained model: full tensors, gathered when sharded
        states = [(full_model_state(t.model), full_optimizer_state(t.model, t.optimizer)) for t in self.trained]
        extra: dict[str, Callable[[Path], None]] = {"trainer_state": lambda trainer_dir: self._write_state(trainer_dir, states)}
        if path.name == "final":
            self.model.eval()
            extra.update(self._stage.final_files(self.unwrapped) if self._stage is not None else {})
        if acc.is_main_process:
            if path.name == "final":
                extra.update(finish_lora(self.unwrapped, self.recipe.lora))
            save_checkpoint(self.unwrapped, self.tokenizer, path, extra=extra, state_dict=states[0][0])
        acc.wait_for_everyone()
        return path

    def _write_state(self, trainer_dir: Path, states: list[tuple[dict[str, torch.Tensor] | None, dict[str, Any]]]) -> None:
        trainer_dir.mkdir()
        policy, *others = self.trained
        torch.save(states[0][1], trainer_dir / "optimizer.pt")
        torch.save(policy.scheduler.state_dict(), trainer_dir / "scheduler.pt")
        for trained, (model_state, optimizer_state) in zip(others, states[1:]):
            torch.save(optimizer_state, trainer_dir / f"{trained.name}_optimizer.pt")
            save_checkpoint(self.accelerator.unwrap_model(trained.model), None, trainer_dir / trained.name, kind=trained.name, state_dict=model_state)
        save_rng(trainer_dir / "rng.pt")
        own = self._stage.state_dict() if self._stage is not None else {}
        state = {**asdict(self.state), "extra": {"iteration": self.iteration, **own}}
        (trainer_dir / "state.json").write_text(json.dumps(state))

    def _resume(self, checkpoint: Path, stage: StageSteps) -> None:
        trainer_dir = checkpoint / "trainer_state"
        saved = json.loads((trainer_dir / "state.json").read_text())
        extra = saved.pop("extra", None) or {}
        iteration = int(extra.get("iteration", saved["step"]))  # SFT/DPO/RM checkpoints before the run object: = step
        check_not_finished(checkpoint, iteration, stage.total, key=stage.total_key)
        device = self.device
        load_weights(self.unwrapped, checkpoint)
        policy, *others = self.trained
        load_optimizer_state(policy.model, policy.optimizer, load_trainer_file(trainer_dir / "optimizer.pt", map_location=device, weights_only=True))
        policy.scheduler.load_state_dict(load_trainer_file(trainer_dir / "scheduler.pt", weights_only=True))
        for trained in others:
            load_weights(self.accelerator.unwrap_model(trained.model), trainer_dir / trained.name)
            state = load_trainer_file(trainer_dir / f"{trained.name}_optimizer.pt", map_location=device, weights_only=True)
            load_optimizer_state(trained.model, trained.optimizer, state)
        load_rng(trainer_dir / "rng.pt")
        self.state, self.iteration = LoopState(**saved), iteration
        stage.load_state_dict(extra)
