"""W2A8 linear: int8 activations × 2-bit ternary weights, int32 accumulation, scales at the end.

    y[m, n] = (Σ_k x_int[m, k] · code[n, k]) · act_dequant[m] · weight_dequant[n (, group)] (+ bias[n])

with `act_dequant = 1 / s_x` (per token, `s_x = 127 / max|x|`) and `weight_dequant = 1 / s` (the
BitLinear inverse scale: per tensor `()`, per channel `(N,)`, per group `(N, K // group_size)`).
The sum is exact in int32, so every implementation agrees bit for bit before scaling.

`w2a8_matmul_ref` is the plain-torch reference (unpack to int8, exact float32 matmul of integer
values below 2^24). `w2a8_matmul` runs the Triton kernels of `triton_w2a8` on CUDA (imported
lazily) and the reference elsewhere; `w2a8_linear` quantizes float activations first.
"""

from __future__ import annotations

import torch

from bitnet_rl.quant.bitlinear import EPS
from bitnet_rl.quant.kernels.backend import triton_available, use_triton
from bitnet_rl.quant.kernels.packed_weight import PackedWeight, concat_packed
from bitnet_rl.quant.pack import kernel_padded_in


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: `(x_int8 (M, K), act_dequant (M,) float32, act_sum (M,) int32)`.

    Same arithmetic as `BitLinear`: `s = 127 / max|x|.clamp(1e-5)`, `x_int = round(x·s).clamp(-128, 127)`,
    `act_dequant = 1 / s`; `act_sum = Σ_k x_int` lets the kernels multiply unsigned codes (code + 1).
    """
    x32 = x.float()
    scale = 127.0 / x32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    x_int = (x32 * scale).round().clamp(-128, 127)
    return x_int.to(torch.int8), (1.0 / scale).squeeze(-1), x_int.sum(-1).to(torch.int32)


def w2a8_matmul_ref(
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor | None,
    weight: PackedWeight,
    *,
    int_only: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference W2A8 product of `x_int8 (M, K)` and `weight (N, K)` → `(M, N)`.

    `int_only=True` returns the exact int32 accumulator `Σ_k x·code` (no scales, no bias).
    The integer product is a float32 matmul of integer values, exact while |sum| < 2^24
    (|x| ≤ 128, so any K < 131072).
    """
    codes = weight.codes().float()
    x = x_int8.float()
    if int_only:
        return (x @ codes.T).to(torch.int32)
    if weight.group_size:
        g = weight.group_size
        m, k = x.shape
        parts = torch.einsum("mgk,ngk->mng", x.view(m, k // g, g), codes.view(weight.out_features, k // g, g))
        y = (parts * weight.dequant).sum(-1) * act_dequant[:, None]
    else:
        acc = x @ codes.T
        dq = weight.dequant if weight.dequant.dim() == 0 else weight.dequant[None, :]
        y = acc * act_dequant[:, None] * dq
    if weight.bias is not None:
        y = y + weight.bias
    return y.to(out_dtype)


def quantize_rows(x: torch.Tensor, *, triton: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_rows_ref` as one Triton kernel on CUDA (no host sync), the reference elsewhere."""
    if use_triton(x, triton):
        from bitnet_rl.quant.kernels import triton_layers

        return triton_layers.quantize_rows(x)
    return quantize_rows_ref(x)


def w2a8_matmul(
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    act_sum: torch.Tensor,
    weight: PackedWeight,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    int_only: bool = False,
    tuner=None,
    triton: bool = True,
) -> torch.Tensor:
    """W2A8 product on pre-quantized activations; Triton on CUDA, `w2a8_matmul_ref` elsewhere.

    `tuner` (a `quant.kernels.tuner.KernelTuner`) supplies tuned tiles; without one the
    heuristic tile of `w2a8_tiles.select_config` runs.
    """
    if use_triton(x_int8, triton):
        from bitnet_rl.quant.kernels import triton_w2a8

        return triton_w2a8.w2a8_matmul(
            x_int8, act_dequant, act_sum, weight, out=out, out_dtype=out_dtype, int_only=int_only, tuner=tuner
        )
    y = w2a8_matmul_ref(x_int8, act_dequant, weight, int_only=int_only, out_dtype=out_dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def w2a8_linear(x: torch.Tensor, weight: PackedWeight, *, tuner=None, triton: bool = True) -> torch.Tensor:
    """`y = x @ Wᵀ (+ b)` for float `x (..., K)` with per-token int8 activations, in `x.dtype`.

    Equals `BitLinear` at λ = 1 up to float rounding of the final scaling.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_int8, act_dequant, act_sum = quantize_rows(x2, triton=triton)
    y = w2a8_matmul(x_int8, act_dequant, act_sum, weight, out_dtype=x.dtype, tuner=tuner, triton=triton)
    return y.view(*lead, weight.out_features)


__all__ = [
    "PackedWeight",
    "concat_packed",
    "kernel_padded_in",
    "quantize_rows",
    "quantize_rows_ref",
    "triton_available",
    "w2a8_linear",
    "w2a8_matmul",
    "w2a8_matmul_ref",
]
