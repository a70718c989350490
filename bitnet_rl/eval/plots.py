"""PNG plots for the eval report (matplotlib, Agg backend: no display needed).

Three figures: reward distributions of policy vs reference (one panel per reward source),
response-length histograms, and the training curves of the run the checkpoint came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COLORS = {"policy": "tab:blue", "reference": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reward_distributions(rewards: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """Overlaid histograms of each reward source, one panel per source. `rewards[label][source] = (N,)`."""
    plt = _pyplot()
    sources = list(next(iter(rewards.values())).keys())
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.6), squeeze=False)
    for ax, source in zip(axes[0], sources):
        values = {label: r[source].double() for label, r in rewards.items() if source in r}
        low = min(float(v.min()) for v in values.values())
        high = max(float(v.max()) for v in values.values())
        bins = torch.linspace(low, high if high > low else low + 1.0, 31).tolist()
        for label, v in values.items():
            ax.hist(v.tolist(), bins=bins, alpha=0.55, label=f"{label} (mean {float(v.mean()):.3f})", color=COLORS.get(label))
            ax.axvline(float(v.mean()), color=COLORS.get(label), linestyle="--", linewidth=1)
        ax.set_title("weighted sum" if source == "total" else _short(source))
        ax.set_xlabel("reward")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.suptitle("Reward of sampled completions")
    return _save(fig, path)


def length_histograms(lengths: dict[str, list[int]], max_new_tokens: int, path: Path) -> Path:
    """Histograms of completion lengths (tokens) per model; the dotted line is max_new_tokens."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    top = max([max_new_tokens] + [max(v, default=0) for v in lengths.values()])
    step = max(1, (top + 1) // 40)
    bins = [edge - 0.5 * step for edge in range(0, top + 2 * step, step)]  # integer lengths at bin centres
    for label, values in lengths.items():
        mean = sum(values) / max(len(values), 1)
        ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (mean {mean:.1f})", color=COLORS.get(label))
    ax.axvline(max_new_tokens, color="gray", linestyle=":", linewidth=1, label="max_new_tokens")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("samples")
    ax.set_title("Response length")
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(curves: dict[str, dict[str, list[list[float]]]], path: Path, title: str = "Training curves") -> Path:
    """One panel per curve (reward, KL, loss, λ, flip rate), each metric key a line against step."""
    plt = _pyplot()
    names = list(curves)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for key, (steps, values) in curves[name].items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves[name]) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
