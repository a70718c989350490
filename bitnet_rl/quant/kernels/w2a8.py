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

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from bitnet_rl.quant.bitlinear import EPS
from bitnet_rl.quant.pack import kernel_padded_in, pack_kernel, unpack_kernel


@dataclass
class PackedWeight:
    """A ternary weight in the kernel layout of `quant/pack.py` plus its dequantization scales.

    The dequantized weight is `codes · dequant` with `dequant = 1 / s` broadcast per granularity.
    """

    packed: torch.Tensor  # uint8 (N, kernel_padded_in(K) // 4)
    dequant: torch.Tensor  # float32 () | (N,) | (N, K // group_size)
    in_features: int
    out_features: int
    group_size: int = 0  # > 0 only for per-group scales
    bias: torch.Tensor | None = None  # float32 (N,)

    @property
    def granularity(self) -> str:
        return ("per_tensor", "per_channel", "per_group")[self.dequant.dim()]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, group_size: int = 0, bias: torch.Tensor | None = None) -> "PackedWeight":
        """From int codes `(N, K)` and the BitLinear inverse scale `s` (`()`, `(N, 1)` or `(N, K // g, 1)`)."""
        out_features, in_features = codes.shape
        dequant = (1.0 / scale.float()).reshape(_dequant_shape(scale.dim(), out_features, in_features, group_size))
        return cls(
            packed=pack_kernel(codes),
            dequant=dequant.contiguous(),
            in_features=in_features,
            out_features=out_features,
            group_size=group_size if scale.dim() == 3 else 0,
            bias=None if bias is None else bias.detach().float().clone(),
        )

    @classmethod
    def from_bitlinear(cls, module: nn.Module) -> "PackedWeight":
        """Pack a `BitLinear`'s λ = 1 weight (codes and scale from `module.ternary_codes()`)."""
        codes, scale = module.ternary_codes()
        group = module.group_size if module.granularity == "per_group" else 0
        return cls.from_codes(codes, scale, group, module.bias)

    def codes(self) -> torch.Tensor:
        """The int8 codes `(N, K)`."""
        return unpack_kernel(self.packed, self.in_features)

    def dense(self) -> torch.Tensor:
        """The float32 dequantized weight `(N, K)`."""
        codes = self.codes().float()
        if self.dequant.dim() == 2:
            return (codes.view(self.out_features, -1, self.group_size) * self.dequant[..., None]).view_as(codes)
        return codes * (self.dequant[:, None] if self.dequant.dim() == 1 else self.dequant)

    def to(self, device) -> "PackedWeight":
        return PackedWeight(
            self.packed.to(device), self.dequant.to(device), self.in_features, self.out_features, self.group_size,
            None if self.bias is None else self.bias.to(device),
        )


def _dequant_shape(scale_dim: int, out_features: int, in_features: int, group_size: int) -> tuple[int, ...]:
    """BitLinear scale `()` / `(N, 1)` / `(N, K // g, 1)` → dequant `()` / `(N,)` / `(N, K // g)`."""
    if scale_dim == 0:
        return ()
    if scale_dim == 2:
        return (out_features,)
    return (out_features, in_features // group_size)


def concat_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Stack weights along N (fused q|k|v or gate|up). Per-tensor scales become per-channel."""
    in_features = weights[0].in_features
    group = weights[0].group_size
    if any(w.in_features != in_features or w.group_size != group for w in weights):
        raise ValueError("concat_packed: weights differ in in_features or group size")
    if group:
        dequant = torch.cat([w.dequant for w in weights])
    else:
        dequant = torch.cat([w.dequant.expand(w.out_features) if w.dequant.dim() == 0 else w.dequant for w in weights])
    biases = [w.bias for w in weights]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(w.out_features, device=w.device) for b, w in zip(biases, weights)])
    return PackedWeight(
        packed=torch.cat([w.packed for w in weights]),
        dequant=dequant.contiguous(),
        in_features=in_features,
        out_features=sum(w.out_features for w in weights),
        group_size=group,
        bias=bias,
    )


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


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_rows_ref` as one Triton kernel on CUDA (no host sync), the reference elsewhere."""
    if _use_triton(x):
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
) -> torch.Tensor:
    """W2A8 product on pre-quantized activations; Triton on CUDA, `w2a8_matmul_ref` elsewhere."""
    if _use_triton(x_int8):
        from bitnet_rl.quant.kernels import triton_w2a8

        return triton_w2a8.w2a8_matmul(x_int8, act_dequant, act_sum, weight, out=out, out_dtype=out_dtype, int_only=int_only)
    y = w2a8_matmul_ref(x_int8, act_dequant, weight, int_only=int_only, out_dtype=out_dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def w2a8_linear(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """`y = x @ Wᵀ (+ b)` for float `x (..., K)` with per-token int8 activations, in `x.dtype`.

    Equals `BitLinear` at λ = 1 up to float rounding of the final scaling.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_int8, act_dequant, act_sum = quantize_rows(x2)
    y = w2a8_matmul(x_int8, act_dequant, act_sum, weight, out_dtype=x.dtype)
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
