"""SFT step time and peak memory: BitLinear (ternary STE, int8 activations) vs plain nn.Linear.

A model with the BitNet b1.58 2B4T layer shapes (fewer layers by default), fp32 master
weights under bf16 autocast, AdamW, next-token loss on random tokens.

    python benchmarks/train_step.py --layers 8 --batch 4 --seq 1024
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import bitnet_2b4t, device_name, peak_gib, reset_peak, table, timed


def measure(quantized: bool, args) -> dict:
    from bitnet_rl.models.convert import enable_checkpointing, to_bitlinear

    model = bitnet_2b4t(args.layers, dtype=torch.float32)
    if quantized:
        to_bitlinear(model)
    if args.checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocate optimizer state before measuring the peak
    reset_peak()
    seconds = timed(step, repeats=args.repeats)
    peak = peak_gib()
    params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    torch.cuda.empty_cache()
    return {"seconds": seconds, "peak": peak, "tokens_per_s": args.batch * args.seq / seconds, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    dense = measure(False, args)
    bit = measure(True, args)
    rows = [
        ["nn.Linear (bf16 autocast)", dense["seconds"] * 1e3, dense["tokens_per_s"], dense["peak"], 1.0, 1.0],
        ["BitLinear (ternary STE + int8 act)", bit["seconds"] * 1e3, bit["tokens_per_s"], bit["peak"], bit["seconds"] / dense["seconds"], bit["peak"] / dense["peak"]],
    ]
    print(f"\n{device_name()}: 2B4T layer shapes, {args.layers} layers ({dense['params'] / 1e9:.2f} B params), batch {args.batch} x seq {args.seq}, AdamW, fp32 master + bf16 autocast, checkpointing={args.checkpointing}")
    print(table(["linear layers", "step ms", "tokens/s", "peak GiB", "time vs dense", "memory vs dense"], rows))


if __name__ == "__main__":
    main()
