"""Merge a saved adapter (`final/adapter/`, written with `lora.merge: false`) into its base checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.lora.apply import apply_lora, merge_lora
from bitnet_rl.models.io import has_adapter


def require_adapter(checkpoint: str | Path) -> None:
    """One-line error unless `checkpoint` holds `adapter/` (`--merge-lora` asks for one)."""
    if not has_adapter(checkpoint):
        raise UserError(f"--merge-lora: {checkpoint} has no adapter/ (train with lora.merge=false to get one)")


def load_adapter(policy: nn.Module, checkpoint: Path) -> nn.Module:
    """Inject the adapter stored in `checkpoint/adapter/` into `policy` (the checkpoint's base weights)."""
    from safetensors.torch import load_file

    from bitnet_rl.recipe import LoraSettings

    require_adapter(checkpoint)
    folder = Path(checkpoint) / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    settings = LoraSettings(
        enabled=True,
        mode=config.get("bitnet_rl_mode", "post_quant"),
        r=config["r"],
        alpha=config["lora_alpha"],
        target_modules=sorted(config["target_modules"]),
    )
    apply_lora(policy, settings)
    state = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.", f".{part}.default.")
        state[name] = value
    missing, unexpected = policy.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing or unexpected:
        raise UserError(f"--merge-lora: adapter/ does not fit the model (missing {lora_missing[:2]}, unexpected {unexpected[:2]})")
    return policy


def merge_saved_adapter(policy: nn.Module, checkpoint: Path) -> nn.Module:
    """`policy` with `checkpoint/adapter/` merged in (ternary for a pre_quant adapter)."""
    return merge_lora(load_adapter(policy, checkpoint))
