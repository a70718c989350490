"""Decode with and without programmatic dependent launch (PDL), in one process on one GPU.

    python benchmarks/decode_pdl.py [--layers 30] [--batch 1,64,256] [--new-tokens 128] [--rounds 2]

One `PackedGenerator` on the 2B4T shape (random weights, greedy, prompt 128, no stop tokens), its
tiles tuned once. For each batch size and variant the decode graphs are captured again and one
`generate` call is timed (ms/token = (total − prefill-only call) / (new − 1), as generate.py):
- off: the generator's `KernelTuner.pdl` False, the kernels launched one after another;
- pdl: `pdl` True (the default), PDL on every Triton kernel over at most `PDL_MAX_ROWS` rows
  (tuner.py; larger batches run as off), the dp4a GEMV's weight tiles loaded one step ahead, the
  first before the wait.
The variants run in turn `--rounds` times (round-robin, so drift hits them alike); the table gives
the median per variant, the ratio to off, and the share of rows whose greedy tokens equal off's
first run (the lowest over rounds; "-" for off with one round). PDL changes no arithmetic and
split-K is deterministic, so every run should give the same tokens: 1.00 is the expected value.
(Before split-K was made deterministic, its float32 atomics flipped near-tied tokens of this
random-weight model between runs of the same code: 0.00-0.03.) Exactness against the CPU
reference is tests/quant/test_kernels.py's job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import table  # noqa: E402
from generate import build_policy, decode_ms, time_greedy  # noqa: E402

VARIANTS = {"off": False, "pdl": True}


def set_variant(gen, name: str) -> None:
    """Switch the generator's kernels to `name` and drop the captured graphs (they hold the old launches)."""
    gen.tuner.kernels.pdl = VARIANTS[name]
    gen.reset_graphs()
    torch.cuda.synchronize()


def measure(gen, prompts: list[list[int]], new_tokens: int) -> tuple[float, torch.Tensor]:
    total_s, prefill_s, out = time_greedy(gen, prompts, new_tokens, gen.device)  # its warm-up call captures the graphs
    return decode_ms(total_s, prefill_s, new_tokens), out.completion_ids.cpu()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", default="1,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jsonl", default=None, help="append each measurement to this file")
    args = parser.parse_args(argv)
    from bitnet_rl.quant.kernels.backend import pdl_supported
    from bitnet_rl.rollout import PackedGenerator

    batches = [int(b) for b in args.batch.split(",")]
    variants = args.variants.split(",")
    torch.manual_seed(0)
    model = build_policy(types.SimpleNamespace(layers=args.layers, tiny=False), torch.device("cuda"))
    gen = PackedGenerator.from_model(model, max_batch_size=max(batches), max_seq_len=args.prompt + args.new_tokens)
    print(f"{torch.cuda.get_device_name()}, PDL supported: {pdl_supported(0)}", flush=True)
    results: dict = {}
    for b in batches:
        prompts = torch.randint(1000, 100000, (b, args.prompt), generator=torch.Generator().manual_seed(b)).tolist()
        for r in range(args.rounds):
            for name in variants:
                set_variant(gen, name)
                ms, tokens = measure(gen, prompts, args.new_tokens)
                first = results.get((b, "off"), {}).get("tokens", tokens)
                rows_same = float((tokens == first).all(dim=1).float().mean())
                entry = results.setdefault((b, name), {"ms": [], "tokens": tokens, "rows_same": []})
                entry["ms"].append(ms)
                if (b, name, r) != (b, "off", 0):
                    entry["rows_same"].append(rows_same)
                line = {"batch": b, "variant": name, "round": r, "ms_token": ms, "rows_equal_off_round0": rows_same}
                print(json.dumps(line), flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(line) + "\n")
    rows = []
    for b in batches:
        base = statistics.median(results[(b, "off")]["ms"])
        for name in variants:
            ms = statistics.median(results[(b, name)]["ms"])
            same = results[(b, name)]["rows_same"]
            rows.append([b, name, ms, b * 1e3 / ms, base / ms, min(same) if same else "-"])
    print(f"\nDecode, {args.layers} layers, prompt {args.prompt}, {args.new_tokens} new tokens, greedy; median of {args.rounds} rounds")
    print(table(["batch", "variant", "ms/token", "decode tokens/s", "speed vs off", "share of rows equal to off's first run"], rows))


if __name__ == "__main__":
    main()
