"""Issue 16, item 4: SFT and GRPO with 1, 2 (and 4) processes, as a user runs them: throughput and
peak memory per GPU against one process, measured in the same run.

    python3 multi_gpu.py --processes 1,2 --work-dir /dev/shm              # nvidia-h200-x2, 2B4T shape
    python3 multi_gpu.py --processes 1,2,4 --work-dir /dev/shm            # nvidia-h200-x4
    OMP_NUM_THREADS=1 python3 multi_gpu.py --tiny --processes 1,2         # CPU check of the script (gloo)

Setup (once): a random BitNet (BitLinear; the 2B4T shape, or `--tiny`) saved with a word-level
tokenizer, an SFT file of random word sequences and a prompt file. Then for each process count N:
`bitnet-rl sft R --num-processes N` and `bitnet-rl ppo --recipe R --num-processes N`
(GRPO, a Python reward, packed rollouts) as subprocesses, with the same batch per process (weak
scaling: N processes train N times the tokens per step). Each run's `metrics.jsonl` gives the
figures: SFT tokens/s (global, median over steps after the first two), PPO seconds per
iteration and rollout tokens/s (median over iterations after `--warmup` ones: each new
sequence length can still tune packed-kernel tiles and specialize Triton kernels in the second
iteration, which made a 3-iteration run report DDP at half speed), and `memory/peak_gib` (the
largest allocation of any process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import SHAPE_2B4T, table  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)


def reward(prompts, completions, **meta):
    """A cheap reward with spread: the share of even word ids in the completion."""
    scores = []
    for completion in completions:
        ids = [int(w[1:]) for w in completion.split() if w[1:].isdigit()]
        scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return scores


def setup(args, work: Path) -> Path:
    """The model directory, the SFT data and the prompts under `work`."""
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint
    from ppo_iteration import word_tokenizer

    shape = TINY if args.tiny else SHAPE_2B4T
    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    config = BitNetConfig(num_hidden_layers=args.layers, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    with torch.device(device):
        model = BitNetForCausalLM(config).to(torch.float32 if args.tiny else torch.bfloat16)
    model_dir = save_checkpoint(to_bitlinear(model), word_tokenizer(shape["vocab_size"]), work / "model")
    del model
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, shape['vocab_size'])}" for _ in range(n))  # noqa: E731
    half = args.seq // 2
    with (work / "sft.jsonl").open("w") as f:
        for _ in range(args.batch * max(args.processes) * (args.steps + 1)):
            f.write(json.dumps({"prompt": words(half), "completion": " " + words(half - 1)}) + "\n")
    with (work / "prompts.jsonl").open("w") as f:
        for _ in range(args.prompts * max(args.processes) * (args.iterations + 1)):
            f.write(json.dumps({"prompt": words(args.prompt_len - 1)}) + "\n")
    return model_dir


def recipes(args, work: Path, model_dir: Path, n: int, strategy: str) -> dict[str, dict]:
    common = {
        "distributed": {"strategy": strategy},
        "model": {"path": str(model_dir), **({} if args.tiny else {"dtype": "bfloat16"})},
        "train": {"gradient_checkpointing": args.checkpointing, "compile": args.compile and not args.tiny},
        "logging": {"progress": False, "health_every": 0, "every": 1},
        "checkpoint": {"every": 0},
    }
    sft = {
        **common, "out": str(work / f"sft-{n}-{strategy}"), "data": {"path": str(work / "sft.jsonl"), "max_length": args.seq},
        "train": {**common["train"], "batch_size": args.batch, "max_steps": args.steps}, "optimizer": {"lr": 1e-5},
    }  # fmt: skip
    ppo = {
        **common, "out": str(work / f"ppo-{n}-{strategy}"),
        "rollout": {"backend": "packed", "max_new_tokens": args.new_tokens, "temperature": 1.0},
        "ppo": {
            "prompts": str(work / "prompts.jsonl"), "rewards": [{"source": f"python:{Path(__file__).resolve()}:reward"}],
            "advantage": "grpo", "samples_per_prompt": args.samples, "prompts_per_iteration": args.prompts, "iterations": args.iterations,
            "epochs": 1, "minibatch_size": args.minibatch, "micro_batch_size": args.micro, "kl_coef": 0.02, "kl_mode": "loss",
            "kl_estimator": "k3", "eval_prompts": 0,
        },
        "optimizer": {"lr": 1e-6},
    }  # fmt: skip
    return {"sft": sft, "ppo": ppo}


def run_command(command: str, recipe: dict, n: int, work: Path, timeout: int) -> list[dict]:
    """`bitnet-rl sft R` or `bitnet-rl ppo --recipe R`, with `--num-processes N`; its metrics rows."""
    path = Path(recipe["out"] + ".json")
    path.write_text(json.dumps(recipe))  # YAML is a superset of JSON
    recipe_args = [str(path)] if command == "sft" else ["--recipe", str(path)]  # sft takes the recipe as its argument
    cmd = [sys.executable, "-m", "bitnet_rl.cli", command, *recipe_args, "--overwrite"] + (["--num-processes", str(n)] if n > 1 else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"{command} with {n} process(es), {recipe['distributed']['strategy']}: {time.perf_counter() - start:.0f} s", flush=True)
    return [json.loads(line) for line in (Path(recipe["out"]) / "metrics.jsonl").read_text().splitlines()]


PHASES = ("time/generate", "time/score", "time/logprobs", "time/train")


def summarize(command: str, rows: list[dict], warmup: int = 2) -> dict[str, float]:
    """Medians after the warm-up steps (SFT: 2 steps; PPO: `warmup` iterations) and the peak."""
    peak = max((r.get("memory/peak_gib", 0.0) for r in rows), default=0.0)
    if command == "sft":
        warm = rows[2:] or rows[-1:]
        return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm), "peak": peak}
    warm = rows[warmup:] or rows[-1:]
    seconds = [sum(r[k] for k in PHASES) for r in warm]
    return {"seconds": statistics.median(seconds), **{k: statistics.median(r[k] for r in warm) for k in PHASES}, "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in warm), "peak": peak}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--commands", type=lambda s: s.split(","), default=["sft", "ppo"], help="which of sft, ppo to run")
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=["ddp", "fsdp2"], help="distributed.strategy values for N > 1 (1 process: ddp)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (checks the script, not the GPUs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 30; 2 with --tiny)")
    parser.add_argument("--seq", type=int, default=1024, help="SFT sequence length")
    parser.add_argument("--batch", type=int, default=4, help="SFT sequences per process and step (4 x 1024 tokens: the PPO update's 16 x 256)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="GRPO prompts per process and iteration")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="PPO iterations left out of the medians")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (off: faster, more memory)")
    parser.add_argument("--compile", action="store_true", help="train.compile")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per command")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = 2 if args.tiny else 30
    if args.tiny:
        args.strategies = [s for s in args.strategies if s != "fsdp2"] or ["ddp"]  # accelerate runs CPU workers with DDP only
        args.seq, args.batch, args.prompt_len, args.new_tokens = min(args.seq, 64), min(args.batch, 4), min(args.prompt_len, 16), min(args.new_tokens, 8)
        args.prompts, args.minibatch, args.micro = min(args.prompts, 4), min(args.minibatch, 8), min(args.micro, 8)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(dir=args.work_dir))
    t0 = time.perf_counter()
    model_dir = setup(args, work)
    print(f"setup {time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    runs = [(n, strategy) for n in args.processes for strategy in (["ddp"] if n == 1 else args.strategies)]
    for n, strategy in runs:
        for command, recipe in recipes(args, work, model_dir, n, strategy).items():
            if command not in args.commands:
                continue
            results[(command, n, strategy)] = summarize(command, run_command(command, recipe, n, work, args.timeout), args.warmup)
            print(json.dumps({"command": command, "processes": n, "strategy": strategy, **results[(command, n, strategy)]}), flush=True)
    where = "CPU (gloo), tiny model" if args.tiny else f"{torch.cuda.get_device_name()}, 2B4T shape, {args.layers} layers"
    if "sft" in args.commands:
        base = results[("sft", *runs[0])]["tokens_per_s"]
        rows = [[n, s, r["tokens_per_s"], r["tokens_per_s"] / n, r["tokens_per_s"] / base, r["peak"]] for n, s in runs for r in [results[("sft", n, s)]]]
        print(f"\n{where}; SFT: {args.batch} x {args.seq} tokens per process and step")
        print(table(["processes", "strategy", "tokens/s", "tokens/s per process", f"vs {runs[0][0]}", "peak GiB per GPU"], rows))
    if "ppo" in args.commands:
        samples = {(n, s): args.prompts * args.samples * n / results[("ppo", n, s)]["seconds"] for n, s in runs}
        rows = [[n, s, r["seconds"], samples[n, s], samples[n, s] / samples[runs[0]], r["rollout_tokens_per_s"], r["peak"]]
                for n, s in runs for r in [results[("ppo", n, s)]]]  # fmt: skip
        print(f"\nGRPO: {args.prompts} prompts x {args.samples} samples per process, {args.prompt_len} + {args.new_tokens} tokens")
        print(table(["processes", "strategy", "s per iteration", "samples/s", f"vs {runs[0][0]}", "rollout tokens/s", "peak GiB per GPU"], rows))
        print(f"\nGRPO phases (s, median over iterations after the first {args.warmup}; the slowest rank's)")
        print(table(["processes", "strategy", *(k.split("/")[1] for k in PHASES)], [[n, s, *(results[("ppo", n, s)][k] for k in PHASES)] for n, s in runs]))
    return {f"{c}-{n}-{s}": v for (c, n, s), v in results.items()}


if __name__ == "__main__":
    main()
