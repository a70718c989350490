"""Where one decode step's time goes (diagnostics for issue 13): per-op breakdown, a kernel
profile of one eager decode step, and W2A8 vs cuBLAS int8 on cached int8 codes per shape.

    python benchmarks/decode_probe.py [--layers 4] [--batch 1,64,256]
"""

from __future__ import annotations

import argparse
import types

import torch


def int_mm_times(gen, rows) -> None:
    """µs per call: tuned W2A8 (best 3 candidates) vs `torch._int_mm` on a cached int8 copy + epilogue."""
    from bitnet_rl.quant.kernels.tuner import rotating_copies, time_graph

    names = ("qkv", "o", "gate_up", "down")
    for m in rows:
        for name, w in zip(names, gen.model.layers[0].projections()):
            res = gen.tuner.kernels.tune(w, m)
            best = ", ".join(f"{us:.1f} {c.kind}{(c.block_n, c.block_m, c.block_kb, c.split_k, c.num_warps, c.num_stages)}" for us, c in res[:3])
            line = f"M={m} {name} N×K={w.out_features}×{w.in_features} W2A8 best: {best}"
            if m >= 17:
                codes = [c.codes().contiguous() for c in rotating_copies(w, 512 << 20, 16)]
                x = torch.randint(-127, 128, (m, w.in_features), dtype=torch.int8, device="cuda")
                us = 1e3 * time_graph(lambda: [torch._int_mm(x, c.t()) for c in codes]) / len(codes)
                acc = torch._int_mm(x, codes[0].t())
                dq = torch.rand(m, device="cuda")
                us_epi = 1e3 * time_graph(lambda: acc.float().mul_(dq[:, None]).mul_(w.dequant))
                dense = [torch.randn(w.out_features, w.in_features, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                xb = torch.randn(m, w.in_features, device="cuda", dtype=torch.bfloat16)
                us_bf = 1e3 * time_graph(lambda: [torch.nn.functional.linear(xb, d) for d in dense]) / 4
                line += f" | int_mm cached {us:.1f} (+ torch epilogue {us_epi:.1f}) | bf16 F.linear {us_bf:.1f}"
            print(line, flush=True)


def check_dp4a_tiles(gen) -> None:
    """Every dp4a candidate at M = 1 equals the integer reference on the 2B4T shapes."""
    from bitnet_rl.quant.kernels import quantize_rows_ref, triton_w2a8, w2a8_matmul_ref, w2a8_tiles

    for w in gen.model.layers[0].projections():
        q, dq, s = quantize_rows_ref(torch.randn(1, w.in_features, device="cuda"))
        expected = w2a8_matmul_ref(q, dq, w, int_only=True)
        for c in w2a8_tiles.candidates(1, *w.packed.shape, False):
            out = torch.empty_like(expected)
            triton_w2a8.launch(q, dq, s, w, out, c, int_only=True)
            assert torch.equal(out, expected), c
    print("dp4a/mma candidates at M=1: exact", flush=True)


def profile_step(gen, b: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    st = gen.state
    st.positions[:b] = 256
    st.slots[:b] = torch.arange(b, dtype=torch.int32, device="cuda")
    gen.tuner.prepare(gen.model, b)
    gen._decode_step(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen._decode_step(b)
        torch.cuda.synchronize()
    print(f"\n### eager decode step, batch {b}, {len(gen.model.layers)} layers\n", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", default="1,64,256")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    from generate import breakdown, build_policy, print_breakdown

    from bitnet_rl.rollout import PackedGenerator

    torch.manual_seed(0)
    model = build_policy(types.SimpleNamespace(layers=args.layers, tiny=False), torch.device("cuda"))
    gen = PackedGenerator.from_model(model, max_batch_size=max(batches), max_seq_len=384)
    check_dp4a_tiles(gen)
    gen.capture(batches)
    for b in batches:
        print(f"attention tiles b={b}:", [(round(t, 1), tile) for t, tile in gen.tuner.tune_attention(gen.model, b, 384)][:3], flush=True)
    table = breakdown(gen, batches)
    print_breakdown(table, args.layers)
    int_mm_times(gen, [1, 16, 64, 256])
    for b in batches:
        profile_step(gen, b)


if __name__ == "__main__":
    main()
