"""Frozen ternary copies: the reference policy (DPO, PPO) and frozen reward models, at 2 bits a weight.

A frozen model never needs master weights: each BitLinear becomes a `PackedTernaryLinear`
holding its λ = 1 codes in the W2A8 kernel layout (`quant.kernels.PackedWeight`, the same
packing path as the rollout generator) and computes what the BitLinear computed at λ = 1.
Embeddings, norms and heads stay as they were. For the 2B4T shape this keeps the reference at
~0.5 GB of projections instead of a second 4.8 GB bf16 copy.

On CUDA with Triton the projections run on the W2A8 tensor-core GEMM (per-token int8
activations × 2-bit codes, exact int32 sums, scales at the end): the prefill path of the
generator, so scoring and reference log-probs cost int8 matmuls instead of unpacking and
dequantizing every weight per forward. Elsewhere (and with `use_kernels=False`) the plain
torch reference runs: fake-quantized activations times the dequantized weight. The two
agree up to the rounding of the activation dtype (the kernel path skips the bf16 rounding of
the fake-quantized activations and weights, so it is the closer of the two to float32).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, quantize_activation
from bitnet_rl.quant.kernels.backend import use_triton
from bitnet_rl.quant.kernels.packed_weight import KERNEL_GROUP, PackedWeight
from bitnet_rl.quant.kernels.tuner import KernelTuner


class PackedTernaryLinear(nn.Module):
    """A frozen BitLinear at λ = 1: 2-bit codes (kernel layout) + float32 dequantization scales."""

    def __init__(self, bit: BitLinear, tuner: KernelTuner | None = None) -> None:
        super().__init__()
        weight = PackedWeight.from_bitlinear(bit, for_kernels=False)
        self.in_features, self.out_features = bit.in_features, bit.out_features
        self.group_size = weight.group_size
        self.quantize_activations = bit.quantize_activations
        self.register_buffer("packed", weight.packed)
        self.register_buffer("dequant", weight.dequant)
        self.register_buffer("bias", weight.bias)
        self.compute_dtype = bit.weight.dtype
        self.use_kernels = not (weight.group_size and weight.group_size % KERNEL_GROUP)  # else the torch path
        self.tuner = tuner

    @property
    def granularity(self) -> str:
        return ("per_tensor", "per_channel", "per_group")[self.dequant.dim()]

    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.packed, self.dequant, self.in_features, self.out_features, self.group_size, self.bias)

    def weight(self) -> torch.Tensor:
        """The dequantized weight `(N, K)` in the compute dtype (the reference path)."""
        return self.packed_weight().dense().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations and use_triton(x, self.use_kernels):
            from bitnet_rl.quant.kernels.w2a8 import w2a8_linear

            if self.tuner is not None:
                self.tuner.ensure([self.packed_weight()], x.numel() // x.shape[-1])
            return w2a8_linear(x, self.packed_weight(), tuner=self.tuner)
        if self.quantize_activations:
            x = quantize_activation(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2-bit"


def packed_linears(model: nn.Module) -> list[PackedTernaryLinear]:
    return [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Run `model`'s packed projections on the W2A8 kernels (CUDA) or on the torch reference.

    Also switches the whole-model packed prefill path (`packed_prefill`) on or off."""
    for module in packed_linears(model):
        module.use_kernels = enabled and not (module.group_size and module.group_size % KERNEL_GROUP)
    if hasattr(model, "use_packed_prefill"):
        model.use_packed_prefill = enabled


def packed_prefill(model: nn.Module, *, force: bool = False):
    """The `rollout.prefill.PackedPrefill` of a frozen copy, or None where it does not apply.

    It applies to copies made by `frozen_ternary_copy` (with `use_packed_prefill` on) whose
    tensors are on CUDA with Triton (`force=True`: on any device, the torch reference ops, for
    tests) and whose architecture the packed generator supports (BitNet / Llama-style, int8
    activations, kernel-compatible group size). Built on first use and kept on the model; a
    frozen copy never changes, so it never needs re-packing.
    """
    if not getattr(model, "use_packed_prefill", False):
        return None
    if not force and not use_triton(next(model.parameters()), all(m.use_kernels for m in packed_linears(model))):
        return None
    built = model.__dict__.get("_packed_prefill")
    device = next(model.parameters()).device
    if built is None or (built is not False and built.model.device != device):
        from bitnet_rl.errors import UserError
        from bitnet_rl.rollout.prefill import PackedPrefill

        try:
            built = PackedPrefill.from_model(model, autotune=model.kernel_tuner.autotune)
        except UserError:
            built = False  # an architecture the packed forward does not cover: the model's own forward runs
        model.__dict__["_packed_prefill"] = built
    return built or None


@torch.no_grad()
def frozen_ternary_copy(model: nn.Module, *, autotune: bool = True) -> nn.Module:
    """A frozen, eval-mode copy of `model` with every BitLinear replaced by a `PackedTernaryLinear`.

    The BitLinear modules are swapped out while the rest is deep-copied, so no second set of
    master weights is ever materialized. All projections share one `KernelTuner` (owned by the
    copy, reached as `frozen.kernel_tuner`): with `autotune`, the first CUDA forward at a new
    row count times the W2A8 tiles for each projection shape once. Whole-model passes can run on
    the generator's packed prefill forward instead (`packed_prefill(frozen)`).
    """
    tuner = KernelTuner(autotune=autotune)
    packed = {name: PackedTernaryLinear(module, tuner) for name, module in bitlinear_modules(model)}
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
    frozen.kernel_tuner = tuner
    frozen.use_packed_prefill = True  # scoring / log-prob passes on the generator's prefill path (`packed_prefill`)
    return frozen.eval()
