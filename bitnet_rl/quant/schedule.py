"""λ schedules: how fast quantization is blended in. Pure functions of the step, so resume is exact.

`t = min(step / warmup_steps, 1)`:
- constant:    λ = value
- linear:      λ = t                      (the seed note's min(2·step/T, 1) is warmup_steps = T/2)
- sigmoid:     λ = σ(k·(t − ½)), rescaled so λ(0) = 0 and λ(1) = 1
- exponential: λ = 1 − (1 − t)^k
"""

from __future__ import annotations

import math
from typing import Literal

from bitnet_rl.errors import UserError

ScheduleKind = Literal["constant", "linear", "sigmoid", "exponential"]
SCHEDULES = ("constant", "linear", "sigmoid", "exponential")


def lambda_at(step: int, kind: ScheduleKind = "linear", warmup_steps: int = 1000, k: float = 10.0, value: float = 1.0) -> float:
    """λ at optimizer step `step` (0-based: step 0 is the first update)."""
    if kind == "constant":
        return float(value)
    if kind not in SCHEDULES:
        raise UserError(f"quant.schedule: unknown value {kind!r} (expected one of {', '.join(SCHEDULES)})")
    if warmup_steps <= 0:
        return 1.0
    t = min(max(step, 0) / warmup_steps, 1.0)
    if kind == "linear":
        return t
    if kind == "exponential":
        return 1.0 - (1.0 - t) ** k
    lo, hi = _sigmoid(-k / 2), _sigmoid(k / 2)
    return (_sigmoid(k * (t - 0.5)) - lo) / (hi - lo)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))
