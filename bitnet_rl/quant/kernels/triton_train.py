"""Triton kernels for BitLinear training: per-token int8 fake quantization in one pass, and the
ternary weight fake quantization given its scale.

`fake_quant_rows(x)` returns `clamp(round(x·s), −128, 127) / s` with `s = 127 / max|x|` per
row, bit for bit what `quant.bitlinear.quantize_activation` computes (float32 arithmetic,
round half to even, torch's `127 / t` as `127 · (1 / t)`), in one read of `x` and one write,
instead of the five elementwise passes and a reduction of the torch version. The output may be
written directly in the autocast dtype, which saves the cast `F.linear` would do next. The
straight-through backward is the identity and needs no kernel.

`ternary_dequant(W, s)` is the elementwise part of `quantize_weight` (`clamp(round(W·s), −1, 1)
/ s`, cast) in one read of `W` and one write in the autocast dtype, instead of seven torch
passes with float32 and int8 temporaries; the absmean scale stays torch's reduction, so the
result is bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.kernels.backend import INTERPRET

if not INTERPRET:
    from triton.language.extra.cuda import libdevice
else:
    libdevice = None


@triton.jit
def _fake_quant_kernel(x_ptr, out_ptr, stride_x, stride_out, D, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-5)
    scale = 127.0 * tl.math.div_rn(1.0, amax)
    v = x * scale
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:  # exact for |v| < 2^22
        r = (v + 12582912.0) - 12582912.0
    r = tl.minimum(tl.maximum(r, -128.0), 127.0)
    q = tl.math.div_rn(r, scale)
    tl.store(out_ptr + row * stride_out + offs, q.to(out_ptr.dtype.element_ty), mask=mask)


def fake_quant_rows(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token absmax int8 fake quantization of `x (..., D)` → `(..., D)` in `out_dtype` (default `x.dtype`)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _fake_quant_kernel[(x2.shape[0],)](
        x2, out, x2.stride(0), out.stride(0), d, USE_LIBDEVICE=not INTERPRET, BLOCK=block,
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
    )
    return out.view(x.shape)


@triton.jit
def _ternary_kernel(w_ptr, s_ptr, out_ptr, n, per_scale, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs // per_scale, mask=mask, other=1.0)
    v = w * s
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:  # exact for |v| < 2^22; larger values clamp to ±1 either way
        r = (v + 12582912.0) - 12582912.0
    r = tl.minimum(tl.maximum(r, -1.0), 1.0)
    tl.store(out_ptr + offs, tl.math.div_rn(r, s).to(out_ptr.dtype.element_ty), mask=mask)


def ternary_dequant(weight: torch.Tensor, scale: torch.Tensor, per_scale: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`clamp(round(W·s), −1, 1) / s` in `out_dtype` (default `weight.dtype`), one read of `W` and one write.

    `scale` (float32) holds one inverse scale per `per_scale` consecutive elements of the
    row-major weight: `numel` (per tensor), `in_features` (per row) or `group_size` (per group).
    Bit for bit `quant.bitlinear.quantize_weight` given the same scale (float32 products, round
    half to even, IEEE division, one rounding to `out_dtype`).
    """
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    s = scale.detach().float().contiguous().view(-1)
    out = torch.empty(w.shape, dtype=out_dtype or w.dtype, device=w.device)
    n = w.numel()
    block = 4096
    _ternary_kernel[(triton.cdiv(n, block),)](w, s, out, n, per_scale, USE_LIBDEVICE=not INTERPRET, BLOCK=block, num_warps=8)
    return out
