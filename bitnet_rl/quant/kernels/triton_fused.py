"""Decode GEMV with the activation's norm and int8 quantization in its prologue (M ≤ 4 rows).

`norm_quant` followed by the dp4a GEMV (`triton_w2a8._w2a8_gemv_kernel`) in ONE launch: at
decode batch 1 each of those kernels is launch- and latency-bound (a one-program norm over
2560 values costs as much as a GEMV), so every program of this kernel recomputes the row's
statistics itself from the (L2-resident) input:

1. pass over the row: `a = [act(gate)·up | x] [+ residual]` (bf16 roundings as in
   `triton_layers.norm_quant`), Σ a² → `1 / rms`; program 0 writes `a` to `residual_out`
   when a residual is added (a different buffer than `residual`: other programs still read it);
2. pass: `an = w · (a / rms)` → absmax → `scale = 127 / absmax`;
3. the GEMV: for each 32-bit word of packed weights, the four matching activations are
   recomputed, quantized (`rint(an · scale)`, clamped), packed into one int32 and fed to dp4a;
   their sum Σ codes is accumulated on the way (the `code + 1` storage offset).

The epilogue equals the dp4a kernel's: `(acc − Σ codes) · (1 / scale) · w_dq (+ bias)`. The
weight tile loads do not depend on the prologue, so they are in flight while it runs.

Measured on an H200 (2B4T shapes, M = 1, µs per launch inside a graph, fused vs norm_quant +
tuned GEMV): q|k|v 7.34 vs 7.18, o 6.78 vs 6.60, gate|up 17.72 vs 10.61, down 11.91 vs 9.57.
Every program redoes the row's two reductions and its quantization, which costs more than the
launch it saves; forced on, batch-1 decode went from 1.69 to 1.97 ms per token. So the tuner
(`fused_tuning.py`) times both and keeps this kernel off unless it wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.kernels.triton_layers import ACTIVATIONS, INTERPRET, _rnd, _round_half_even
from bitnet_rl.quant.kernels.triton_w2a8 import DP4A_MAX_M, _dp4a
from bitnet_rl.quant.pack import KERNEL_CHUNK


@triton.jit
def _act(in_ptr, stride_in, res_ptr, stride_res, m, k, mask, D, GATED: tl.constexpr, ACT: tl.constexpr,
         HAS_RES: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The pre-norm activation at rows `m`, columns `k` (broadcast index tensors)."""
    src = in_ptr + m * stride_in + k
    if GATED:
        gate = _rnd(tl.load(src, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
        up = _rnd(tl.load(src + D, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
        if ACT == 0:
            r = tl.maximum(gate, 0.0)
            a = _rnd(r * r, ROUND_BF16)
        else:
            a = _rnd(gate / (1.0 + tl.exp(-gate)), ROUND_BF16)
        a = _rnd(a * up, ROUND_BF16)
    else:
        a = _rnd(tl.load(src, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
    if HAS_RES:
        a = _rnd(tl.load(res_ptr + m * stride_res + k, mask=mask, other=0.0).to(tl.float32) + a, ROUND_BF16)
    return a


@triton.jit
def _fused_gemv_kernel(
    in_ptr, stride_in, res_ptr, stride_res, res_out_ptr, stride_ro, nw_ptr,
    w_ptr, wdq_ptr, bias_ptr, y_ptr,
    M, N, D, KW, stride_wn, stride_ym, eps,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
    ROUND_BF16: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, CHUNK: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    m2 = offs_m[:, None].to(tl.int64)
    m3 = offs_m[:, None, None].to(tl.int64)

    # the first weight tile is requested before the prologue (it does not depend on it)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    w = tl.load(w_rows + offs_w[None, :], mask=n_mask[:, None] & (offs_w < KW)[None, :], other=0)

    # pass 1: Σ a² per row (and the new residual, written once)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, D, CHUNK):
        k = c0 + tl.arange(0, CHUNK)[None, :]
        mask = m_mask[:, None] & (k < D)
        a = tl.where(mask, _act(in_ptr, stride_in, res_ptr, stride_res, m2, k, mask, D, GATED, ACT, HAS_RES, ROUND_BF16), 0.0)
        ss += tl.sum(a * a, axis=1)
        if HAS_RES:
            tl.store(res_out_ptr + m2 * stride_ro + k, a.to(res_out_ptr.dtype.element_ty), mask=mask & (pid == 0))
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(ss / D + eps))

    # pass 2: absmax of the normalized row
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, D, CHUNK):
        k = c0 + tl.arange(0, CHUNK)[None, :]
        mask = m_mask[:, None] & (k < D)
        a = _act(in_ptr, stride_in, res_ptr, stride_res, m2, k, mask, D, GATED, ACT, HAS_RES, ROUND_BF16)
        if HAS_NORM:
            nw = tl.load(nw_ptr + k, mask=k < D, other=0.0).to(tl.float32)
            a = _rnd(nw * _rnd(a * inv[:, None], ROUND_BF16), ROUND_BF16)
        amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(a), 0.0), axis=1))
    scale = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))

    # the GEMV on codes quantized on the fly
    lane = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start in range(0, KW, BLOCK_KW):
        cols = start + offs_w
        c_mask = cols < KW
        if start > 0:
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0)
        word0 = (cols // 8) * 32 + (cols % 8)
        for s in tl.static_range(4):
            k3 = 4 * (word0 + 8 * s)[None, :, None] + lane[None, None, :]
            mask3 = m_mask[:, None, None] & c_mask[None, :, None] & (k3 < D)
            a = _act(in_ptr, stride_in, res_ptr, stride_res, m3, k3, mask3, D, GATED, ACT, HAS_RES, ROUND_BF16)
            if HAS_NORM:
                nw = tl.load(nw_ptr + k3, mask=(k3 < D) & c_mask[None, :, None], other=0.0).to(tl.float32)
                a = _rnd(nw * _rnd(a * inv[:, None, None], ROUND_BF16), ROUND_BF16)
            r = _round_half_even(a * scale[:, None, None], USE_LIBDEVICE)
            r = tl.where(mask3, tl.minimum(tl.maximum(r, -128.0), 127.0), 0.0).to(tl.int32)
            xsum += tl.sum(tl.sum(r, axis=2), axis=1)
            xw = tl.sum((r & 0xFF) << (8 * lane)[None, None, :], axis=2)  # four int8 codes in one word
            codes = (w >> (2 * s)) & 0x03030303
            a_op = tl.broadcast_to(codes[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW))
            b_op = tl.broadcast_to(xw[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW))
            acc = _dp4a(a_op, b_op, acc, USE_ASM)
    total = tl.sum(acc, axis=2) - xsum[:, None]
    x_dq = tl.math.div_rn(1.0, scale)
    if SCALE_MODE == 0:
        out = total.to(tl.float32) * x_dq[:, None] * tl.load(wdq_ptr)
    else:
        w_dq = tl.load(wdq_ptr + offs_n, mask=n_mask, other=0.0)
        out = total.to(tl.float32) * x_dq[:, None] * w_dq[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fused_ok(rows: int, weight) -> bool:
    """Rows and weight this kernel serves: M ≤ 4, K a multiple of 128, no per-group scales."""
    return rows <= DP4A_MAX_M and not weight.group_size and weight.in_features % KERNEL_CHUNK == 0


DEFAULT_TILE = (8, 256, 4)  # (BLOCK_N, BLOCK_KW words, num_warps): one pass over a 2560-wide row


def norm_quant_gemv(
    inp: torch.Tensor,
    weight,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    act: str = "relu2",
    round_bf16: bool = False,
    tile: tuple[int, int, int] | None = None,
    use_asm: bool | None = None,
) -> torch.Tensor:
    """`out = W2A8(quant(norm([act(gate)·up | inp] [+ residual])), weight)`; with `residual`, the
    sum goes to `residual_out` (must not alias `residual`). `inp (M, K)` or `(M, 2K)` when gated;
    `tile` = (BLOCK_N, BLOCK_KW, num_warps), e.g. from `KernelTuner.fused_tile`."""
    m = inp.shape[0]
    d = weight.in_features
    if residual is not None and (residual_out is None or residual_out.data_ptr() == residual.data_ptr()):
        raise ValueError("norm_quant_gemv: residual_out must be a different buffer than residual")
    block_n, block_kw, warps = tile or DEFAULT_TILE
    w_words = weight.packed.view(torch.int32)
    kw = w_words.shape[1]
    if use_asm is None:
        use_asm = inp.is_cuda and not INTERPRET
    res = residual if residual is not None else inp
    res_out = residual_out if residual_out is not None else inp
    _fused_gemv_kernel[(triton.cdiv(weight.out_features, block_n),)](
        inp, inp.stride(0), res, res.stride(0), res_out, res_out.stride(0),
        norm_weight if norm_weight is not None else inp,
        w_words, weight.dequant, weight.bias if weight.bias is not None else weight.dequant, out,
        m, weight.out_features, d, kw, w_words.stride(0), out.stride(0), eps,
        GATED=gated, ACT=ACTIVATIONS[act], HAS_RES=residual is not None, HAS_NORM=norm_weight is not None,
        ROUND_BF16=round_bf16, USE_LIBDEVICE=not INTERPRET, SCALE_MODE=weight.dequant.dim(), HAS_BIAS=weight.bias is not None,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_KW=block_kw, CHUNK=min(2048, triton.next_power_of_2(d)),
        USE_ASM=use_asm, num_warps=warps,
    )
    return out
