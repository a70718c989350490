"""Peak GPU memory of DPO on the BitNet b1.58 2B4T shape: policy + reference, by reference kind.

The policy holds bf16 master weights (BitLinear) with AdamW; the reference is the starting
policy frozen as a 2-bit packed ternary copy (our default), a full bf16 copy, or nothing
(log-probs precomputed). One DPO step on random pairs.

    python benchmarks/dpo_memory.py --layers 30 --pairs 4 --seq 512
"""

from __future__ import annotations

import argparse
import copy

import torch

from common import bitnet_2b4t, device_name, now_gib, peak_gib, reset_peak, table


def synthetic_batch(pairs: int, seq: int, vocab: int, prompt: int) -> dict[str, torch.Tensor]:
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, vocab, (pairs, seq), device="cuda")
        completion = torch.zeros_like(ids)
        completion[:, prompt:] = 1
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_completion_mask"] = ids, torch.ones_like(ids), completion
    batch["ref_chosen_logps"] = torch.zeros(pairs, device="cuda")
    batch["ref_rejected_logps"] = torch.zeros(pairs, device="cuda")
    return batch


def measure(kind: str, args) -> dict:
    from bitnet_rl.models.convert import enable_checkpointing, to_bitlinear
    from bitnet_rl.models.frozen import frozen_ternary_copy
    from bitnet_rl.recipe import DPOConfig
    from bitnet_rl.train.dpo import dpo_loss_fn

    torch.cuda.empty_cache()
    reset_peak()
    policy = to_bitlinear(bitnet_2b4t(args.layers, dtype=torch.bfloat16))
    enable_checkpointing(policy)
    policy_gib = now_gib()
    reference = {"ternary": lambda: frozen_ternary_copy(policy), "full": lambda: copy.deepcopy(policy).requires_grad_(False).eval(), "precompute": lambda: None}[kind]()
    reference_gib = now_gib() - policy_gib
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7, betas=(0.9, 0.95), weight_decay=0.0)
    loss_fn = dpo_loss_fn(DPOConfig(reference=kind), reference)
    batch = synthetic_batch(args.pairs, args.seq, policy.config.vocab_size, args.seq // 2)
    for _ in range(2):
        loss, _, _ = loss_fn(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"policy": policy_gib, "reference": reference_gib, "peak": peak_gib()}
    del policy, reference, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    rows = []
    results = {kind: measure(kind, args) for kind in ("ternary", "full", "precompute")}
    base = results["full"]["peak"]
    for kind, label in (("ternary", "2-bit ternary copy (default)"), ("full", "bf16 copy"), ("precompute", "precomputed log-probs")):
        r = results[kind]
        rows.append([label, r["policy"], r["reference"], r["peak"], r["peak"] / base])
    print(f"\n{device_name()}: 2B4T shape, {args.layers} layers, bf16 master weights + AdamW, {args.pairs} pairs x {args.seq} tokens, gradient checkpointing")
    print(table(["reference", "policy GiB", "reference GiB", "peak GiB (DPO step)", "peak vs bf16 copy"], rows))


if __name__ == "__main__":
    main()
