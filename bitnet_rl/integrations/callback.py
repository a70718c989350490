"""`BitNetCallback`: the λ schedule and ternary health inside any `transformers.Trainer` (TRL too).

Every optimizer step (`on_step_begin`, before the first micro-batch of the accumulation cycle,
so generation in GRPO/RLOO also sees it) the callback sets λ = `lambda_at(global_step, ...)` on
every BitLinear of the trained model: step 0 is the first update, exactly as in bitnet-rl's
own loop. It also drops each BitLinear's cached Q(W), as bitnet-rl's loop does after every
optimizer step, since under FSDP the cache's key cannot see the update
(`clear_quantized_weights`). Every time the trainer logs, it adds, under the `bitnet/` prefix:
- `bitnet/lambda`: the λ of the update just made (the log's `step` counts updates done, so this
  is `lambda_at(step - 1)`, the same pairing as bitnet-rl's metrics.jsonl);
- `bitnet/frac_neg|frac_zero|frac_pos|mean_scale|weight_std`: ternary health (`quant.health`);
- `bitnet/flip_rate`: share of ternary codes changed since the previous log (or training start);
- `bitnet/collapsed_layers`: number of layers whose master-weight std fell below 1e-3.

The values go into the `logs` dict (seen by the callbacks after this one) and into
`state.log_history`. The trainer runs `report_to` integrations (wandb, tensorboard) before
user callbacks; `attach(trainer)` puts this callback first so they log the keys too.
A reference model the trainer keeps (DPO) is not touched: it stays as it was built.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import bitlinear_modules, clear_quantized_weights, set_lambda
from bitnet_rl.quant.health import code_snapshot, ternary_health
from bitnet_rl.quant.schedule import SCHEDULES, lambda_at

PREFIX = "bitnet/"


class BitNetCallback(TrainerCallback):
    """λ per optimizer step and ternary health in the trainer's logs.

    `kind`, `warmup_steps`, `k`, `value` are `lambda_at`'s arguments (default: constant λ = 1).
    `health=False` logs only λ (health reads every BitLinear's codes once per log).
    """

    def __init__(self, kind: str = "constant", warmup_steps: int = 0, k: float = 10.0, value: float = 1.0, health: bool = True) -> None:
        if kind not in SCHEDULES:
            raise UserError(f"BitNetCallback: unknown schedule {kind!r} (expected one of {', '.join(SCHEDULES)})")
        self.kind, self.warmup_steps, self.k, self.value = kind, int(warmup_steps), float(k), float(value)
        self.health = health
        self.lam: float | None = None  # λ of the most recent update
        self._codes: dict[str, torch.Tensor] | None = None  # code snapshot at the previous log

    @classmethod
    def from_schedule(cls, schedule, health: bool = True) -> "BitNetCallback":
        """From a recipe's `quant.schedule` (a `LambdaSchedule`)."""
        return cls(schedule.kind, schedule.warmup_steps, schedule.k, schedule.value, health=health)

    def lambda_at(self, step: int) -> float:
        return lambda_at(step, self.kind, self.warmup_steps, self.k, self.value)

    def attach(self, trainer):
        """Register as the trainer's first callback (so `report_to` integrations see its keys); returns `trainer`."""
        trainer.callback_handler.callbacks.insert(0, self)
        return trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not bitlinear_modules(model):
            raise UserError("BitNetCallback: the trained model has no BitLinear layers (call bitnet_rl.prepare(model) first)")
        self._set(model, state.global_step)
        if self.health:
            self._codes = code_snapshot(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._set(model, state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or self.lam is None or "loss" not in logs:
            return  # evaluation-only logs carry no training step
        extra = {PREFIX + "lambda": self.lam}
        if self.health:
            report = ternary_health(model, previous=self._codes)
            self._codes = report.codes
            extra.update({PREFIX + key: value for key, value in report.overall().items()})
            extra[PREFIX + "collapsed_layers"] = len(report.collapsed)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _set(self, model, step: int) -> None:
        self.lam = self.lambda_at(step)
        set_lambda(model, self.lam)
        clear_quantized_weights(model)  # Q(W) of the weights this step trains (FSDP refills weights unseen by the cache)
