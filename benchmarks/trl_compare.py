"""One GRPO iteration: bitnet-rl vs what a TRL user runs, same model shape, prompts, samples and tokens.

    python benchmarks/trl_compare.py --layers 30 --prompts 16 --samples 4 --prompt-len 128 --new-tokens 128

All in one process, random weights (2B4T shape), 16 prompts × 4 samples × 128 new tokens,
minibatches of 16 (4 optimizer steps per iteration), no activation checkpointing:
- bitnet-rl: `benchmarks/ppo_iteration.py`'s PPOTrainer with `advantage: grpo` (PackedGenerator
  rollouts, learned 2-bit reward model, 2-bit reference, BitLinear policy), second iteration;
- stand-in: transformers `generate` (AutoBitLinear online quantization, bf16, sampling) + an
  old-log-prob pass + a plain PyTorch clipped-surrogate update (full logits, fused AdamW),
  second iteration;
- TRL `GRPOTrainer` on the same AutoBitLinear model (transformers generation, `beta=0`, a
  Python reward), seconds per generation round (4 optimizer steps), second round; skipped
  with the reason when TRL or `datasets` cannot be imported.
The rewards differ (learned RM for ours, a cheap Python function for the others), which only
favours the baselines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import bitnet_2b4t, device_name, table


def online_bitnet_dir(layers: int, work: Path, tokenizer) -> Path:
    """A saved random 2B4T model whose config asks transformers for online AutoBitLinear."""
    model = bitnet_2b4t(layers, dtype=torch.bfloat16, device="cuda")
    model.config.quantization_config = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    out = work / "online"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def prompt_ids(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g)
    return ids.repeat_interleave(args.samples, dim=0)


def stand_in(path: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)
    ids = prompt_ids(args, model.config.vocab_size).cuda()
    times = {}
    for _ in range(2):
        t = [time.perf_counter()]
        model.eval()
        with torch.no_grad():
            seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        rewards = torch.randn(seqs.shape[0], device="cuda")
        groups = rewards.view(-1, args.samples)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
        p = ids.shape[1]

        def logps(rows):
            logits = model(seqs[rows]).logits[:, p - 1 : -1].float()
            return logits.log_softmax(-1).gather(-1, seqs[rows, p:, None]).squeeze(-1)

        with torch.no_grad():
            old = torch.cat([logps(torch.arange(i, i + args.minibatch)) for i in range(0, seqs.shape[0], args.minibatch)])
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        model.train()
        for i in range(0, seqs.shape[0], args.minibatch):
            rows = torch.arange(i, i + args.minibatch)
            new = logps(rows)
            ratio = torch.exp(new - old[rows])
            a = adv[rows, None]
            loss = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        times = {"generate": t[1] - t[0], "logprobs": t[2] - t[1], "train": t[3] - t[2], "iteration": t[3] - t[0]}
        print(f"stand-in: {times}", flush=True)
    del model, opt
    torch.cuda.empty_cache()
    return times


def trl_grpo(path: Path, args, tokenizer, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ids = prompt_ids(args, tokenizer.vocab_size)[:: args.samples]
    prompts = [" ".join(f"w{i}" for i in row.tolist()) for row in ids]
    dataset = Dataset.from_dict({"prompt": prompts * 4})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

    def reward(completions, **_):
        return [float(len(c)) for c in completions]

    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.minibatch, steps_per_generation=args.prompts * args.samples // args.minibatch,
        num_generations=args.samples, max_completion_length=args.new_tokens, temperature=1.0, beta=0.0, num_iterations=1,
        max_steps=2 * args.prompts * args.samples // args.minibatch, learning_rate=1e-6, bf16=True, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, shuffle_dataset=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    steps = args.prompts * args.samples // args.minibatch
    rounds = [marks[steps - 1] - start, marks[2 * steps - 1] - marks[steps - 1]]
    lengths = [r.get("completions/mean_length") for r in trainer.state.log_history if "completions/mean_length" in r]
    print(f"TRL rounds {rounds}, mean completion lengths {lengths}", flush=True)
    del trainer, model
    torch.cuda.empty_cache()
    return {"iteration": rounds[1], "first": rounds[0], "mean_length": lengths[-1] if lengths else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma list of ours,standin,trl to skip")
    args = parser.parse_args()
    skip = set(args.skip.split(","))

    import ppo_iteration

    rows = []
    ours = None
    if "ours" not in skip:
        record = ppo_iteration.run(ppo_iteration.parse([
            "--layers", str(args.layers), "--prompts", str(args.prompts), "--samples", str(args.samples), "--advantage", "grpo",
            "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--minibatch", str(args.minibatch),
            "--micro", str(args.minibatch), "--no-checkpointing",
        ]))
        ours = record["iteration_s"]
        rows.append(["bitnet-rl GRPO (PackedGenerator + 2-bit RM/ref + BitLinear update)", record["time/generate"], record["time/score"] + record["time/logprobs"], record["time/train"], ours, 1.0])
        torch.cuda.empty_cache()
    work = Path(tempfile.mkdtemp())
    tokenizer = ppo_iteration.word_tokenizer(128256)
    path = online_bitnet_dir(args.layers, work, tokenizer)
    if "standin" not in skip:
        s = stand_in(path, args)
        rows.append(["stand-in: transformers generate (AutoBitLinear online) + PyTorch update", s["generate"], s["logprobs"], s["train"], s["iteration"], s["iteration"] / ours if ours else float("nan")])
    if "trl" not in skip:
        try:
            t = trl_grpo(path, args, tokenizer, work)
            rows.append([f"TRL GRPOTrainer (AutoBitLinear online; mean completion {t['mean_length']:.0f} tokens)", "", "", "", t["iteration"], t["iteration"] / ours if ours else float("nan")])
        except Exception as err:  # noqa: BLE001 - report why TRL could not run
            print(f"TRL GRPOTrainer not measured: {type(err).__name__}: {str(err)[:400]}")
    print(f"\n{device_name()}: one GRPO iteration, 2B4T shape, {args.layers} layers, {args.prompts} prompts x {args.samples} samples, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, minibatch {args.minibatch}, no checkpointing (second iteration)")
    print(table(["system", "generate s", "score + log-probs s", "train s", "iteration s", "× bitnet-rl"], rows))
    print(json.dumps({"rows": rows}, default=str))


if __name__ == "__main__":
    main()
