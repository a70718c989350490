"""Peak memory and step time of DPO and PPO on the BitNet b1.58 2B4T shape: full fine-tuning vs LoRA.

Rows (each measured in this run):
- full: every weight trains (bf16 master weights, AdamW states for all of them); the reference
  is the 2-bit packed ternary copy (the default of `dpo.reference` and of PPO);
- pre_quant LoRA: W_eff = Q(W + s·B·A) (`lora.mode: pre_quant`), AdamW on A and B only, the
  reference is the same model with adapters off (`lora.reference: base`, no second copy);
- post_quant LoRA: peft's LoRA after the ternary product, reference as above.

DPO: one step on random preference pairs (chosen + rejected in one forward, reference log-probs
under no_grad). PPO: the policy side of one update (reference log-probs, then a clipped-ratio
loss with a k3 KL term, backward, AdamW) on random sequences; the critic is left out (not measured: with `lora.critic: adapter` it adds
one more adapter and a value head on the same base, with `model` a second full model). Gradient
checkpointing on, bf16 weights, random weights and tokens.

    python benchmarks/lora_memory.py --layers 30 --pairs 4 --seq 512 --seqs 16       # GPU
    python benchmarks/lora_memory.py --shape tiny --layers 1 --repeats 1              # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch

SHAPES = {
    "2b4t": dict(hidden_size=2560, intermediate_size=6912, num_attention_heads=20, num_key_value_heads=5, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def build(shape: str, layers: int, device: str) -> torch.nn.Module:
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_rl.models.convert import enable_checkpointing, to_bitlinear

    torch.manual_seed(0)
    config = BitNetConfig(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape])
    with torch.device(device):
        model = BitNetForCausalLM(config).to(torch.bfloat16)
    model = to_bitlinear(model)
    enable_checkpointing(model)
    return model.train()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gib(device: str, peak: bool = False) -> float:
    if device != "cuda":
        return float("nan")
    sync(device)
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def policy_and_reference(mode: str, args):
    from bitnet_rl.lora.apply import DisabledAdapterView, apply_lora
    from bitnet_rl.models.frozen import frozen_ternary_copy
    from bitnet_rl.recipe import LoraSettings

    policy = build(args.shape, args.layers, args.device)
    if mode == "full":
        return policy, frozen_ternary_copy(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(policy, LoraSettings(enabled=True, mode=mode, r=args.rank, alpha=2 * args.rank))
    return policy, DisabledAdapterView(policy)


def dpo_step(policy, reference, args):
    from bitnet_rl.recipe import DPOConfig
    from bitnet_rl.train.dpo import dpo_loss_fn

    vocab, device = policy.config.vocab_size, args.device
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, vocab, (args.pairs, args.seq), device=device)
        completion = torch.zeros_like(ids)
        completion[:, args.seq // 2 :] = 1
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_completion_mask"] = ids, torch.ones_like(ids), completion
    loss_fn = dpo_loss_fn(DPOConfig(), reference)
    return lambda: loss_fn(policy, batch)[0]


def ppo_step(policy, reference, args):
    from bitnet_rl.models.forward import token_logprobs

    ids = torch.randint(3, policy.config.vocab_size, (args.seqs, args.seq), device=args.device)
    mask = torch.ones_like(ids)
    advantages = torch.randn(args.seqs, args.seq - 1, device=args.device)

    def loss():
        with torch.no_grad():
            ref = token_logprobs(reference, ids, mask)
        logprobs = token_logprobs(policy, ids, mask)
        ratio = torch.exp(logprobs - logprobs.detach())
        surrogate = torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        log_r = ref - logprobs
        kl = torch.exp(log_r) - 1 - log_r  # k3
        return (-surrogate + 0.05 * kl).mean()

    return loss


def measure(algo: str, mode: str, args) -> dict:
    gc.collect()  # the previous row's model sits in reference cycles (closures, adapter views)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy, reference = policy_and_reference(mode, args)
    weights = gib(args.device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    loss_fn = (dpo_step if algo == "dpo" else ppo_step)(policy, reference, args)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        if any(p.grad is None for p in trainable):
            raise RuntimeError(f"{algo}/{mode}: some trainable parameters got no gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    result = {"weights": weights, "peak": gib(args.device, peak=True), "step_s": sorted(times)[len(times) // 2], "trainable_m": sum(p.numel() for p in trainable) / 1e6}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="2b4t")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4, help="DPO preference pairs per step")
    parser.add_argument("--seqs", type=int, default=16, help="PPO sequences per update step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--algos", nargs="+", default=["dpo", "ppo"])
    parser.add_argument("--modes", nargs="+", default=["full", "pre_quant", "post_quant"])
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (memory not measured)"
    print(f"{name}: {args.shape} shape, {args.layers} layers, bf16 weights, LoRA r={args.rank} on all 7 projections, gradient checkpointing")
    print(f"DPO: {args.pairs} pairs x {args.seq} tokens; PPO: {args.seqs} sequences x {args.seq} tokens (policy side, no critic)")
    print("| algorithm | mode | trainable M params | policy + reference GiB | peak GiB | peak vs first row | step s | step vs first row |")
    print("|---|---|---|---|---|---|---|---|")
    for algo in args.algos:
        base = None
        for mode in args.modes:
            r = measure(algo, mode, args)
            base = base or r  # the first mode (full by default) is the baseline of its algorithm
            print(
                f"| {algo} | {mode} | {r['trainable_m']:,.3f} | {r['weights']:.2f} | {r['peak']:.2f} | {r['peak'] / base['peak']:.2f}x "
                f"| {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
