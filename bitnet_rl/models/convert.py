"""Swap a causal LM's decoder projections for BitLinear, in place, keeping the master weights."""

from __future__ import annotations

import torch.nn as nn

from bitnet_rl.quant.bitlinear import BitLinear, Granularity
from bitnet_rl.recipe import QuantConfig

# Names of the projections BitNet quantizes (Llama/Mistral/Qwen use the same names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_bitlinear(
    model: nn.Module,
    *,
    granularity: Granularity = "per_tensor",
    group_size: int = 128,
    quantize_activations: bool = True,
    lam: float = 1.0,
    projections: tuple[str, ...] = PROJECTIONS,
) -> nn.Module:
    """Replace every `nn.Linear` named in `projections` by a BitLinear sharing its weight.

    Embeddings, norms and `lm_head` stay full precision, as in BitNet b1.58.
    Returns `model` (modified in place).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in projections
    ]
    for name, linear in targets:
        bit = BitLinear.from_linear(
            linear, granularity=granularity, group_size=group_size, quantize_activations=quantize_activations, lam=lam
        )
        model.set_submodule(name, bit)
    return model


def quantize_model(model: nn.Module, quant: QuantConfig, lam: float = 1.0) -> nn.Module:
    """`to_bitlinear` with the settings of a recipe's `quant` section."""
    return to_bitlinear(
        model,
        granularity=quant.granularity,
        group_size=quant.group_size,
        quantize_activations=quant.activations == "int8",
        lam=lam,
    )


def from_bitlinear(model: nn.Module) -> nn.Module:
    """Replace every BitLinear by a plain `nn.Linear` holding the same master weight (for dense baselines)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    for name, bit in targets:
        linear = nn.Linear(bit.in_features, bit.out_features, bias=bit.bias is not None, device="meta")
        linear.weight = bit.weight
        if bit.bias is not None:
            linear.bias = bit.bias
        model.set_submodule(name, linear)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (transformers renamed the method in v5; use whichever exists)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
