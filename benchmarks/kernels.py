"""W2A8 GEMV / skinny GEMM vs torch.matmul in bf16 on the BitNet b1.58 2B4T projection shapes.

    python benchmarks/kernels.py [--rows 1,16,64] [--json out.json]

Every kernel is timed as CUDA-graph replays with its weights rotated through copies larger than
the L2 cache, so the numbers are memory-bound steady state, not launch overhead or cache hits.
Effective bandwidth counts the bytes a call must move (packed weights + scales + activations +
output); "% copy" compares it with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

from common import copy_bandwidth

# (name, K, N)
SHAPES = [
    ("qkv fused", 2560, 3840),
    ("q / o", 2560, 2560),
    ("k / v", 2560, 640),
    ("gate|up fused", 2560, 13824),
    ("gate / up", 2560, 6912),
    ("down", 6912, 2560),
]


def bench_dense(m: int, k: int, n: int) -> float:
    from bitnet_rl.quant.kernels.tuner import time_graph

    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    copies = max(1, min(32, (512 << 20) // (2 * n * k)))
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]

    def run():
        for w in weights:
            torch.matmul(x, w.T)

    return time_graph(run) / copies * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--json", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    from bitnet_rl.quant.bitlinear import ternary_codes
    from bitnet_rl.quant.kernels import PackedWeight
    from bitnet_rl.quant.kernels import triton_w2a8 as tw
    from bitnet_rl.quant.kernels import tuner as tuning

    torch.manual_seed(0)
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"# W2A8 kernels on {gpu}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)\n")
    rows = [int(r) for r in args.rows.split(",")]
    records = []
    header = "| shape (K→N) | M | W2A8 µs | W2A8 GB/s | % copy BW | no-asm µs | heuristic µs | bf16 matmul µs | bf16 GB/s | speedup | best config |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, k, n in SHAPES:
        codes, scale = ternary_codes(torch.randn(n, k, device="cuda"))
        weight = PackedWeight.from_codes(codes, scale)
        weight = PackedWeight(weight.packed, weight.dequant.expand(n).contiguous(), k, n)  # per-channel, as in the generator
        for m in rows:
            results = tuning.time_candidates(weight, m, verbose=args.verbose)
            best_us, best = results[0]
            copies = tuning.rotating_copies(weight)
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            xdq, xsum = torch.rand(m, device="cuda"), x.sum(-1, dtype=torch.int32)
            out = torch.empty((m, n), device="cuda")

            def timed(config, use_asm=None):
                def run():
                    for w in copies:
                        tw.launch(x, xdq, xsum, w, out, config, use_asm=use_asm)

                return tuning.time_graph(run) / len(copies) * 1e3

            no_asm_us = timed(best, use_asm=False)
            heuristic_us = timed(tw.select_config(m, n, weight.packed.shape[1], False, x.device))
            dense_us = bench_dense(m, k, n)
            moved = weight.packed.numel() + 4 * n + m * k + 4 * m * n
            gbs = moved / (best_us * 1e-6) / 1e9
            dense_gbs = (2 * n * k + 2 * m * k + 2 * m * n) / (dense_us * 1e-6) / 1e9
            cfg = f"BN{best.block_n} BM{best.block_m} BKB{best.block_kb} split{best.split_k} w{best.num_warps} s{best.num_stages}"
            print(
                f"| {name} ({k}→{n}) | {m} | {best_us:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | {no_asm_us:.1f} | "
                f"{heuristic_us:.1f} | {dense_us:.1f} | {dense_gbs:.0f} | {dense_us / best_us:.2f}× | {cfg} |",
                flush=True,
            )
            records.append(
                dict(shape=name, k=k, n=n, m=m, us=best_us, gbs=gbs, copy_frac=gbs * 1e9 / bw, no_asm_us=no_asm_us,
                     heuristic_us=heuristic_us, dense_us=dense_us, config=cfg,
                     all=[(round(us, 2), str(c)) for us, c in results])
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, copy_bw=bw, records=records), f, indent=1)


if __name__ == "__main__":
    main()
