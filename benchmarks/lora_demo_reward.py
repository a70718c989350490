"""Held-out demo-task reward after the same number of DPO steps: full fine-tuning vs pre_quant vs post_quant LoRA (CPU).

A tiny BitNet model is SFT-trained on the demo task (sorting digits), then DPO runs on demo
preference pairs for `--steps` steps in each mode. Reported per mode and seed: held-out pairwise
accuracy and margin (implicit reward of chosen > rejected on the validation pairs) and the demo
reward of greedy completions of 256 held-out prompts. LoRA runs keep their adapter (`lora.merge: false`)
so the reward is measured twice: the adapted model as trained, and merged into the ternary weights
(what a ternary deployment gets; for pre_quant the two must agree, for post_quant the merge is re-quantized).

    OMP_NUM_THREADS=1 python benchmarks/lora_demo_reward.py --steps 60 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

REWARD = "reward_models.demo_task:reward"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def heldout_reward(model_or_dir, tokenizer, n: int = 256) -> float:
    from bitnet_rl.data.demo import make_prompts
    from bitnet_rl.eval.task import sample, score_samples, task_metrics
    from bitnet_rl.models.io import load_policy
    from bitnet_rl.rewards import load_reward
    from bitnet_rl.rollout import make_generator

    policy = load_policy(model_or_dir).eval() if isinstance(model_or_dir, (str, Path)) else model_or_dir.eval()
    generator = make_generator(policy, "policy", max_batch_size=n, max_seq_len=48)
    drawn = sample(generator, tokenizer, make_prompts(n, seed=11), 12, temperature=0.0, seed=3, batch_size=n)
    return task_metrics(drawn, score_samples(drawn, load_reward(REWARD)))["reward"]


def sft(out: Path, steps: int) -> Path:
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.sft import run_sft

    recipe = {
        "out": str(out), "model": {"tiny": TINY}, "quant": {"schedule": {"kind": "linear", "warmup_steps": 60}},
        "data": {"path": "demo", "demo_size": 2000, "max_length": 32}, "optimizer": {"lr": 3e-3},
        "scheduler": {"warmup_steps": 10}, "train": {"max_steps": steps, "batch_size": 32},
        "logging": {"progress": False, "health_every": 0},
    }  # fmt: skip
    return run_sft(validate(Recipe, recipe, "sft"))


def dpo(out: Path, model: Path, mode: str, lr: float, steps: int, seed: int) -> tuple[Path, dict]:
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.dpo import DPO_DEFAULTS, run_dpo

    recipe = {
        **DPO_DEFAULTS, "out": str(out), "model": {"path": str(model)},
        "data": {"path": "demo", "format": "prefs", "demo_size": 600, "max_length": 32, "max_prompt_length": 16, "val_fraction": 0.1},
        "optimizer": {"lr": lr}, "scheduler": {"kind": "constant", "warmup_steps": 5},
        "train": {"max_steps": steps, "batch_size": 16, "seed": seed}, "logging": {"progress": False, "health_every": 10},
    }  # fmt: skip
    if mode != "full":
        recipe["lora"] = {"enabled": True, "mode": mode, "r": 8, "alpha": 16, "merge": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = run_dpo(validate(Recipe, recipe, "dpo"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    flips = [r["flip_rate"] for r in rows if "flip_rate" in r]
    return final, {"val_accuracy": rows[-1]["val_accuracy"], "val_margin": rows[-1]["val_margin"], "mean_flip_rate": sum(flips) / max(len(flips), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr-full", type=float, default=5e-3)
    parser.add_argument("--lr-lora", type=float, default=5e-3)
    parser.add_argument("--modes", nargs="+", default=["full", "pre_quant", "post_quant"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from bitnet_rl.models.io import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = sft(root / "sft", args.sft_steps)
        tokenizer = load_tokenizer(start)
        print(f"SFT start: held-out greedy reward {heldout_reward(start, tokenizer):.3f}")
        print("| mode | lr | seed | val accuracy | val margin | mean flip rate /10 steps | held-out reward, as trained | held-out reward, merged ternary |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in args.modes:
            lr = args.lr_full if mode == "full" else args.lr_lora
            for seed in args.seeds:
                final, stats = dpo(root / f"{mode}-{seed}", start, mode, lr, args.steps, seed)
                if mode == "full":
                    trained = merged = heldout_reward(final, tokenizer)
                else:
                    from bitnet_rl.lora.merge import load_adapter, merge_saved_adapter
                    from bitnet_rl.models.io import load_policy

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        trained = heldout_reward(load_adapter(load_policy(final), final), tokenizer)
                        merged = heldout_reward(merge_saved_adapter(load_policy(final), final), tokenizer)
                row = f"| {mode} | {lr:g} | {seed} | {stats['val_accuracy']:.3f} | {stats['val_margin']:.3f} | {stats['mean_flip_rate']:.4f} | {trained:.3f} | {merged:.3f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
