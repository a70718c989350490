"""Triton W2A8 kernels: int8 activations × 2-bit ternary weights (kernel layout of `quant/pack.py`).

`_w2a8_kernel` (tensor cores) serves skinny GEMMs (decode batches > 4) and prefill GEMMs; only
the tile shape changes. (Unpacking the codes per call and running cuBLAS's int8 GEMM instead
was tried for prefill and was 10–30% slower end to end on an H200; see the issue 13 note.) `_w2a8_gemv_kernel` (CUDA cores, dp4a) is the candidate for M ≤ 4.
`tune` times both kinds and keeps the faster per shape (measured on an H100: the dp4a GEMV wins
for most batch-1 shapes, the tensor-core kernel for the fused gate|up).

The tensor-core kernel computes the transposed product `yᵀ = W · xᵀ` ("swap AB"): the weight tile is the dot's
left operand, so the matrix unit's 16-row minimum falls on the weight rows and a batch of one
token wastes only the narrow right operand. Per step the kernel loads a `(BLOCK_N, BLOCK_KB)`
tile of packed bytes, splits each byte into its four bit planes (each plane is 32 contiguous
k values per 32-byte chunk), and issues one int8 dot per plane against the matching
activation columns. Stored values are `code + 1` in {0, 1, 2}; the kernel subtracts the token's
activation sum at the end (per plane for per-group scales), so unpacking is shift + mask only.
On NVIDIA GPUs that is one PTX `shr` + `and` per four codes (inline assembly on packed bytes).

Split-K (grid axis 2) is deterministic: each K slice stores its exact int32 partial sums in a
scratch slab, and the slice that finishes last for a tile adds them up and applies the scales once
(bit-equal to one slice; no atomics on the sums, no zeroing).
Configurations come from `select_config` (a heuristic) or from a `KernelTuner` (`tuner.py`),
which times `candidates` once per shape and remembers the fastest: this module holds no state.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.kernels.backend import INTERPRET
from bitnet_rl.quant.kernels.triton_gdc import pdl_options, wait_for_previous_kernel
from bitnet_rl.quant.kernels.w2a8_tiles import DP4A_MAX_M, Config, select_config
from bitnet_rl.quant.pack import KERNEL_CHUNK



@triton.jit
def _unpack_plane(w, SHIFT: tl.constexpr, USE_ASM: tl.constexpr):
    """Bit plane SHIFT (0..3) of packed bytes `w` as int8 values in {0, 1, 2}."""
    if USE_ASM:
        if SHIFT == 0:
            v = tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
        elif SHIFT == 1:
            v = tl.inline_asm_elementwise(
                "shr.b32 $0, $1, 2;\n\tand.b32 $0, $0, 0x03030303;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4
            )
        elif SHIFT == 2:
            v = tl.inline_asm_elementwise(
                "shr.b32 $0, $1, 4;\n\tand.b32 $0, $0, 0x03030303;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4
            )
        else:
            v = tl.inline_asm_elementwise("shr.b32 $0, $1, 6;\n\tand.b32 $0, $0, 0x03030303;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
    else:
        v = ((w >> (2 * SHIFT)) & 3).to(tl.int8)
    return v


@triton.jit
def _w2a8_kernel(
    x_ptr, xdq_ptr, xsum_ptr,  # int8 (M, >=K), float32 (M,), int32 (M,)
    w_ptr, wdq_ptr, bias_ptr,  # uint8 (N, KB), float32 scales, float32 (N,)
    y_ptr,  # (M, N): float out dtype, int32 when INT_OUT
    sums_ptr, count_ptr,  # SPLIT > 1: int32 slabs (SPLIT, M, N) and zeroed tile counters, left zeroed
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_gn,
    kb_per_split, group_size,
    SCALE_MODE: tl.constexpr,  # 0 per tensor, 1 per channel, 2 per group
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # K slices (grid axis 2)
    FENCE: tl.constexpr,  # inline-PTX fence before a split's counter moves (off only in the interpreter)
    INT_OUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_KB)
    n_mask = offs_n < N
    m_mask = offs_m < M
    kb_lo = pid_k * kb_per_split

    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (kb_lo + offs_b)[None, :]
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    if SCALE_MODE == 2:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)

    for step in range(0, kb_per_split // BLOCK_KB):
        kb = kb_lo + step * BLOCK_KB
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        cols = kb + offs_b
        k_plane0 = (cols // 32) * 128 + (cols % 32)
        for s in tl.static_range(4):
            kk = k_plane0 + 32 * s
            if EVEN_K:
                xt = tl.load(x_rows + kk[:, None], mask=m_mask[None, :], other=0)
            else:
                xt = tl.load(x_rows + kk[:, None], mask=m_mask[None, :] & (kk < K)[:, None], other=0)
            codes = _unpack_plane(w, s, USE_ASM)
            if SCALE_MODE == 2:
                part = tl.dot(codes, xt, out_dtype=tl.int32)
                part = part - tl.sum(xt.to(tl.int32), axis=0)[None, :]
                group = ((kb // 32) * 128 + 32 * s) // group_size
                g_scale = tl.load(wdq_ptr + offs_n * stride_gn + group, mask=n_mask, other=0.0)
                acc += part.to(tl.float32) * g_scale[:, None]
            else:
                acc = tl.dot(codes, xt, acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_KB

    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT > 1:
        # Deterministic split-K: each K slice stores its exact int32 sums in its own slab of the
        # scratch; the slice that finishes last for this tile adds the other slabs to its own,
        # resets the tile's counter and runs the epilogue once: bit-equal to one slice.
        slab = sums_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        plane = M * N  # < SPLIT_SCRATCH (w2a8_tiles): int32 offsets suffice
        tl.store(slab + pid_k * plane, acc, mask=out_mask)
        _fence_gpu(FENCE)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        finished = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if finished == SPLIT - 1:
            for k in tl.static_range(SPLIT):
                if k != pid_k:
                    acc += tl.load(slab + k * plane, mask=out_mask, other=0, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)
            _epilogue(acc, y_ptrs, out_mask, offs_m, offs_n, m_mask, n_mask, xdq_ptr, xsum_ptr, wdq_ptr, bias_ptr, SCALE_MODE, HAS_BIAS, INT_OUT)
    else:
        _epilogue(acc, y_ptrs, out_mask, offs_m, offs_n, m_mask, n_mask, xdq_ptr, xsum_ptr, wdq_ptr, bias_ptr, SCALE_MODE, HAS_BIAS, INT_OUT)


@triton.jit
def _fence_gpu(FENCE: tl.constexpr):
    """`fence.acq_rel.gpu` in every thread: its split-K slab is visible GPU-wide before the tile
    counter moves (not needed in the interpreter, which runs programs one by one)."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [tl.zeros((1,), dtype=tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _epilogue(acc, y_ptrs, out_mask, offs_m, offs_n, m_mask, n_mask, xdq_ptr, xsum_ptr, wdq_ptr, bias_ptr,
              SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    """Store `acc (BLOCK_N, BLOCK_M)` (int32 Σ x·(code+1), or float32 group-scaled sums) as
    `y = (acc − Σx)·s_x·s_w + bias`, or the int32 `acc − Σx` when INT_OUT."""
    if SCALE_MODE != 2:
        acc = acc - tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)[None, :]
    if INT_OUT:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        x_dq = tl.load(xdq_ptr + offs_m, mask=m_mask, other=0.0)
        if SCALE_MODE == 0:
            out = acc.to(tl.float32) * x_dq[None, :] * tl.load(wdq_ptr)
        elif SCALE_MODE == 1:
            w_dq = tl.load(wdq_ptr + offs_n, mask=n_mask, other=0.0)
            out = acc.to(tl.float32) * x_dq[None, :] * w_dq[:, None]
        else:
            out = acc * x_dq[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
        tl.store(y_ptrs, out.to(y_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + Σ over the 4 bytes of unsigned `a` × signed `b` (PTX dp4a; byte arithmetic otherwise)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for byte in tl.static_range(4):
            r += ((a >> (8 * byte)) & 0xFF) * ((b << (24 - 8 * byte)) >> 24)
    return r


@triton.jit
def _gemv_tile(acc, w, x_rows, cols, c_mask, m_mask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, USE_ASM: tl.constexpr):
    """`acc (BLOCK_M, BLOCK_N, BLOCK_KW)` += the dp4a products of weight words `w (BLOCK_N, BLOCK_KW)`
    at word columns `cols` with the matching activation words of the 4 bit planes."""
    x_word0 = (cols // 8) * 32 + (cols % 8)
    for s in tl.static_range(4):
        xw = tl.load(x_rows + (x_word0 + 8 * s)[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0)
        codes = (w >> (2 * s)) & 0x03030303
        a = tl.broadcast_to(codes[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW))
        b = tl.broadcast_to(xw[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW))
        acc = _dp4a(a, b, acc, USE_ASM)
    return acc


@triton.jit
def _w2a8_gemv_kernel(
    x_ptr, xdq_ptr, xsum_ptr,  # int32 words of int8 activations (M, K/4)
    w_ptr, wdq_ptr, bias_ptr,  # int32 words of packed bytes (N, KB/4)
    y_ptr,
    M, N, KW,
    stride_xm, stride_wn, stride_ym,
    SCALE_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INT_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    USE_ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    """Decode GEMV for M ≤ 4 on the CUDA cores: one 32-bit word of packed weights holds four
    bytes = four k values per bit plane; `(w >> 2s) & 0x03030303` yields them as four unsigned
    bytes, and one dp4a multiplies them with the four matching int8 activations (one int32
    word of x: byte lane l of chunk c and plane s is k = 128c + 32s + l, so lanes 4i … 4i+3 are
    4 consecutive k). Three instructions per four weights, no shared memory, no barriers.

    PREFETCH (on with PDL) loads each weight tile one step ahead, the first before waiting on the
    previous kernel: weights are never written while decoding, so that load overlaps the
    previous kernel's tail. (The prefetch without PDL timed 0.99-1.01x on an H200.) The integer
    sums are the same either way.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_KW)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    if PREFETCH:
        w = tl.load(w_rows + offs_w[None, :], mask=n_mask[:, None] & (offs_w < KW)[None, :], other=0)
    wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
    for start in range(0, KW, BLOCK_KW):
        cols = start + offs_w
        c_mask = cols < KW
        if PREFETCH:
            tile = w
            ahead = cols + BLOCK_KW
            w = tl.load(w_rows + ahead[None, :], mask=n_mask[:, None] & (ahead < KW)[None, :], other=0)
        else:
            tile = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0)
        acc = _gemv_tile(acc, tile, x_rows, cols, c_mask, m_mask, BLOCK_M, BLOCK_N, BLOCK_KW, USE_ASM)
    total = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    x_sum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)
    total = total - x_sum[:, None]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if INT_OUT:
        tl.store(y_ptrs, total, mask=out_mask)
    else:
        x_dq = tl.load(xdq_ptr + offs_m, mask=m_mask, other=0.0)
        if SCALE_MODE == 0:
            out = total.to(tl.float32) * x_dq[:, None] * tl.load(wdq_ptr)
        else:
            w_dq = tl.load(wdq_ptr + offs_n, mask=n_mask, other=0.0)
            out = total.to(tl.float32) * x_dq[:, None] * w_dq[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def launch(
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    act_sum: torch.Tensor,
    weight,
    out: torch.Tensor,
    config: Config,
    *,
    int_only: bool = False,
    use_asm: bool | None = None,
    tuner=None,
    pdl: bool | None = None,
    scratch=None,
) -> torch.Tensor:
    """Run the kernel with `config` into `out` `(M, N)`.

    Split-K tiles take their int32 scratch from `scratch` (a `tuner.SplitScratch`), by default
    `tuner.scratch`; without either, one is allocated for this call.

    Inline-PTX unpacking is used unless `use_asm=False` or `tuner.use_asm` is off; if this Triton
    cannot build it, the kernel falls back to plain shifts and switches `tuner.use_asm` off.
    Programmatic dependent launch follows `pdl`, by default `tuner.pdl_for(M)` (off without a tuner).
    """
    m = x_int8.shape[0]
    if pdl is None:
        pdl = tuner is not None and tuner.pdl_for(m)
    n, kb = weight.packed.shape
    mode = weight.dequant.dim()
    if config.kind == "dp4a":
        if _dp4a_ok(x_int8, weight):
            return _launch_dp4a(x_int8, act_dequant, act_sum, weight, out, config, int_only=int_only, use_asm=use_asm, pdl=pdl)
        config = select_config(max(m, DP4A_MAX_M + 1), n, kb, bool(weight.group_size), x_int8.device)
    if use_asm is None:
        use_asm = (tuner is None or tuner.use_asm) and x_int8.is_cuda and not INTERPRET
    if config.split_k > 1 and mode == 2:
        config = dataclasses.replace(config, split_k=1)  # per-group partial sums are not integers
    split = config.split_k > 1
    if x_int8.stride(-1) != 1 or out.stride(-1) != 1 or weight.packed.stride(-1) != 1:
        raise ValueError("w2a8: last dimensions must be contiguous")
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    sums, counts = (out, out)
    if split:
        scratch = scratch if scratch is not None else getattr(tuner, "scratch", None)
        sums, counts = _split_scratch(config.split_k * m * n, grid[0] * grid[1], x_int8.device, scratch)
    bias = weight.bias if weight.bias is not None else act_dequant
    args = (
        x_int8, act_dequant, act_sum,
        weight.packed, weight.dequant, bias,
        out,
        sums, counts,
        m, n, weight.in_features,
        x_int8.stride(0), weight.packed.stride(0), out.stride(0), weight.dequant.stride(0) if mode == 2 else 0,
        kb // config.split_k, max(weight.group_size, 1),
    )
    meta = dict(
        SCALE_MODE=mode,
        HAS_BIAS=weight.bias is not None and not int_only,
        SPLIT=config.split_k,
        FENCE=split and x_int8.is_cuda and not INTERPRET,
        INT_OUT=int_only,
        EVEN_K=weight.in_features % KERNEL_CHUNK == 0 and x_int8.shape[1] >= weight.in_features,
        BLOCK_N=config.block_n,
        BLOCK_M=config.block_m,
        BLOCK_KB=config.block_kb,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    meta.update(pdl_options(x_int8, pdl))
    try:
        _w2a8_kernel[grid](*args, USE_ASM=use_asm, **meta)
    except Exception as err:
        if not use_asm:
            raise
        # Inline PTX this Triton cannot build: fall back to plain shifts (if those work).
        try:
            _w2a8_kernel[grid](*args, USE_ASM=False, **meta)
        except Exception:
            raise err from None
        warnings.warn(f"w2a8: inline-asm unpack failed ({type(err).__name__}: {err}); using plain shifts")
        if tuner is not None:
            tuner.use_asm = False
    return out


def _split_scratch(numel: int, tiles: int, device: torch.device, scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 slabs (`numel`) and zeroed tile counters (`tiles`): from `scratch` (the kernels leave
    the counters at zero) or new."""
    if scratch is not None:
        return scratch.take(device, numel, tiles)
    return torch.empty(numel, dtype=torch.int32, device=device), torch.zeros(tiles, dtype=torch.int32, device=device)


def _dp4a_ok(x_int8: torch.Tensor, weight) -> bool:
    """The dp4a kernel reads 32-bit words: M ≤ 4, K a multiple of 128, no per-group scales."""
    return (
        x_int8.shape[0] <= DP4A_MAX_M
        and not weight.group_size
        and weight.in_features % KERNEL_CHUNK == 0
        and x_int8.shape[1] >= weight.in_features
        and x_int8.stride(0) % 4 == 0
        and x_int8.storage_offset() % 4 == 0
    )


def _launch_dp4a(x_int8, act_dequant, act_sum, weight, out, config: Config, *, int_only: bool, use_asm: bool | None, pdl: bool) -> torch.Tensor:
    m = x_int8.shape[0]
    n = weight.packed.shape[0]
    x_words = x_int8[:, : weight.in_features].view(torch.int32)
    w_words = weight.packed.view(torch.int32)
    if use_asm is None:
        use_asm = x_int8.is_cuda and not INTERPRET
    bias = weight.bias if weight.bias is not None else act_dequant
    options = pdl_options(x_int8, pdl)
    _w2a8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x_words, act_dequant, act_sum,
        w_words, weight.dequant, bias,
        out,
        m, n, w_words.shape[1],
        x_words.stride(0), w_words.stride(0), out.stride(0),
        SCALE_MODE=weight.dequant.dim(),
        HAS_BIAS=weight.bias is not None and not int_only,
        INT_OUT=int_only,
        BLOCK_N=config.block_n,
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_KW=config.block_kb,
        USE_ASM=use_asm,
        PREFETCH=options["PDL"],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **options,
    )
    return out


def w2a8_matmul(
    x_int8: torch.Tensor,
    act_dequant: torch.Tensor,
    act_sum: torch.Tensor,
    weight,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    int_only: bool = False,
    config: Config | None = None,
    tuner=None,
) -> torch.Tensor:
    """`(M, N)` W2A8 product (see `w2a8.w2a8_matmul`). `int_only` needs per-tensor/channel scales."""
    if int_only and weight.group_size:
        raise ValueError("int_only needs per-tensor or per-channel scales")
    m = x_int8.shape[0]
    n, kb = weight.packed.shape
    if config is None:
        group = bool(weight.group_size)
        config = tuner.config(m, n, kb, group, x_int8.device) if tuner is not None else select_config(m, n, kb, group, x_int8.device)
    if out is None:
        out = torch.empty((m, n), dtype=torch.int32 if int_only else out_dtype, device=x_int8.device)
    return launch(x_int8, act_dequant, act_sum, weight, out, config, int_only=int_only, tuner=tuner)
