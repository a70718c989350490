"""SFT step time and peak memory: BitLinear (ternary STE, int8 activations) vs plain nn.Linear.

A model with the BitNet b1.58 2B4T layer shapes (fewer layers by default), fp32 master
weights under bf16 autocast (or bf16 weights with `--bf16-params`), AdamW, next-token loss on
random tokens. Rows, all measured in this run, each compared with the nn.Linear step:
- BitLinear, torch quantizers every forward (the path before the training levers);
- BitLinear with its fast paths: Triton per-token fake quant (bit-exact), Q(W) as one Triton
  pass (bit-exact) cached per optimizer step (gradient-checkpoint recomputes and micro-batches
  reuse it);
- `--chunked`: the loss from `models.forward.chunked_head_logprobs` instead of full float32 logits.

    python benchmarks/train_step.py --layers 8 --batch 4 --seq 1024
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import bitnet_2b4t, device_name, matmul_peak, peak_gib, reset_peak, set_bitlinear_fast_paths, table, timed


def measure(quantized: bool, fast: bool, args) -> dict:
    from bitnet_rl.models.convert import enable_checkpointing, to_bitlinear
    from bitnet_rl.models.forward import causal_lm_logprobs

    model = bitnet_2b4t(args.layers, dtype=torch.bfloat16 if args.bf16_params else torch.float32)
    if quantized:
        to_bitlinear(model)
        set_bitlinear_fast_paths(model, fast)
    if args.checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if args.chunked:
                loss = -causal_lm_logprobs(model, ids, torch.ones_like(ids))[0].mean()
            else:
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
    flops = 6 * (params - model.model.embed_tokens.weight.numel()) * args.batch * args.seq
    del model, optimizer
    torch.cuda.empty_cache()
    return {"seconds": seconds, "peak": peak, "tokens_per_s": args.batch * args.seq / seconds, "params": params, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--bf16-params", action="store_true")
    parser.add_argument("--chunked", action="store_true")
    args = parser.parse_args()
    peak_flops = matmul_peak()
    dense = measure(False, False, args)
    plain = measure(True, False, args)
    fast = measure(True, True, args)
    rows = []
    for label, r in (("nn.Linear (bf16 autocast)", dense), ("BitLinear, torch quantizers per forward", plain), ("BitLinear, Triton act quant + Triton Q(W) once per step", fast)):
        rows.append([label, r["seconds"] * 1e3, r["tokens_per_s"], 100 * r["flops"] / r["seconds"] / peak_flops, r["peak"], r["seconds"] / dense["seconds"], r["peak"] / dense["peak"]])
    master = "bf16 params" if args.bf16_params else "fp32 master + bf16 autocast"
    print(f"\n{device_name()}: 2B4T layer shapes, {args.layers} layers ({dense['params'] / 1e9:.2f} B params), batch {args.batch} x seq {args.seq}, AdamW, {master}, "
          f"checkpointing={args.checkpointing}, chunked loss={args.chunked}; bf16 matmul measured {peak_flops / 1e12:.0f} TFLOP/s")
    print(table(["linear layers", "step ms", "tokens/s", "MFU %", "peak GiB", "time vs dense", "memory vs dense"], rows))


if __name__ == "__main__":
    main()
