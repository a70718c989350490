"""Fast paths for BitLinear training, with the torch reference everywhere else.

- `fake_quantize_activation(x)`: `quant.bitlinear.quantize_activation` as one Triton kernel on
  CUDA (bit-identical), written in the autocast dtype when autocast is on.
- `fake_quantize_weight(w, ...)`: `quant.bitlinear.quantize_weight` with its elementwise part
  as one Triton kernel on CUDA (bit-identical; the absmean scale stays torch's reduction),
  written in the autocast dtype.
- `QuantizedWeightCache`: the ternary fake-quantized weight computed once per weight update
  instead of once per forward (micro-batches and activation-checkpoint recomputes reuse it).
  Validity is keyed on the parameter's storage and autograd version counter, which every
  in-place update through autograd-visible ops bumps (optimizer steps, `copy_` under
  `no_grad`, `load_state_dict`); writes through `.data` do not, so code that does those must
  call `clear()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitnet_rl.quant.kernels.backend import use_triton


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def fake_quantize_activation(x: torch.Tensor, *, triton: bool = True) -> torch.Tensor:
    """Per-token absmax int8 fake quantization (no gradient; wrap in the STE)."""
    from bitnet_rl.quant.bitlinear import quantize_activation

    if torch.compiler.is_compiling():  # inside torch.compile the torch version is traced and fused
        return quantize_activation(x)
    if use_triton(x, triton) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from bitnet_rl.quant.kernels.triton_train import fake_quant_rows

        return fake_quant_rows(x.detach(), _autocast_dtype(x) or x.dtype)
    return quantize_activation(x)


def fake_quantize_weight(weight: torch.Tensor, granularity: str = "per_tensor", group_size: int = 128, out_dtype: torch.dtype | None = None, *, triton: bool = True) -> torch.Tensor:
    """Absmean ternary fake quantization `Q(W)` in `out_dtype` (default `weight.dtype`), no gradient.

    Equals `quantize_weight(weight, granularity, group_size).to(out_dtype)` bit for bit.
    """
    from bitnet_rl.quant.bitlinear import quantize_weight, weight_scale

    out_dtype = out_dtype or weight.dtype
    if torch.compiler.is_compiling() or not use_triton(weight, triton) or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return quantize_weight(weight, granularity, group_size).to(out_dtype)
    from bitnet_rl.quant.kernels.triton_train import ternary_dequant

    scale = weight_scale(weight, granularity, group_size)
    per_scale = {"per_tensor": weight.numel(), "per_channel": weight.shape[-1]}.get(granularity, group_size)
    return ternary_dequant(weight, scale, max(per_scale, 1), out_dtype)


@dataclass
class QuantizedWeightCache:
    """The last fake-quantized weight of one BitLinear and the key it was computed for."""

    key: tuple | None = None
    value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, compute, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`compute(weight)` cast to `dtype`, recomputed only when `weight` changed since the last call."""
        # inference mode in the key: a Q(W) made under `inference_mode` (rollouts) cannot be saved for backward
        key = (weight.data_ptr(), weight._version, weight.dtype, dtype, weight.device, torch.is_inference_mode_enabled())
        if self.key != key:
            value = compute(weight)
            self.value = value if dtype is None else value.to(dtype)
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None
