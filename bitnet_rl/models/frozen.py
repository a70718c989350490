"""Frozen ternary copies: the reference policy (DPO, PPO) and frozen reward models, at 2 bits a weight.

A frozen model never needs master weights: each BitLinear becomes a `PackedTernaryLinear`
holding 2-bit codes (transformers' packed layout) and its scales, and computes what the
BitLinear computed at λ = 1. Embeddings, norms and heads stay as they were. For the 2B4T
shape this keeps the reference at ~0.5 GB of projections instead of a second 4.8 GB bf16 copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, dequantize_codes, quantize_activation
from bitnet_rl.quant.pack import pack_hf, unpack_hf


class PackedTernaryLinear(nn.Module):
    """A frozen BitLinear at λ = 1: packed 2-bit codes + float32 inverse scales; unpacks per forward."""

    def __init__(self, bit: BitLinear) -> None:
        super().__init__()
        codes, scale = bit.ternary_codes()
        self.in_features, self.out_features = bit.in_features, bit.out_features
        self.group_size = bit.group_size
        self.quantize_activations = bit.quantize_activations
        self.register_buffer("packed", pack_hf(codes))
        self.register_buffer("inv_scale", scale.float())
        self.register_buffer("bias", None if bit.bias is None else bit.bias.detach().clone())
        self.compute_dtype = bit.weight.dtype

    def weight(self) -> torch.Tensor:
        codes = unpack_hf(self.packed, self.out_features, dtype=torch.float32)
        return dequantize_codes(codes, self.inv_scale, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            x = quantize_activation(x)
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2-bit"


@torch.no_grad()
def frozen_ternary_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `model` with every BitLinear replaced by a `PackedTernaryLinear`.

    The BitLinear modules are swapped out while the rest is deep-copied, so no second set of
    master weights is ever materialized.
    """
    packed = {name: PackedTernaryLinear(module) for name, module in bitlinear_modules(model)}
    originals = {name: model.get_submodule(name) for name in packed}
    for name in packed:
        model.set_submodule(name, nn.Identity())
    try:
        frozen = copy.deepcopy(model)
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
    for name, module in packed.items():
        frozen.set_submodule(name, module)
    frozen.requires_grad_(False)
    return frozen.eval()
