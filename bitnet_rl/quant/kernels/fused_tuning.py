"""Timing the fused decode kernel (`triton_fused`) against `norm_quant` + the tuned GEMV.

`decide(tuner, weights, m)` times, for each projection of a layer at `m ≤ 4` rows, the fused
kernel's candidate tiles and the unfused pair (the per-row norm + quantization kernel, then
the GEMV tile `KernelTuner.tune` picked), each as CUDA-graph replays of many launches (so the
launch gaps a decode graph has are in both numbers) with weights rotated past L2. It keeps the
fastest fused tile per shape and switches the fused path on for this row class only when the
layer's fused sum is faster. The inputs are plain (no gating, no residual) with a norm.
"""

from __future__ import annotations

import torch

from bitnet_rl.quant.kernels.tuner import rotating_copies, time_graph

FUSED_TILES = [(4, 256, 4), (8, 256, 4), (16, 256, 8), (8, 512, 8), (16, 512, 8)]  # (BLOCK_N, BLOCK_KW, num_warps)
REPEATS = 32  # launches per timed graph for the norm kernel


def time_fused_tiles(weight, m: int) -> list:
    """`(µs, tile)` of the fused kernel for `weight` at `m` rows, fastest first."""
    from bitnet_rl.quant.kernels.triton_fused import norm_quant_gemv

    device = weight.packed.device
    inp = torch.randn((m, weight.in_features), device=device)
    norm = torch.rand(weight.in_features, device=device) + 0.5
    out = torch.empty((m, weight.out_features), device=device)
    weights = rotating_copies(weight)
    results = []
    for tile in FUSED_TILES:
        def run(t=tile):
            for w in weights:
                norm_quant_gemv(inp, w, out, norm_weight=norm, tile=t)

        try:
            results.append((1e3 * time_graph(run) / len(weights), tile))
        except Exception:  # a tile that does not compile or fit is skipped
            continue
    results.sort(key=lambda r: r[0])
    return results


def time_norm_quant(k: int, m: int, device: torch.device) -> float:
    """µs of one `norm_quant` launch (RMSNorm + int8) over `m` rows of width `k`."""
    from bitnet_rl.quant.kernels.triton_layers import norm_quant

    inp = torch.randn((m, k), device=device)
    norm = torch.rand(k, device=device) + 0.5
    q = torch.empty((m, k), dtype=torch.int8, device=device)
    dq, s = torch.empty(m, device=device), torch.empty(m, dtype=torch.int32, device=device)
    return 1e3 * time_graph(lambda: [norm_quant(inp, q, dq, s, norm_weight=norm) for _ in range(REPEATS)]) / REPEATS


def decide(tuner, weights, m: int) -> None:
    """Fill `tuner.fused_tiles`, `fused_report` and `fused_wins` for `m`'s row class."""
    from bitnet_rl.quant.kernels.triton_fused import fused_ok

    mc = tuner.key(m, 0, 0, False)[0]
    if not all(fused_ok(m, w) for w in weights):
        tuner.fused_wins[mc] = False
        return
    report, fused_sum, unfused_sum = {}, 0.0, 0.0
    for w in weights:
        results = time_fused_tiles(w, m)
        if not results:
            tuner.fused_wins[mc] = False
            return
        tuner.fused_tiles[tuner.key(m, *w.packed.shape, False)[:3]] = results[0][1]
        gemv = tuner.times.get(tuner.key(m, *w.packed.shape, False))
        if gemv is None:  # tuned before `times` was kept
            gemv = tuner.tune(w, m)[0][0]
        unfused = time_norm_quant(w.in_features, m, w.packed.device) + gemv
        report[f"{w.out_features}x{w.in_features}"] = (round(results[0][0], 2), round(unfused, 2))
        fused_sum += results[0][0]
        unfused_sum += unfused
    tuner.fused_report[mc] = report
    tuner.fused_wins[mc] = fused_sum < unfused_sum
