"""W2A8 kernels: int8 activations × 2-bit ternary weights. Triton on CUDA (imported lazily).

`backend.use_triton` is the one place that decides whether Triton runs; `packed_weight` holds
the packed format and the one packing path; `tuner.KernelTuner` keeps tuned tiles per owner.
"""

from bitnet_rl.quant.kernels.backend import triton_available, use_triton
from bitnet_rl.quant.kernels.packed_weight import PackedWeight, concat_packed
from bitnet_rl.quant.kernels.tuner import KernelTuner
from bitnet_rl.quant.kernels.w2a8 import quantize_rows, quantize_rows_ref, w2a8_linear, w2a8_matmul, w2a8_matmul_ref

__all__ = [
    "KernelTuner",
    "PackedWeight",
    "concat_packed",
    "quantize_rows",
    "quantize_rows_ref",
    "triton_available",
    "use_triton",
    "w2a8_linear",
    "w2a8_matmul",
    "w2a8_matmul_ref",
]
