"""The prefill W2A8 GEMM: 2-bit codes unpacked per call, then cuBLAS's int8 tensor-core GEMM.

For many rows (prefill, scoring, frozen log-prob passes) the matmul is compute-bound and the
weight read is a small part of the time, so the fastest exact route is: unpack the 2-bit
codes of this one projection to int8 (one Triton pass, `N·K` bytes, freed after the call),
`torch._int_mm(x_int8, codesᵀ)` (exact int32 sums on the int8 tensor cores, twice the bf16
rate), then one Triton epilogue pass `y = (acc · act_dequant[m]) · weight_dequant[n] + bias[n]`
in the same order as `w2a8_matmul_ref`. The int32 sums equal the decode kernels' bit for bit.
Per-group scales, and shapes cuBLAS rejects (N or K not a multiple of 8, M ≤ 16), stay on the
Triton W2A8 kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.pack import KERNEL_CHUNK, KERNEL_PLANE

INT_MM_MIN_ROWS = 257  # above the decode tuning classes (≤ 256 rows)


def int_mm_ok(m: int, weight) -> bool:
    """Whether `m` rows × `weight` take this path (exact int32 either way)."""
    return m >= INT_MM_MIN_ROWS and not weight.group_size and weight.in_features % 8 == 0 and weight.out_features % 8 == 0


@triton.jit
def _unpack_kernel(w_ptr, out_ptr, K, KB, stride_w, stride_out, BLOCK: tl.constexpr):
    """Packed bytes of one row → int8 codes in {-1, 0, 1}; byte b, plane s → k = 128·(b // 32) + 32·s + b % 32."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + row * stride_w + b, mask=b < KB, other=0)
    k0 = (b // 32) * 128 + (b % 32)
    for s in tl.static_range(4):
        k = k0 + 32 * s
        codes = ((w >> (2 * s)) & 3).to(tl.int8) - 1
        tl.store(out_ptr + row * stride_out + k, codes, mask=(k < K) & (b < KB))


@triton.jit
def _epilogue_kernel(
    acc_ptr, xdq_ptr, wdq_ptr, bias_ptr, y_ptr, M, N, stride_acc, stride_y,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None].to(tl.int64) * stride_acc + offs_n[None, :], mask=mask, other=0)
    x_dq = tl.load(xdq_ptr + offs_m, mask=m_mask, other=0.0)
    if PER_CHANNEL:
        w_dq = tl.load(wdq_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    else:
        w_dq = tl.load(wdq_ptr)
    y = acc.to(tl.float32) * x_dq[:, None] * w_dq
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def unpack_codes(weight) -> torch.Tensor:
    """int8 codes `(N, K)` of a `PackedWeight` (one Triton pass)."""
    n, kb = weight.packed.shape
    out = torch.empty((n, weight.in_features), dtype=torch.int8, device=weight.packed.device)
    block = 256
    _unpack_kernel[(n, triton.cdiv(kb, block))](weight.packed, out, weight.in_features, kb, weight.packed.stride(0), out.stride(0), BLOCK=block)
    return out


def int_mm_matmul(
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    weight,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    int_only: bool = False,
) -> torch.Tensor:
    """`(M, N)` W2A8 product through cuBLAS int8 (see the module docstring); `int_mm_ok` must hold."""
    k = weight.in_features
    x = x_int8[:, :k]
    if not x.is_contiguous():
        x = x.contiguous()
    acc = torch._int_mm(x, unpack_codes(weight).t())
    if int_only:
        return acc if out is None else out.copy_(acc)
    m, n = acc.shape
    y = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=acc.device)
    bias = weight.bias if weight.bias is not None else act_dequant
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 128))
    _epilogue_kernel[grid](
        acc, act_dequant, weight.dequant, bias, y, m, n, acc.stride(0), y.stride(0),
        PER_CHANNEL=weight.dequant.dim() == 1, HAS_BIAS=weight.bias is not None, BLOCK_M=64, BLOCK_N=128, num_warps=8,
    )
    return y


assert KERNEL_CHUNK == 128 and KERNEL_PLANE == 32  # the layout the unpack kernel reads
