"""LoRA in the RL loops: the reference is the base with adapters off, the packed generator syncs adapted weights."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.lora.apply import DisabledAdapterView, LoraSyncedGenerator, apply_lora, merged_view
from bitnet_rl.models.frozen import frozen_ternary_copy


def policy_reference(policy: nn.Module, recipe):
    """Apply `recipe.lora` to `policy` (if enabled) and return the frozen reference to use with it.

    `lora.reference: base` gives a `DisabledAdapterView` (no second copy of any weight); otherwise,
    and without LoRA, the 2-bit packed copy of the starting policy, taken before the adapters exist.
    """
    lora = recipe.lora
    base_reference = lora.enabled and lora.reference == "base"
    reference = None if base_reference else frozen_ternary_copy(policy)
    if lora.enabled:
        apply_lora(policy, lora, seed=recipe.train.seed)
        if base_reference:
            reference = DisabledAdapterView(policy)
    return reference


def lora_generator(make: Callable[[], object], policy: nn.Module):
    """`make()` sees the adapted projections as plain BitLinear; with LoRA, later syncs re-pack them too."""
    from bitnet_rl.lora.layer import PreQuantLoraLinear
    from bitnet_rl.rollout.policy import PolicyGenerator

    layers = [m for m in policy.modules() if hasattr(m, "lora_A")]
    if not layers:
        return make()
    if not all(isinstance(m, PreQuantLoraLinear) for m in layers):
        try:
            return make()  # post_quant: only the policy backend can sample Q(W)·x + s·B·A·x
        except UserError:
            raise UserError("lora.mode=post_quant is not ternary, so rollout.backend=packed cannot sample it; set rollout.backend=policy") from None
    with merged_view(policy):
        generator = make()
    if isinstance(generator, PolicyGenerator):  # samples with the adapted policy itself
        return generator
    return LoraSyncedGenerator(generator)
