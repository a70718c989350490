"""A run's `metrics.jsonl` as curves (for plots and reports) and as a one-line summary of its
last values (printed at the end of every training command)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# curve name -> metric keys that feed it, in order of preference (SFT/DPO/RM and PPO spell them differently)
CURVES: dict[str, tuple[str, ...]] = {
    "reward": ("reward", "val_reward", "eval/reward"),
    "KL to reference": ("kl",),
    "loss": ("loss", "loss/policy", "val_loss"),
    "λ": ("lambda",),
    "flip rate": ("flip_rate",),
}
SUMMARY_KEYS = (
    "loss", "val_loss", "val_ppl", "val_accuracy", "val_margin", "reward", "kl", "eos_rate", "lambda", "flip_rate",
)  # fmt: skip


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a metrics file (unreadable lines are skipped)."""
    path = Path(path)
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def curves(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{curve: {metric key: ([steps], [values])}} for every `CURVES` key present in `rows`."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, keys in CURVES.items():
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if _number(row.get(key)) and "step" in row]
            if points:
                out.setdefault(name, {})[key] = [list(p) for p in zip(*points)]
    return out


def last_metrics_line(run_dir: str | Path) -> str:
    """`step N: loss 0.123, val_loss 0.456, ...` from the last logged values of `run_dir/metrics.jsonl`."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return ""
    latest: dict[str, Any] = {}
    for row in rows:
        latest.update({k: v for k, v in row.items() if _number(v)})
    parts = [f"{key} {latest[key]:.4g}" for key in SUMMARY_KEYS if key in latest]
    return f"step {int(latest.get('step', 0))}: " + ", ".join(parts)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
