"""Scoring and log-prob passes of one PPO iteration on the BitNet b1.58 2B4T shape: today vs the W2A8 path.

    python benchmarks/frozen_passes.py --layers 30 --seqs 64 --prompt-len 128 --new-tokens 128

The passes over `seqs` sequences of prompt + completion that a PPO iteration runs before its
update, each timed as before and after in this run (random weights and tokens):
- score: a frozen 2-bit reward model, float32 as `rewards.learned.LearnedReward` loads it,
  batches of 32; before: projections dequantized per forward (`set_kernels(False)`),
  after: the W2A8 tensor-core GEMM;
- reference log-probs: the frozen 2-bit copy of the policy (bf16); before: dequantized
  projections + full `(B, T, V)` logits, after: W2A8 + chunked head;
- old-policy log-probs: before: the BitLinear policy (torch quantizers) + full logits;
  after (a): BitLinear fast paths + chunked head; after (b): `PackedGenerator.token_logprobs`
  (the rollout model on the W2A8 prefill path, λ = 1);
- critic values: the BitLinear critic, before/after the BitLinear fast paths;
- packed prefill (`models.frozen.packed_prefill`, what the trainer now runs for the reward model
  and the reference on CUDA): the frozen copy on the generator's prefill forward, all rows in
  one call (bf16 activations; the reward model's float32 reference is the "before" row);
- the three passes as the trainer runs them under each `ppo.old_logprobs` (policy: old (a);
  prefill: old (b); rollout: no old-policy pass, the generator's sampling log-probs) and
  `ppo.critic_values` (critic: its own forward; prefill: a packed copy re-synced, then the
  prefill pass; the sync is inside the timing).
Each figure is the median of `--repeats` after a warm-up (which includes kernel tuning).
"""

from __future__ import annotations

import argparse

import torch

from common import bitnet_2b4t, bitnet_critic, device_name, set_bitlinear_fast_paths, table, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro", type=int, default=16, help="rows per log-prob forward (the trainer's micro-batch)")
    parser.add_argument("--skip-score", action="store_true", help="only the log-prob and value passes (no reward model)")
    args = parser.parse_args()

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.forward import causal_lm_logprobs, token_logprobs
    from bitnet_rl.models.frozen import frozen_ternary_copy, packed_prefill, set_kernels
    from bitnet_rl.models.value import sequence_scores, token_values
    from bitnet_rl.rollout import PackedGenerator

    length = args.prompt_len + args.new_tokens
    policy = to_bitlinear(bitnet_2b4t(args.layers)).eval()
    reference = frozen_ternary_copy(policy)
    rm = None if args.skip_score else frozen_ternary_copy(to_bitlinear(bitnet_critic(args.layers, dtype=torch.float32, seed=2)))
    critic = to_bitlinear(bitnet_critic(args.layers, seed=3)).eval()
    generator = PackedGenerator.from_model(policy, max_batch_size=args.seqs, max_seq_len=length)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, policy.config.vocab_size, (args.seqs, length), device="cuda", generator=g)
    mask = torch.ones_like(ids)

    def batched(fn, rows: int):
        return lambda: torch.cat([fn(ids[i : i + rows], mask[i : i + rows]) for i in range(0, args.seqs, rows)])

    def run(fn, rows: int) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            call = batched(fn, rows)
            return timed(call, repeats=args.repeats, warmup=1), call()

    results = {}

    def measure(name: str, fn, rows: int) -> None:
        results[name] = run(fn, rows)
        print(f"{name}: {results[name][0]:.3f} s", flush=True)

    if not args.skip_score:
        set_kernels(rm, False)
        measure("score before", lambda i, m: sequence_scores(rm, i, m), 32)
        set_kernels(rm, True)
        measure("score after", lambda i, m: sequence_scores(rm, i, m), 32)
        lengths = mask.sum(1)
        measure("score packed", lambda i, m: packed_prefill(rm).sequence_scores(i, lengths[: i.shape[0]]), args.seqs)
    set_kernels(reference, False)
    measure("ref before", lambda i, m: token_logprobs(reference, i, m), args.micro)
    set_kernels(reference, True)
    measure("ref after", lambda i, m: causal_lm_logprobs(reference, i, m)[0], args.micro)
    measure("ref packed", lambda i, m: packed_prefill(reference).token_logprobs(i), args.seqs)
    set_bitlinear_fast_paths(policy, False)
    measure("old before", lambda i, m: token_logprobs(policy, i, m), args.micro)
    set_bitlinear_fast_paths(policy, True)
    measure("old after (a)", lambda i, m: causal_lm_logprobs(policy, i, m)[0], args.micro)
    measure("old after (b)", lambda i, m: generator.token_logprobs(i), args.seqs)
    set_bitlinear_fast_paths(critic, False)
    measure("critic before", lambda i, m: token_values(critic, i, m), args.micro)
    set_bitlinear_fast_paths(critic, True)
    measure("critic after", lambda i, m: token_values(critic, i, m), args.micro)
    from bitnet_rl.rollout.prefill import PackedPrefill

    critic_prefill = PackedPrefill.from_model(critic)

    def synced_values(i, m):  # ppo.critic_values=prefill: re-pack the (training) critic, then one prefill pass
        critic_prefill.sync_from(critic)
        return critic_prefill.token_values(i)

    measure("critic packed", synced_values, args.seqs)

    def gap(a: str, b: str) -> float:
        x, y = results[a][1].float(), results[b][1].float()
        return float((x - y).abs().mean())

    s = {k: v[0] for k, v in results.items()}
    rows = [] if args.skip_score else [
        ["score (reward model, fp32, 2-bit)", s["score before"], s["score after"], s["score before"] / s["score after"], "≤ 0.15", f"mean |Δscore| {gap('score before', 'score after'):.3g}"],
        ["score (packed prefill, bf16)", s["score before"], s["score packed"], s["score before"] / s["score packed"], "≤ 0.15", f"mean |Δscore| {gap('score before', 'score packed'):.3g}"],
    ]
    rows += [
        ["reference log-probs (2-bit)", s["ref before"], s["ref after"], s["ref before"] / s["ref after"], "", f"mean |Δlogp| {gap('ref before', 'ref after'):.3g}"],
        ["reference log-probs (packed prefill)", s["ref before"], s["ref packed"], s["ref before"] / s["ref packed"], "", f"mean |Δlogp| {gap('ref before', 'ref packed'):.3g}"],
        ["old-policy log-probs (a: BitLinear fast + chunked)", s["old before"], s["old after (a)"], s["old before"] / s["old after (a)"], "", f"mean |Δlogp| {gap('old before', 'old after (a)'):.3g}"],
        ["old-policy log-probs (b: PackedGenerator.token_logprobs)", s["old before"], s["old after (b)"], s["old before"] / s["old after (b)"], "", f"mean |Δlogp| {gap('old before', 'old after (b)'):.3g}"],
        ["critic values (BitLinear)", s["critic before"], s["critic after"], s["critic before"] / s["critic after"], "", f"mean |Δv| {gap('critic before', 'critic after'):.3g}"],
        ["critic values (packed copy: re-sync + prefill pass)", s["critic before"], s["critic packed"], s["critic before"] / s["critic packed"], "", f"mean |Δv| {gap('critic before', 'critic packed'):.3g}"],
    ]
    best_old = min(s["old after (a)"], s["old after (b)"])
    three_before = s["old before"] + s["ref before"] + s["critic before"]
    three_after = best_old + s["ref after"] + s["critic after"]
    rows.append(["three log-prob passes (old, ref, critic)", three_before, three_after, three_before / three_after, "≤ 0.40", "best old"])
    trainer = s["old after (a)"] + s["ref packed"] + s["critic after"]  # the old policy stays the training policy's own pass
    rows.append(["three passes as the trainer runs them (old a, ref packed, critic)", three_before, trainer, three_before / trainer, "≤ 0.40", ""])
    prefill = s["old after (b)"] + s["ref packed"] + s["critic after"]
    rows.append(["... with ppo.old_logprobs=prefill (old b, ref packed, critic)", three_before, prefill, three_before / prefill, "≤ 0.40", ""])
    reuse = s["ref packed"] + s["critic after"]
    rows.append(["... with ppo.old_logprobs=rollout (no old pass; ref packed, critic)", three_before, reuse, three_before / reuse, "≤ 0.40", ""])
    both = s["ref packed"] + s["critic packed"]
    rows.append(["... with old_logprobs=rollout, critic_values=prefill (ref packed, critic packed)", three_before, both, three_before / both, "≤ 0.40", ""])
    both_prefill = s["old after (b)"] + s["ref packed"] + s["critic packed"]
    rows.append(["... with old_logprobs=prefill, critic_values=prefill (old b, ref packed, critic packed)", three_before, both_prefill, three_before / both_prefill, "≤ 0.40", ""])
    print(f"\n{device_name()}: 2B4T shape, {args.layers} layers, {args.seqs} seqs x {length} tokens, micro {args.micro}")
    print(table(["pass", "before s", "after s", "speedup", "target s", "agreement"], rows))


if __name__ == "__main__":
    main()
