"""Triton kernel for BitLinear training: per-token int8 fake quantization in one pass.

`fake_quant_rows(x)` returns `clamp(round(x·s), −128, 127) / s` with `s = 127 / max|x|` per
row, bit for bit what `quant.bitlinear.quantize_activation` computes (float32 arithmetic,
round half to even, torch's `127 / t` as `127 · (1 / t)`), in one read of `x` and one write,
instead of the five elementwise passes and a reduction of the torch version. The output may be
written directly in the autocast dtype, which saves the cast `F.linear` would do next. The
straight-through backward is the identity and needs no kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
