"""The packed generator's layer operations: Triton on CUDA, plain torch elsewhere.

Each function writes into preallocated outputs, so the same code runs eagerly, in prefill and
inside a captured CUDA graph. The torch versions replay transformers' own arithmetic (BitNet /
Llama RMSNorm, activations, RoPE in the activation dtype) and are the reference on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitnet_rl.quant.kernels.backend import use_triton
from bitnet_rl.quant.kernels.w2a8 import PackedWeight, quantize_rows_ref, w2a8_matmul

ACT_FNS = {"relu2": lambda x: F.relu(x).square(), "silu": F.silu}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalize in float32, cast back, scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def norm_quant(
    inp: torch.Tensor,
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    act_sum: torch.Tensor,
    *,
    dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    act: str = "relu2",
    triton: bool = True,
    pdl: bool = False,
) -> None:
    """`[act(gate)·up] → [residual += ·] → [RMSNorm] → int8` for each row of `inp`.

    `inp` may be float32 (matmul outputs); it is first rounded to the activation `dtype`.
    With `residual`, the sum is written back into it and normalized. `triton=False` forces the
    torch reference on CUDA (for tests comparing the two); `pdl` launches the Triton kernel with
    programmatic dependent launch where supported.
    """
    if use_triton(inp, triton):
        from bitnet_rl.quant.kernels import triton_layers

        triton_layers.norm_quant(
            inp, x_int8, act_dequant, act_sum, residual=residual, norm_weight=norm_weight, eps=eps,
            gated=gated, act=act, round_bf16=dtype == torch.bfloat16, pdl=pdl,
        )
        return
    a = inp.to(dtype)
    if gated:
        gate, up = a.chunk(2, dim=-1)
        a = ACT_FNS[act](gate) * up
    if residual is not None:
        residual.add_(a)
        a = residual
    if norm_weight is not None:
        a = rms_norm(a, norm_weight, eps)
    q, dq, s = quantize_rows_ref(a)
    x_int8.copy_(q)
    act_dequant.copy_(dq)
    act_sum.copy_(s)


def linear(
    x_int8: torch.Tensor, act_dequant: torch.Tensor, act_sum: torch.Tensor, weight: PackedWeight, out: torch.Tensor, tuner=None
) -> None:
    """`out = W2A8(x_int8, weight)` (float32 `out`, scales and bias applied); tiles from `tuner`."""
    w2a8_matmul(x_int8, act_dequant, act_sum, weight, out=out, tuner=tuner)


# Not fused on purpose. A single Triton kernel doing RMSNorm + int8 quantization in the
# prologue of the dp4a GEMV (M ≤ 4; every program recomputed the row's Σ a² and absmax itself,
# the residual stream ping-ponging between two buffers) was built and measured on an H200 (2B4T
# shapes, M = 1, µs per launch inside a CUDA graph, fused vs norm_quant + tuned GEMV): q|k|v
# 7.34 vs 7.18, o 6.78 vs 6.60, gate|up 17.72 vs 10.61, down 11.91 vs 9.57; forced on, batch-1
# decode went from 1.690 to 1.972 ms per token, and the per-layer timing never picked it there.
# Forced on, greedy tokens on the GPU also differed from the CPU torch reference (its GPU test
# failed), so a GPU where it timed faster would have lost exact greedy decoding. It was removed
# (its code: commits 8a0b5e9 and 0d5a5f9 of branch issue-13d); re-adding it needs a kernel that
# is faster per layer AND a GPU test that greedy tokens equal the CPU reference.
def norm_quant_linear(
    inp: torch.Tensor,
    weight: PackedWeight,
    out: torch.Tensor,
    quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    act: str = "relu2",
    tuner=None,
) -> None:
    """`norm_quant` then `linear`: two launches (`quant` = the int8 scratch `(x_int8, act_dequant,
    act_sum)`, of which the first `weight.in_features` columns are used). With `residual`, the sum
    `residual + ·` is written back into it, as in `norm_quant`."""
    x_int8 = quant[0][:, : weight.in_features]
    pdl = tuner is not None and tuner.pdl_for(inp.shape[0])
    norm_quant(inp, x_int8, quant[1], quant[2], dtype=dtype, residual=residual, norm_weight=norm_weight, eps=eps, gated=gated, act=act, pdl=pdl)
    linear(x_int8, quant[1], quant[2], weight, out, tuner)


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
    dtype: torch.dtype,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    triton: bool = True,
    pdl: bool = False,
) -> None:
    """Attention for one new token per row at its own position `positions[i]` (ragged rows).

    `qkv (b, (H + 2·Hkv)·hd)`; caches `(B_max, Hkv, S, hd)`, row i lives in `slots[i]`. RoPE is
    applied to q and k, the new k/v are written at `positions[i]`, and row i attends to cache
    positions `0 … positions[i]`. `block_n` / `num_warps` / `num_stages` tile the Triton kernel.
    """
    if use_triton(qkv, triton):
        from bitnet_rl.quant.kernels import triton_layers

        triton_layers.decode_attention(
            qkv, k_cache, v_cache, slots, positions, cos, sin, out, n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=head_dim, scale=scale, round_bf16=dtype == torch.bfloat16, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, pdl=pdl,
        )
        return
    b = qkv.shape[0]
    x = qkv.to(dtype)
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q = x[:, :q_end].view(b, n_heads, head_dim)
    k = x[:, q_end:k_end].view(b, n_kv_heads, head_dim)
    v = x[:, k_end:].view(b, n_kv_heads, head_dim)
    pos = positions.long()
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    rows = slots.long()
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    keys, values = k_cache[rows].to(dtype), v_cache[rows].to(dtype)  # (b, Hkv, S, hd)
    group = n_heads // n_kv_heads
    scores = torch.matmul(q.view(b, n_kv_heads, group, head_dim), keys.transpose(-1, -2)) * scale
    visible = torch.arange(keys.shape[2], device=qkv.device)[None, :] <= pos[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.float().softmax(-1).to(dtype)
    out.copy_(torch.matmul(probs, values).reshape(b, n_heads * head_dim))


def prefill_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    *,
    batch: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    scale: float,
    dtype: torch.dtype,
) -> None:
    """Causal attention over right-padded prompts `qkv (batch·P, ·)`, positions 0 … P−1 per row.

    Right padding keeps every real token at its true position, and causality keeps padding out
    of the real tokens' attention; the padding's k/v land in the cache beyond each row's length,
    where decoding overwrites them before any row can see them. Without caches (`None`), no k/v is stored.
    """
    length = qkv.shape[0] // batch
    x = qkv.view(batch, length, -1).to(dtype)
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q = x[..., :q_end].reshape(batch, length, n_heads, head_dim).transpose(1, 2)
    k = x[..., q_end:k_end].reshape(batch, length, n_kv_heads, head_dim).transpose(1, 2)
    v = x[..., k_end:].reshape(batch, length, n_kv_heads, head_dim).transpose(1, 2)
    c, s = cos[:length], sin[:length]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    if k_cache is not None:
        rows = slots.long()
        k_cache[rows, :, :length] = k.to(k_cache.dtype)
        v_cache[rows, :, :length] = v.to(v_cache.dtype)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_heads != n_kv_heads)
    out.copy_(o.transpose(1, 2).reshape(batch * length, n_heads * head_dim))
