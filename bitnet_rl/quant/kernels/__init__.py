"""W2A8 kernels: int8 activations × 2-bit ternary weights. Triton on CUDA (imported lazily)."""

from bitnet_rl.quant.kernels.w2a8 import (
    PackedWeight,
    concat_packed,
    quantize_rows,
    quantize_rows_ref,
    triton_available,
    w2a8_linear,
    w2a8_matmul,
    w2a8_matmul_ref,
)

__all__ = [
    "PackedWeight",
    "concat_packed",
    "quantize_rows",
    "quantize_rows_ref",
    "triton_available",
    "w2a8_linear",
    "w2a8_matmul",
    "w2a8_matmul_ref",
]
