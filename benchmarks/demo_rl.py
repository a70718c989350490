"""Reproducers for the README's "RL" claims on the demo task (sorting digits), on CPU.

    python benchmarks/demo_rl.py sft --steps 800                 # SFT ceiling of the quickstart's shape
    python benchmarks/demo_rl.py sft --steps 120 --layers 4 --hidden 128 --intermediate 344
    python benchmarks/demo_rl.py grpo --sft runs/demo-rl/sft-120/sft/final            # the quickstart's GRPO stage
    python benchmarks/demo_rl.py grpo --sft ... --set '{"ppo": {"dynamic_sampling": false}}' --seed 1
    python benchmarks/demo_rl.py grpo --sft ... --advantages positive   # only positive (negative) GRPO advantages, or raw (r - mean)
    python benchmarks/demo_rl.py split CHECKPOINT                 # greedy / sampled / pass@8, repeats vs none
    python benchmarks/demo_rl.py own-samples CHECKPOINT own.jsonl # its right answers to 1024 RL prompts x 8 samples
    python benchmarks/demo_rl.py continue CHECKPOINT --data own.jsonl --lr 1e-3   # more SFT (--data demo: reference answers)

`sft` runs the quickstart's SFT recipe (cosine schedule stretched over --steps) from a random
model of the given shape; `grpo` runs the quickstart's GRPO stage (`--set` overrides recipe
sections, `--reward` swaps the reward); both print one JSON line with greedy accuracy on the
quickstart's 256 held-out prompts and the seconds taken. Run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bitnet_rl.quickstart as qs
from bitnet_rl.data.demo import make_prompts
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.recipe import Recipe, validate


def greedy_accuracy(checkpoint: Path) -> float:
    from bitnet_rl.eval import core
    from reward_models.demo_task import is_correct

    policy = core.load_model("policy", checkpoint, "packed", "cpu", max_batch_size=64, max_seq_len=64)
    drawn = core.draw(policy, make_prompts(qs.EVAL_PROMPTS, seed=1), 1, 0.0, qs.MAX_NEW_TOKENS, seed=0, batch_size=64)
    return sum(is_correct(p, c) for p, c in zip(drawn.prompts, drawn.completions)) / len(drawn.prompts)


def run_sft(args) -> dict:
    shape = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": args.intermediate}
    shipped = qs.shipped_recipe
    qs.tiny_shape = lambda: shape  # stage_init reads it
    qs.shipped_recipe = lambda name: {**shipped(name), "checkpoint": {"every": 100_000, "keep_last": 1}} if name == "sft" else shipped(name)
    torch.manual_seed(0)
    ctx = qs.Context(out=Path(args.out), steps=args.steps, progress=False)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.checkpoints["init"] = qs.stage_init(ctx)
    t0 = time.perf_counter()
    final = qs.stage_sft(ctx)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in load_policy(final).parameters())
    return {"shape": shape, "params": params, "steps": args.steps, "accuracy": greedy_accuracy(final), "sft_seconds": round(seconds, 1), "checkpoint": str(final)}


def patch_advantages(kind: str) -> None:
    """Replace GRPO's (r - mean) / (std + eps) for this process: keep only its positive or negative part, or drop the std."""
    from bitnet_rl.rl import estimators

    grpo = estimators.grpo_advantages

    def patched(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
        if kind == "raw":
            grouped = scores.view(-1, group_size)
            return (grouped - grouped.mean(1, keepdim=True)).view(-1)
        advantages = grpo(scores, group_size, eps=eps)
        return advantages.clamp(min=0) if kind == "positive" else advantages.clamp(max=0)

    estimators.grpo_advantages = patched


def run_grpo(args) -> dict:
    from bitnet_rl.train.ppo import run_ppo

    if args.advantages != "grpo":
        patch_advantages(args.advantages)
    data = qs.shipped_recipe("grpo")
    data["ppo"]["rewards"] = [{"source": args.reward}]
    for section, values in json.loads(args.set).items():
        data.setdefault(section, {}).update(values)
    data.update(out=args.out, model={"path": args.sft})
    data.setdefault("train", {})["seed"] = args.seed
    data["logging"] = dict(data["logging"], progress=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    final = run_ppo(validate(Recipe, data, "demo_rl grpo"), overwrite=True)
    seconds = time.perf_counter() - t0
    return {"set": json.loads(args.set), "reward": args.reward, "advantages": args.advantages, "seed": args.seed, "accuracy": greedy_accuracy(final), "seconds": round(seconds, 1)}


def run_split(args) -> dict:
    """Greedy, sampled (T=1) and pass@8 accuracy on the held-out prompts, for lists with and without a repeated digit."""
    from bitnet_rl.rollout import make_generator
    from reward_models.demo_task import is_correct, parse_prompt

    policy, tokenizer = load_policy(args.checkpoint).eval(), load_tokenizer(args.checkpoint)
    generator = make_generator(policy, "packed", max_batch_size=512, max_seq_len=64)
    prompts = make_prompts(qs.EVAL_PROMPTS, seed=1)

    def correct(k: int, temperature: float) -> torch.Tensor:
        rows = []
        for i in range(0, len(prompts), 64):
            repeated = [p for p in prompts[i : i + 64] for _ in range(k)]
            out = generator.generate([tokenizer(p)["input_ids"] for p in repeated], max_new_tokens=qs.MAX_NEW_TOKENS, temperature=temperature, stop_token_ids=[tokenizer.eos_token_id], seed=i)
            texts = tokenizer.batch_decode(out.completions(), skip_special_tokens=True)
            rows.append(torch.tensor([is_correct(p, c) for p, c in zip(repeated, texts)], dtype=torch.float).view(-1, k))
        return torch.cat(rows)

    greedy, sampled = correct(1, 0.0)[:, 0], correct(8, 1.0)
    repeats = torch.tensor([len(set(parse_prompt(p))) < len(parse_prompt(p)) for p in prompts])
    result = {}
    for name, rows in (("all", torch.ones_like(repeats)), ("repeats", repeats), ("no_repeats", ~repeats)):
        result[name] = {
            "prompts": int(rows.sum()), "greedy": round(float(greedy[rows].mean()), 3), "sampled": round(float(sampled[rows].mean()), 3),
            "pass@8": round(float((sampled[rows].sum(1) > 0).float().mean()), 3),
        }  # fmt: skip
    return result


def run_own_samples(args) -> dict:
    """The checkpoint's right answers (T=1) to the quickstart's 1024 RL prompts, 8 samples each, as SFT records."""
    from bitnet_rl.rollout import make_generator
    from reward_models.demo_task import is_correct, parse_prompt

    policy, tokenizer = load_policy(args.checkpoint).eval(), load_tokenizer(args.checkpoint)
    generator = make_generator(policy, "packed", max_batch_size=512, max_seq_len=64)
    prompts, records = make_prompts(qs.shipped_recipe("grpo")["ppo"]["num_prompts"], seed=0), []
    for i in range(0, len(prompts), 64):
        repeated = [p for p in prompts[i : i + 64] for _ in range(8)]
        out = generator.generate([tokenizer(p)["input_ids"] for p in repeated], max_new_tokens=qs.MAX_NEW_TOKENS, temperature=1.0, stop_token_ids=[tokenizer.eos_token_id], seed=i)
        texts = tokenizer.batch_decode(out.completions(), skip_special_tokens=True)
        records += [{"prompt": p, "completion": c} for p, c in zip(repeated, texts) if is_correct(p, c)]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    repeats = sum(len(set(parse_prompt(r["prompt"]))) < len(parse_prompt(r["prompt"])) for r in records)
    return {"records": len(records), "on_lists_with_repeats": repeats, "out": args.out}


def run_continue(args) -> dict:
    """More SFT from a checkpoint (fresh optimizer, constant LR after 20 warm-up steps, batch 32)."""
    from bitnet_rl.train.sft import run_sft as sft

    data = qs.shipped_recipe("sft")["data"] if args.data == "demo" else {"path": args.data, "max_length": 32, "val_fraction": 0.05}
    recipe = {
        "out": args.out, "model": {"path": args.checkpoint}, "data": data, "optimizer": {"lr": args.lr},
        "scheduler": {"kind": "constant", "warmup_steps": 20}, "train": {"max_steps": args.steps, "batch_size": 32},
        "checkpoint": {"every": 100_000, "keep_last": 1}, "logging": {"every": 10, "health_every": 0, "progress": False},
    }  # fmt: skip
    torch.manual_seed(0)
    final = sft(validate(Recipe, recipe, "demo_rl continue"), overwrite=True)
    return {"data": args.data, "lr": args.lr, "steps": args.steps, "accuracy": greedy_accuracy(final)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft")
    sft.add_argument("--steps", type=int, default=120)
    sft.add_argument("--hidden", type=int, default=96)
    sft.add_argument("--layers", type=int, default=2)
    sft.add_argument("--intermediate", type=int, default=256)
    sft.add_argument("--out", default=None)
    grpo = sub.add_parser("grpo")
    grpo.add_argument("--sft", required=True, help="SFT checkpoint (e.g. a quickstart's OUT/sft/final)")
    grpo.add_argument("--set", default="{}", help="JSON {section: {key: value}} applied over the quickstart's GRPO recipe")
    grpo.add_argument("--reward", default=qs.GRPO_REWARD_SPEC)
    grpo.add_argument("--seed", type=int, default=0)
    grpo.add_argument("--advantages", choices=["grpo", "positive", "negative", "raw"], default="grpo")
    grpo.add_argument("--out", default="runs/demo-rl/grpo")
    split = sub.add_parser("split")
    split.add_argument("checkpoint")
    own = sub.add_parser("own-samples")
    own.add_argument("checkpoint")
    own.add_argument("out")
    cont = sub.add_parser("continue")
    cont.add_argument("checkpoint")
    cont.add_argument("--data", default="demo", help="`demo` (reference answers) or an SFT jsonl, e.g. from own-samples")
    cont.add_argument("--lr", type=float, default=1e-3)
    cont.add_argument("--steps", type=int, default=200)
    cont.add_argument("--out", default="runs/demo-rl/continue")
    args = parser.parse_args()
    if args.command == "sft" and args.out is None:
        args.out = f"runs/demo-rl/sft-{args.layers}x{args.hidden}-{args.steps}"
    commands = {"sft": run_sft, "grpo": run_grpo, "split": run_split, "own-samples": run_own_samples, "continue": run_continue}
    print(json.dumps(commands[args.command](args)))


if __name__ == "__main__":
    main()
