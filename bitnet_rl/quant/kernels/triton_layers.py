"""Triton kernels around the W2A8 matmul for the packed generator (CUDA only, imported lazily).

- `norm_quant`: one program per token row: optional gated activation (`act(gate) · up`),
  optional residual add (written back), optional RMSNorm, then per-token absmax int8
  quantization (codes, `1 / s_x`, Σ codes). The roundings of a bf16 transformers forward are
  replayed (`ROUND_BF16`) so the packed model tracks the policy it was packed from.
- `quantize_rows`: `norm_quant` with nothing but the quantization.
- `decode_attention`: one program per (row, kv head): RoPE on the group's queries and the key
  at the row's own position, the new k/v written into the static cache slot, and an
  online-softmax pass (two small dots per block) over the row's cached positions. No host syncs:
  positions and slots are read from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.kernels.backend import INTERPRET
from bitnet_rl.quant.kernels.triton_gdc import pdl_options, wait_for_previous_kernel

if not INTERPRET:
    from triton.language.extra.cuda import libdevice
else:  # the interpreter has no libdevice; the kernels take the plain-arithmetic path
    libdevice = None

ACTIVATIONS = {"relu2": 0, "silu": 1}


@triton.jit
def _rnd(x, ROUND_BF16: tl.constexpr):
    """Round float32 `x` to the activation dtype (bf16) and back; identity for float32."""
    if ROUND_BF16:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _round_half_even(v, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:  # exact for |v| < 2^22: adding 1.5·2^23 leaves no fraction bits
        r = (v + 12582912.0) - 12582912.0
    return r


@triton.jit
def _norm_quant_kernel(
    in_ptr, stride_in,
    res_ptr, stride_res,
    nw_ptr,
    q_ptr, stride_q, dq_ptr, sum_ptr,
    D, eps,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    src = in_ptr + row * stride_in
    if GATED:
        gate = _rnd(tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
        up = _rnd(tl.load(src + D + offs, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
        if ACT == 0:  # relu²
            r = tl.maximum(gate, 0.0)
            a = _rnd(r * r, ROUND_BF16)
        else:  # silu
            a = _rnd(gate / (1.0 + tl.exp(-gate)), ROUND_BF16)
        a = _rnd(a * up, ROUND_BF16)
    else:
        a = _rnd(tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
    if HAS_RESIDUAL:
        res = res_ptr + row * stride_res + offs
        a = _rnd(tl.load(res, mask=mask, other=0.0).to(tl.float32) + a, ROUND_BF16)
        tl.store(res, a.to(res_ptr.dtype.element_ty), mask=mask)
    if HAS_NORM:
        var = tl.sum(a * a, axis=0) / D
        inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        w = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = _rnd(w * _rnd(a * inv, ROUND_BF16), ROUND_BF16)
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), 1e-5)
    scale = 127.0 * tl.math.div_rn(1.0, amax)  # torch evaluates `127 / t` as `127 · (1 / t)`
    r = _round_half_even(a * scale, USE_LIBDEVICE)
    r = tl.minimum(tl.maximum(r, -128.0), 127.0)
    tl.store(q_ptr + row * stride_q + offs, r.to(tl.int8), mask=mask)
    tl.store(dq_ptr + row, tl.math.div_rn(1.0, scale))
    tl.store(sum_ptr + row, tl.sum(r.to(tl.int32), axis=0))


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def norm_quant(
    inp: torch.Tensor,
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    act_sum: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    act: str = "relu2",
    round_bf16: bool = False,
    pdl: bool = False,
) -> None:
    """Quantize rows of `inp` `(M, D)` (`(M, 2D)` = gate|up when `gated`) into the given outputs
    (`pdl`: launched with programmatic dependent launch where supported)."""
    m = inp.shape[0]
    d = inp.shape[1] // 2 if gated else inp.shape[1]
    block = triton.next_power_of_2(d)
    res = residual if residual is not None else inp
    _norm_quant_kernel[(m,)](
        inp, inp.stride(0),
        res, res.stride(0),
        norm_weight if norm_weight is not None else inp,
        x_int8, x_int8.stride(0), act_dequant, act_sum,
        d, eps,
        GATED=gated,
        ACT=ACTIVATIONS[act],
        HAS_RESIDUAL=residual is not None,
        HAS_NORM=norm_weight is not None,
        ROUND_BF16=round_bf16,
        USE_LIBDEVICE=not INTERPRET,
        BLOCK=block,
        num_warps=_row_warps(block),
        **pdl_options(inp, pdl),
    )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of `x (M, K)`: `(x_int8, act_dequant, act_sum)`, one launch."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    x_int8 = torch.empty((m, k), dtype=torch.int8, device=x.device)
    act_dequant = torch.empty(m, dtype=torch.float32, device=x.device)
    act_sum = torch.empty(m, dtype=torch.int32, device=x.device)
    norm_quant(x, x_int8, act_dequant, act_sum)
    return x_int8, act_dequant, act_sum


@triton.jit
def _rope(ptrs, rot_ptrs, sign, cos, sin, mask, ROUND_BF16: tl.constexpr):
    """transformers' `x·cos + rotate_half(x)·sin`, with its roundings in bf16 when ROUND_BF16."""
    x = _rnd(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), ROUND_BF16)
    x_rot = _rnd(tl.load(rot_ptrs, mask=mask, other=0.0).to(tl.float32), ROUND_BF16) * sign
    return _rnd(_rnd(x * cos, ROUND_BF16) + _rnd(x_rot * sin, ROUND_BF16), ROUND_BF16)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, stride_qkv,
    kc_ptr, vc_ptr, stride_cb, stride_ch, stride_cs,
    slots_ptr, pos_ptr, cos_ptr, sin_ptr,
    out_ptr, stride_out,
    scale,
    N_HEADS: tl.constexpr,
    N_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (row, kv head): the GROUP query heads sharing that kv head are the rows
    of one dot, so each cached key/value is read once per row."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    group: tl.constexpr = N_HEADS // N_KV_HEADS
    slot = tl.load(slots_ptr + row).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int32)

    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    d_rot = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * HEAD_DIM + d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HEAD_DIM + d, mask=d_mask, other=0.0).to(tl.float32)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < group
    heads = kv_head * group + g

    src = qkv_ptr + row.to(tl.int64) * stride_qkv
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_base = src + heads[:, None] * HEAD_DIM
    q = _rope(q_base + d[None, :], q_base + d_rot[None, :], sign[None, :], cos[None, :], sin[None, :], q_mask, ROUND_BF16)
    k_base = src + (N_HEADS + kv_head) * HEAD_DIM
    k = _rope(k_base + d, k_base + d_rot, sign, cos, sin, d_mask, ROUND_BF16)
    v = _rnd(tl.load(src + (N_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM + d, mask=d_mask, other=0.0).to(tl.float32), ROUND_BF16)
    cache_ty = kc_ptr.dtype.element_ty
    q = q.to(cache_ty)
    k = k.to(cache_ty)
    v = v.to(cache_ty)

    k_rows = kc_ptr + slot * stride_cb + kv_head * stride_ch
    v_rows = vc_ptr + slot * stride_cb + kv_head * stride_ch
    tl.store(k_rows + pos * stride_cs + d, k, mask=d_mask)
    tl.store(v_rows + pos * stride_cs + d, v, mask=d_mask)

    m_i = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale  # the new token's own score
    l_i = tl.full((BLOCK_G,), 1.0, dtype=tl.float32)
    acc = tl.broadcast_to(v.to(tl.float32)[None, :], (BLOCK_G, BLOCK_D))
    for start in range(0, pos, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < pos
        tile_mask = n_mask[:, None] & d_mask[None, :]
        keys = tl.load(k_rows + n[:, None] * stride_cs + d[None, :], mask=tile_mask, other=0.0)
        if UPCAST_DOT:  # the interpreter's bf16 dot is wrong: run it in float32 there
            s = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        values = tl.load(v_rows + n[:, None] * stride_cs + d[None, :], mask=tile_mask, other=0.0)
        if UPCAST_DOT:
            pv = tl.dot(p.to(cache_ty).to(tl.float32), values.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(cache_ty), values, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + row.to(tl.int64) * stride_out + heads[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    scale: float,
    round_bf16: bool,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    pdl: bool = False,
) -> None:
    """One decode step of attention for rows `qkv (b, (H + 2·Hkv)·hd)`; caches `(Bmax, Hkv, S, hd)`."""
    b = qkv.shape[0]
    _decode_attention_kernel[(b, n_kv_heads)](
        qkv, qkv.stride(0),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        slots, positions, cos, sin,
        out, out.stride(0),
        scale,
        N_HEADS=n_heads,
        N_KV_HEADS=n_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_G=max(16, triton.next_power_of_2(n_heads // n_kv_heads)),
        BLOCK_N=block_n,
        ROUND_BF16=round_bf16,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        UPCAST_DOT=INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_options(qkv, pdl),
    )
