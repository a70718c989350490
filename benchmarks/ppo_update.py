"""The PPO update (policy + critic) on the BitNet b1.58 2B4T shape: MFU per lever, against today's path.

    python benchmarks/ppo_update.py --layers 30 --seqs 64 --prompt-len 128 --new-tokens 128 --minibatch 16

One epoch of clipped PPO updates over `seqs` sequences (minibatches of `--minibatch`, AdamW on
bf16 parameters, entropy in the loss, a BitLinear critic with a value loss), random weights and
tokens. Rows, each measured in this run and compared with the first:
- today: the trainer's path (full `(B, T, V)` logits, BitLinear quantizing in torch every
  forward, micro-batches of 4, activation checkpointing);
- + BitLinear fast paths: Triton per-token fake quant, Q(W) once per optimizer step;
- + chunked log-probs: `models.forward.causal_lm_logprobs` (no `(B, T, V)` logits);
- + micro-batch = minibatch (no accumulation), with and without checkpointing;
- + fused AdamW; + `torch.compile` of the decoder layers, then also of the chunked head's
  softmax math (what `train.compile` does);
- grpo: the same update without the critic (GRPO's), its MFU over the policy's FLOPs only.
MFU counts model FLOPs 6·N·tokens per trained model (N without the input embedding; recompute
not counted) over the bf16 matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import bitnet_2b4t, bitnet_critic, device_name, matmul_peak, peak_gib, reset_peak, set_bitlinear_fast_paths, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="today,fast,chunked,micro16_ckpt,micro16,fused_adam,compile_layers,compile,grpo")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the last PPO (policy + critic) variant")
    args = parser.parse_args()

    from bitnet_rl.models.convert import enable_checkpointing, to_bitlinear
    from bitnet_rl.models.forward import COMPILED_HEAD, causal_lm_logprobs, compile_decoder_layers
    from bitnet_rl.rl.advantages import masked_mean
    from bitnet_rl.rl.losses import ppo_policy_loss, value_loss
    from bitnet_rl.train.experience import Experience, completion_columns, critic_forward, policy_forward

    peak = matmul_peak()
    policy = to_bitlinear(bitnet_2b4t(args.layers))
    critic = to_bitlinear(bitnet_critic(args.layers))
    optimizers = {
        fused: (torch.optim.AdamW(policy.parameters(), lr=1e-7, betas=(0.9, 0.95), fused=fused),
                torch.optim.AdamW(critic.parameters(), lr=1e-7, betas=(0.9, 0.95), fused=fused))
        for fused in (False, True)
    }
    opt_p, opt_c = optimizers[False]
    current = {"opts": (opt_p, opt_c)}
    length = args.prompt_len + args.new_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, policy.config.vocab_size, (args.seqs, length), device="cuda", generator=g)
    mask = torch.ones((args.seqs, args.new_tokens), device="cuda")
    zeros = torch.zeros_like(mask)
    exp = Experience(
        ids, torch.ones_like(ids), torch.full((args.seqs,), args.prompt_len, device="cuda"), mask,
        old_logprobs=zeros, rollout_logprobs=zeros, ref_logprobs=zeros, values=zeros, scores=torch.zeros(args.seqs, device="cuda"),
        advantages=torch.randn(mask.shape, device="cuda", generator=g), returns=torch.randn(mask.shape, device="cuda", generator=g),
        is_weights=torch.ones_like(mask), loss_mask=mask.clone(),
    )  # fmt: skip
    with torch.no_grad():
        exp.old_logprobs = torch.cat([policy_forward(policy, exp.select(torch.arange(i, i + 8, device="cuda")))[0] for i in range(0, args.seqs, 8)])
        exp.values = torch.cat([critic_forward(critic, exp.select(torch.arange(i, i + 8, device="cuda"))) for i in range(0, args.seqs, 8)])

    def chunked_forward(model, part):
        logps, entropy = causal_lm_logprobs(model, part.input_ids, part.attention_mask, with_entropy=True)
        width = part.mask.shape[1]
        return completion_columns(logps, part.prompt_lens, width), completion_columns(entropy, part.prompt_lens, width)

    def update(micro: int, chunked: bool, with_critic: bool = True) -> None:
        opt_p, opt_c = current["opts"]
        order = torch.randperm(args.seqs, device="cuda")
        for start in range(0, args.seqs, args.minibatch):
            rows = order[start : start + args.minibatch]
            for part_rows in rows.split(micro):
                part = exp.select(part_rows)
                weight = len(part_rows) / len(rows)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logprobs, entropy = chunked_forward(policy, part) if chunked else policy_forward(policy, part, with_entropy=True)
                    loss, _ = ppo_policy_loss(logprobs, part.old_logprobs, part.advantages, part.mask, 0.2)
                    loss = loss - 0.01 * masked_mean(entropy, part.mask)
                (loss * weight).backward()
                if not with_critic:
                    continue
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    values = critic_forward(critic, part)
                    vloss, _ = value_loss(values, part.values, part.returns, part.mask, 0.2)
                (vloss * weight).backward()
            for model, opt in ((policy, opt_p), (critic, opt_c))[: 2 if with_critic else 1]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

    def set_checkpointing(on: bool) -> None:
        for model in (policy, critic):
            if on:
                enable_checkpointing(model)
            else:
                disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                disable()

    variants = {
        "today": dict(label="today (full logits, torch quant, micro 4, checkpointing)", fast=False, chunked=False, micro=4, ckpt=True),
        "fast": dict(label="+ BitLinear fast paths (Triton act quant, Q(W) per step)", fast=True, chunked=False, micro=4, ckpt=True),
        "chunked": dict(label="+ chunked log-probs (no (B,T,V) logits)", fast=True, chunked=True, micro=4, ckpt=True),
        "micro16_ckpt": dict(label=f"+ micro {args.minibatch} (checkpointing)", fast=True, chunked=True, micro=args.minibatch, ckpt=True),
        "micro16": dict(label=f"+ micro {args.minibatch}, no checkpointing", fast=True, chunked=True, micro=args.minibatch, ckpt=False),
        "fused_adam": dict(label="+ fused AdamW", fast=True, chunked=True, micro=args.minibatch, ckpt=False, fused=True),
        "compile_layers": dict(label="+ torch.compile of the decoder layers (eager head math)", fast=True, chunked=True, micro=args.minibatch, ckpt=False, fused=True,
                               compile=True, compiled_head=False),
        "compile": dict(label="+ torch.compile of the decoder layers and the chunked head's softmax math (train.compile)", fast=True, chunked=True,
                        micro=args.minibatch, ckpt=False, fused=True, compile=True),
        "grpo": dict(label="GRPO update (policy only, no critic), as 'compile'", fast=True, chunked=True, micro=args.minibatch, ckpt=False, fused=True,
                     compile=True, critic=False),
    }
    n_policy = sum(p.numel() for p in policy.parameters()) - policy.model.embed_tokens.weight.numel()
    n_critic = sum(p.numel() for p in critic.parameters()) - critic.model.embed_tokens.weight.numel()
    flops = 6 * (n_policy + n_critic) * args.seqs * length
    rows, base = [], None
    for name in args.variants.split(","):
        v = variants[name]
        set_bitlinear_fast_paths(policy, v["fast"])
        set_bitlinear_fast_paths(critic, v["fast"])
        set_checkpointing(v["ckpt"])
        opt_p, opt_c = optimizers[v.get("fused", False)]
        current["opts"] = (opt_p, opt_c)
        if v.get("compile"):
            compile_decoder_layers(policy)
            compile_decoder_layers(critic)
            setattr(policy.get_output_embeddings(), COMPILED_HEAD, v.get("compiled_head", True))
        policy.train()
        critic.train()
        try:
            with_critic = v.get("critic", True)
            update(v["micro"], v["chunked"], with_critic)  # warm-up (allocator, Triton compile)
            reset_peak()
            times = []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                update(v["micro"], v["chunked"], with_critic)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            seconds = min(times)
            mem = peak_gib()
        except (torch.OutOfMemoryError, RuntimeError) as err:  # OOM, or a compile failure
            print(f"{name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append([v["label"], "OOM", "", "", "", ""])
            torch.cuda.empty_cache()
            continue
        if not with_critic:  # other work than the PPO rows: its own FLOPs, no speedup
            policy_flops = 6 * n_policy * args.seqs * length
            rows.append([v["label"], seconds, 100 * policy_flops / seconds / peak, 100 * policy_flops / seconds / 790e12, mem, "—"])
            print(f"{name}: {seconds:.2f} s, peak {mem:.1f} GiB", flush=True)
            opt_p.zero_grad(set_to_none=True)
            continue
        base = base or seconds
        rows.append([v["label"], seconds, 100 * flops / seconds / peak, 100 * flops / seconds / 790e12, mem, base / seconds])
        print(f"{name}: {seconds:.2f} s, peak {mem:.1f} GiB", flush=True)
        opt_p.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        last = v
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            update(last["micro"], last["chunked"])
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
        print(kernel_categories(averages, wall))
    print(f"\n{device_name()}: PPO update, 2B4T shape, {args.layers} layers, {args.seqs} seqs x {length} tokens, minibatch {args.minibatch}, "
          f"policy {n_policy / 1e9:.2f} B + critic {n_critic / 1e9:.2f} B params (w/o input embedding), 6·N·tokens = {flops / 1e12:.0f} TFLOP; "
          f"measured bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    print(table(["update path", "s", "MFU % (measured peak)", "MFU % (790 TFLOP/s)", "peak GiB", "speedup vs today"], rows))


CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "cublas")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("optimizer (AdamW, grad-norm clip)", ("adam", "foreach", "multi_tensor", "norm_kernel")),
    ("Triton (ours or inductor)", ("triton",)),
    ("reductions", ("reduce",)),
    ("elementwise / copies", ("elementwise", "vectorized", "copy", "fill", "cat", "index", "scatter", "gather")),
)


def kernel_categories(averages, wall: float) -> str:
    """Self CUDA time per kernel category vs the wall time of the profiled update (gaps = launch-bound time)."""
    totals: dict[str, float] = {}
    for event in averages:
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        if not us:
            continue
        name = event.key.lower()
        label = next((label for label, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[label] = totals.get(label, 0.0) + us / 1e6
    busy = sum(totals.values())
    rows = [[label, sec, 100 * sec / wall] for label, sec in sorted(totals.items(), key=lambda kv: -kv[1])]
    rows.append(["all kernels", busy, 100 * busy / wall])
    rows.append(["GPU idle (wall − kernels; launch and host time)", wall - busy, 100 * (wall - busy) / wall])
    return table(["kernel category", "s", "% of the update's wall time"], rows)


if __name__ == "__main__":
    main()
