"""One PPO iteration on the BitNet b1.58 2B4T shape: peak GPU memory and the time split.

Policy (bf16 master weights, BitLinear, AdamW), critic (a copy of the policy with a value
head, AdamW), reference (frozen 2-bit ternary copy) and a learned reward model (frozen, 2-bit
packed), all 30 layers, random weights, a word-level tokenizer with the 2B4T vocabulary
built locally. Rollouts come from the PackedGenerator.

    python benchmarks/ppo_iteration.py --layers 30 --prompts 64 --prompt-len 128 --new-tokens 128
    python benchmarks/ppo_iteration.py --advantage grpo --samples 4 --prompts 16 ...   (GRPO: no critic)

`--prompts` counts distinct prompts; each is sampled `--samples` times (64 sequences either way
in the issue's setting: 64 × 1 for PPO, 16 × 4 for GRPO).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import bitnet_2b4t, device_name, now_gib, peak_gib, reset_peak, table


def word_tokenizer(vocab_size: int):
    """A WordLevel tokenizer whose ids are words `w<id>` (so decode/encode round-trip any id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--advantage", default="gae", choices=["gae", "grpo"])
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (GRPO needs >= 2)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile of the decoder layers")
    parser.add_argument("--skip-final-save", action="store_true", help="do not write the final checkpoint (~30 GB; not part of an iteration)")
    parser.add_argument("--old-logprobs", default="policy", choices=["policy", "prefill", "rollout"], help="ppo.old_logprobs (rollout sets rollout_correction=none)")
    parser.add_argument("--work-dir", default=None, help="where the setup writes its checkpoints (default: a temp dir; /dev/shm saves disk time)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Build, run two iterations, print the tables; returns the second iteration's metrics record."""
    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint
    from bitnet_rl.models.value import load_scalar_model
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.ppo import PPOTrainer

    work = Path(tempfile.mkdtemp(dir=args.work_dir))
    tokenizer = word_tokenizer(128256)
    t0 = time.perf_counter()
    model = to_bitlinear(bitnet_2b4t(args.layers, dtype=torch.bfloat16, device="cuda"))
    policy_dir = save_checkpoint(model, tokenizer, work / "policy")
    del model
    rm = load_scalar_model(policy_dir, dtype=torch.bfloat16)
    rm_dir = save_checkpoint(rm, tokenizer, work / "rm")
    (rm_dir / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    del rm
    rng = random.Random(0)
    with (work / "prompts.jsonl").open("w") as handle:
        for _ in range(args.prompts):
            handle.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(3, 128256)}" for _ in range(args.prompt_len - 1))}) + "\n")
    setup_s = time.perf_counter() - t0
    print(f"setup (build + save policy and reward model) {setup_s:.0f} s", flush=True)

    recipe = validate(
        Recipe,
        {
            "out": str(work / "run"),
            "model": {"path": str(policy_dir), "dtype": "bfloat16"},
            "rollout": {"backend": "packed", "max_new_tokens": args.new_tokens, "temperature": 1.0},
            "ppo": {
                "rewards": [{"source": str(rm_dir)}],
                "prompts": str(work / "prompts.jsonl"),
                "iterations": 2,
                "prompts_per_iteration": args.prompts,
                "advantage": args.advantage,
                "samples_per_prompt": args.samples,
                **({"critic": "policy"} if args.advantage == "gae" else {}),
                "epochs": 1,
                "minibatch_size": args.minibatch,
                "micro_batch_size": args.micro,
                "old_logprobs": args.old_logprobs,
                **({"rollout_correction": "none"} if args.old_logprobs == "rollout" else {}),
            },
            "train": {"gradient_checkpointing": not args.no_checkpointing, "compile": args.compile},
            "optimizer": {"lr": 1e-6},
            "logging": {"progress": False, "health_every": 0},
        },
        "benchmark",
    )
    torch.cuda.empty_cache()
    reset_peak()
    base = now_gib()
    trainer = PPOTrainer(recipe)
    loaded = now_gib() - base
    parts = {
        "policy (bf16 master)": sum(p.numel() * p.element_size() for p in trainer.policy.parameters()),
        "critic (bf16 master)": sum(p.numel() * p.element_size() for p in trainer.critic.parameters()) if trainer.critic is not None else 0,
        "reference (2-bit ternary)": sum(t.numel() * t.element_size() for t in list(trainer.reference.parameters()) + list(trainer.reference.buffers())),
        "reward model (2-bit ternary)": sum(t.numel() * t.element_size() for t in list(trainer.reward.model.parameters()) + list(trainer.reward.model.buffers())),
    }
    print(f"trainer built {time.perf_counter() - t0 - setup_s:.0f} s after setup", flush=True)
    _report_phases(trainer)
    if args.skip_final_save:
        trainer.run.save = lambda path: path  # benchmark only: the final checkpoint is outside the timed phases
    t0 = time.perf_counter()
    trainer.train()
    iteration_s = time.perf_counter() - t0
    peak = peak_gib()
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    record = rows[-1]
    print(f"\n{device_name()}: 2B4T shape, {args.layers} layers; {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"{args.advantage} x {args.samples} samples, "
          f"PPO epochs 1, minibatch {args.minibatch} (micro {args.micro}), gradient checkpointing {not args.no_checkpointing}, compile {args.compile}, "
          f"old log-probs {args.old_logprobs}, AdamW on bf16 params")
    mem_rows = [[name, size / 2**30] for name, size in parts.items()]
    mem_rows.append(["all models + generator after setup", loaded])
    mem_rows.append(["peak during the iteration (incl. optimizer states, KV cache, activations)", peak])
    print(table(["component", "GiB"], mem_rows))
    first = rows[0]
    phases = ("time/generate", "time/score", "time/logprobs", "time/train")
    labels = ("generate (PackedGenerator)", "score (reward model)", "log-probs: policy (old), reference, critic values", "train (policy + critic update)")
    split = [[label, first[key], record[key]] for label, key in zip(labels, phases)]
    split.append(["iteration (sum of phases)", sum(first[k] for k in phases), sum(record[k] for k in phases)])
    split.append(["rollout tokens/s", first["rollout_tokens_per_s"], record["rollout_tokens_per_s"]])
    print(table(["phase", "iteration 1 s (incl. kernel tuning + graph capture)", "iteration 2 s"], split))
    print(f"two iterations{'' if args.skip_final_save else ' + final checkpoint (policy, critic, optimizers)'} {iteration_s:.0f} s")
    print(f"setup (build + save + load dirs) {setup_s:.0f} s; fits one 80 GB GPU: {'yes' if peak < 79 else 'no'} (peak {peak:.1f} GiB)")
    del trainer
    shutil.rmtree(work, ignore_errors=True)  # ~30 GB of checkpoints
    return {**record, "iteration_s": sum(record[k] for k in phases), "peak_gib": peak}


def _report_phases(trainer) -> None:
    """Print each iteration's phase times as they finish (so a run cut short still says where time went)."""
    rollout, update = trainer.rollout, trainer.update

    def timed_rollout(*a, **k):
        exp, stats, completions = rollout(*a, **k)
        print({key: round(value, 3) for key, value in stats.items() if key.startswith("time/")}, flush=True)
        return exp, stats, completions

    def timed_update(*a, **k):
        t0 = time.perf_counter()
        out = update(*a, **k)
        torch.cuda.synchronize()
        print(f"time/train {time.perf_counter() - t0:.3f}", flush=True)
        return out

    trainer.rollout, trainer.update = timed_rollout, timed_update


def main() -> None:
    run(parse())


if __name__ == "__main__":
    main()
