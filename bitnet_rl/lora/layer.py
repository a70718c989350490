"""`PreQuantLoraLinear`: a peft LoRA layer for BitLinear that adds the adapter *before* quantization.

Forward (one BitLinear with master weight `W`, λ, adapters `A: (r, in)`, `B: (out, r)`, scaling `s = α / r`):

    W_a   = W + s·B·A                       (peft's `get_delta_weight`, the very tensor a merge adds)
    W_eff = W_a + λ·(Q(W_a) − W_a)          (straight-through: ∂W_eff/∂W_a = I)
    y     = x_q · W_effᵀ + bias             (x_q: per-token int8 activations, blended by λ as in BitLinear)

so training sees exactly the ternary model it ships. Merging writes `W_a` into the master weight
(peft's `merge`, unchanged), after which the plain BitLinear computes the same `Q(W_a)`, bit for
bit: the merged model's codes and logits equal the adapted model's. Dropout on the LoRA input has
no meaning here (the adapter acts on weights, not activations), so `lora.dropout` must be 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import BitLinear, quantize_weight, ste_blend, ternary_codes


def bitlinear_with_weight(base: BitLinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`base`'s forward with `weight` in place of its master weight (same λ, scales and activations)."""
    if base.lam == 0.0:
        return F.linear(x, weight, base.bias)
    if base.quantize_activations:
        from bitnet_rl.quant.kernels.train import fake_quantize_activation

        x = ste_blend(x, fake_quantize_activation(x), base.lam)
    q = quantize_weight(weight.detach(), base.granularity, base.group_size)
    return F.linear(x, ste_blend(weight, q, base.lam), base.bias)


class PreQuantLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear` whose adapter enters BitLinear's weight before Q (registered as a custom module)."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs: Any) -> None:
        if not isinstance(base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer, BitLinear):
            raise UserError("lora.mode=pre_quant needs BitLinear projections")
        if getattr(config, "lora_dropout", 0.0):
            raise UserError("lora.dropout must be 0 with lora.mode=pre_quant (the adapter changes weights, not activations)")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def adapted_weight(self) -> torch.Tensor:
        """`W + Σ s·B·A` over the active adapters (just `W` when disabled or merged), with gradients to A and B."""
        weight = self.get_base_layer().weight
        if self.disable_adapters or self.merged:
            return weight
        # outside autocast, exactly as peft's merge computes `weight.data += delta` (delta in the adapter's dtype)
        with torch.autocast(weight.device.type, enabled=False):
            for name in self.active_adapters:
                if name in self.lora_A:
                    weight = torch.add(weight, self.get_delta_weight(name)).to(weight.dtype)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise UserError("lora.mode=pre_quant does not support per-sample adapter_names")
        base = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return base(x, *args, **kwargs)
        return bitlinear_with_weight(base, x, self.adapted_weight())

    @torch.no_grad()
    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and inverse scale of `Q(W + s·B·A)`: what this layer computes with at λ = 1."""
        base = self.get_base_layer()
        return ternary_codes(self.adapted_weight(), base.granularity, base.group_size)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.get_base_layer().clear_weight_cache()  # peft merges through `weight.data`, which the cache's key cannot see

    def unmerge(self) -> None:
        super().unmerge()
        self.get_base_layer().clear_weight_cache()  # peft merges through `weight.data`, which the cache's key cannot see
