"""`prepare`: turn any loaded causal LM into a BitNet b1.58 training model, in place.

This is `models.convert.quantize_model` with a friendlier front door for users who load
their model themselves (e.g. for TRL): `quant` may be a `QuantConfig`, a dict of its keys,
or None (per-tensor absmean weights, int8 activations: the BitNet b1.58 recipe).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.models.convert import quantize_model
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, check_lambda
from bitnet_rl.recipe import QuantConfig, validate


def as_quant_config(quant: QuantConfig | dict[str, Any] | None) -> QuantConfig:
    """A `QuantConfig` from a config, a dict of its keys (validated: unknown keys are errors) or None."""
    if quant is None:
        return QuantConfig()
    if isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, dict):
        return validate(QuantConfig, quant, "prepare(quant=...)")
    raise UserError(f"prepare: quant must be a QuantConfig, a dict or None, got {type(quant).__name__}")


def prepare(model: nn.Module, quant: QuantConfig | dict[str, Any] | None = None, lam: float = 1.0) -> nn.Module:
    """Swap `model`'s q/k/v/o/gate/up/down `nn.Linear` projections for `BitLinear` (shared weights).

    Embeddings, norms and `lm_head` stay full precision. `lam` is the starting λ (a
    `BitNetCallback` then sets it every optimizer step). A model that already has BitLinear
    layers is re-configured (granularity, activations, λ) instead of wrapped twice.
    Returns `model`, modified in place; `save_checkpoint` writes it as a quantized checkpoint.
    """
    config = as_quant_config(quant)
    lam = check_lambda(lam)
    existing = bitlinear_modules(model)
    if existing:
        for _, module in existing:
            _reconfigure(module, config, lam)
        return model
    quantize_model(model, config, lam)
    if not bitlinear_modules(model):
        raise UserError(f"prepare: no q/k/v/o/gate/up/down projections found in {type(model).__name__}")
    return model


def _reconfigure(module: BitLinear, config: QuantConfig, lam: float) -> None:
    if config.granularity == "per_group" and module.in_features % config.group_size:
        raise UserError(f"quant.group_size: {config.group_size} does not divide in_features={module.in_features}")
    module.granularity = config.granularity
    module.group_size = config.group_size
    module.quantize_activations = config.activations == "int8"
    module.lam = lam
