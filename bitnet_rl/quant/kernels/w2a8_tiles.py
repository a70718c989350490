"""W2A8 tiles: the configurations the Triton kernels of `triton_w2a8` run, and how one is chosen.

`select_config` is the heuristic tile for a shape; `candidates` lists the tiles a `KernelTuner`
times for it (every split-K factor for decode shapes). Row counts fall into tuning classes
(`m_class`). Split-K applies to per-tensor and per-channel scales only: its partial sums are
exact int32 (see `triton_w2a8`), which per-group scales would turn into float partials.
Plain Python: importing this needs no Triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bitnet_rl.quant.pack import KERNEL_PLANE

DP4A_MAX_M = 4  # rows up to which the dp4a GEMV kernel is a candidate
SPLIT_SCRATCH = 1 << 24  # most int32 partial sums (split × rows × N) a split-K tile may keep: 64 MiB


@dataclass(frozen=True)
class Config:
    """A tile. kind "mma": tensor-core kernel; kind "dp4a": the M ≤ 4 GEMV kernel, whose
    `block_kb` counts 32-bit words and whose `block_m` is set per call (next power of 2 of M)."""

    block_n: int
    block_m: int
    block_kb: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    kind: str = "mma"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def m_class(m: int) -> int:
    """Tuning bucket of a row count: 4, 16, 64, 256 or 0 (large, prefill)."""
    for bound in (DP4A_MAX_M, 16, 64, 256):
        if m <= bound:
            return bound
    return 0


def _splits(steps: int, rows: int, n: int, cap: int = 8) -> list[int]:
    """Split-K factors: divisors of the K steps, at most `cap`, whose slabs fit `SPLIT_SCRATCH`."""
    return [d for d in range(1, min(steps, cap) + 1) if steps % d == 0 and (d == 1 or d * rows * n <= SPLIT_SCRATCH)]


def _block_kbs(kb: int, group: bool, options=(128, 64, 32)) -> list[int]:
    if group:
        return [KERNEL_PLANE]
    return [b for b in options if kb % b == 0]


def select_config(m: int, n: int, kb: int, group: bool, device: torch.device) -> Config:
    """Heuristic tile for `(M, N)` outputs over `kb` packed bytes per row."""
    mc = m_class(m)
    if mc == DP4A_MAX_M and not group:
        return Config(16, 1, 64, 1, 4, 3, kind="dp4a")
    mc = mc if mc == 0 else max(mc, 16)  # 0: prefill
    block_m, block_n, warps, stages = {16: (16, 32, 4, 4), 64: (64, 64, 4, 3), 256: (128, 64, 4, 3), 0: (128, 128, 8, 3)}[mc]
    block_kb = _block_kbs(kb, group, (64, 32))[0]
    programs = -(-n // block_n) * -(-m // block_m)
    split = 1
    if mc and not group:  # split-K sums int32 partials; per-group scales make them float
        target = 2 * _num_sms(device)
        for d in _splits(kb // block_kb, mc, n):
            split = d
            if programs * d >= target:
                break
    return Config(block_n, block_m, block_kb, split, warps, stages)


# Tiles `tune` times per row class: (BLOCK_N, BLOCK_M, BLOCK_KB, num_warps, num_stages).
# BLOCK_KB falls back to 64 / 32 where it does not divide the packed row.
TILES = {
    DP4A_MAX_M: [],
    16: [(16, 16, 128, 4, 4), (32, 16, 64, 4, 4), (32, 16, 128, 4, 3), (64, 16, 64, 4, 3)],
    64: [(32, 64, 128, 4, 3), (64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (128, 64, 64, 4, 3), (128, 64, 128, 8, 3)],
    256: [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 128, 4, 3), (256, 64, 64, 8, 3), (128, 128, 128, 8, 3)],
    0: [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (256, 128, 64, 8, 3)],
}


# dp4a GEMV tiles for M ≤ DP4A_MAX_M: (BLOCK_N, BLOCK_KW words, num_warps).
DP4A_TILES = [
    (8, 64, 4), (16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 8), (64, 64, 8),
    # one pass over a whole 2560-wide (160 words) or 6912-wide (432 words) row: every load in flight at once
    (2, 256, 2), (4, 256, 4), (8, 256, 4), (16, 256, 8), (2, 512, 4), (4, 512, 4), (8, 512, 8),
]


def candidates(m: int, n: int, kb: int, group: bool) -> list[Config]:
    """Configurations `tune` times for one shape (every split-K factor for decode shapes)."""
    mc = m_class(m)
    out = []
    if mc == DP4A_MAX_M and not group:
        out += [Config(bn, 1, bkw, 1, warps, 3, kind="dp4a") for bn, bkw, warps in DP4A_TILES]
    for block_n, block_m, block_kb, warps, stages in TILES[mc] if mc != DP4A_MAX_M else TILES[16]:
        if group:
            block_kb = KERNEL_PLANE
        while kb % block_kb:
            block_kb //= 2
        if block_kb < KERNEL_PLANE:
            continue
        for split in _splits(kb // block_kb, mc, n) if mc and not group else [1]:
            config = Config(block_n, block_m, block_kb, split, warps, stages)
            if config not in out:
                out.append(config)
    return out
