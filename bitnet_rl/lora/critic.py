"""The PPO critic as a second LoRA adapter plus a value head on the policy's own (frozen) base weights.

`adapter_critic(policy, settings)` builds a structural copy of the policy's decoder whose every
parameter and buffer *is* the policy's (no weight is copied), puts fresh adapters on it
(`lora.mode` as for the policy) and adds a zero-initialised `score` head: `token_values` reads it
like any `*ForSequenceClassification`. Its checkpoint (`trainer_state/critic/`) holds only the
adapter and the head.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from bitnet_rl.lora.apply import apply_lora, lora_layers


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree whose parameters and buffers are the original tensors (for re-wiring only)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: None if child is None else shared_copy(child) for name, child in module._modules.items()}
    if hasattr(new, "_weight_cache"):
        new._weight_cache = None  # BitLinear: its own Q(W) cache
    return new


class AdapterCritic(nn.Module):
    """Backbone (shared base weights + critic adapters) and a scalar `score` head."""

    base_model_prefix = "model"

    def __init__(self, backbone: nn.Module, config) -> None:
        super().__init__()
        self.model = backbone
        self.config = config
        self.score = nn.Linear(config.hidden_size, 1, bias=False, device=next(backbone.parameters()).device)
        nn.init.zeros_(self.score.weight)

    @staticmethod
    def own(name: str) -> bool:
        """Whether a parameter belongs to the critic (adapter or head), not to the shared base."""
        return "lora_" in name or name.startswith("score.")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous() for name, p in self.named_parameters() if self.own(name)}

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        from bitnet_rl.models.convert import enable_checkpointing

        enable_checkpointing(self.model)

    def save_pretrained(self, path, **kwargs) -> None:
        """What `save_checkpoint` calls: the adapter + head weights and the policy's config."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.cpu() for k, v in self.trainable_state().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), default=str))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adapter + head weights; the shared base weights are the policy's and are not expected."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return _IncompatibleKeys([k for k in result.missing_keys if self.own(k)], result.unexpected_keys)


def adapter_critic(policy: nn.Module, settings, seed: int = 0) -> AdapterCritic:
    """A critic sharing every base weight of `policy` (call before or after the policy's own adapters)."""
    backbone = shared_copy(getattr(policy, policy.base_model_prefix))
    for name, layer in lora_layers(backbone):  # drop the policy's adapters from the copy
        backbone.set_submodule(name, layer.get_base_layer())
    apply_lora(backbone, settings, seed=seed + 1)
    critic = AdapterCritic(backbone, policy.config)
    critic.score.weight.requires_grad_(True)
    return critic
