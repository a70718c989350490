"""Before/after table of two `generate.py --json … --tokens …` runs (same machine, same command).

    python benchmarks/compare_generate.py before.json after.json [--tokens before.pt after.pt]

Typical use on one GPU: run `generate.py` once with the previous checkout on PYTHONPATH and
once with this one, then compare. Prints tokens/s and ms per decode step with ratios, the
issue's targets, and whether the greedy completions are identical row for row.
"""

from __future__ import annotations

import argparse
import json

TARGETS = {1: "≤ 0.70 ms/step", 64: "≥ 40,000 tok/s", 256: "≥ 70,000 tok/s"}


def token_agreement(before, after) -> str:
    if before.shape != after.shape:
        return f"shapes differ {tuple(before.shape)} vs {tuple(after.shape)}"
    same_rows = int((before == after).all(1).sum())
    same = (before == after).float().mean().item()
    return f"{same_rows}/{before.shape[0]} rows identical, {100 * same:.2f}% of tokens"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tokens", nargs=2, default=None)
    args = parser.parse_args()
    before, after = (json.load(open(p)) for p in (args.before, args.after))
    tokens = None
    if args.tokens:
        import torch

        tokens = [torch.load(p) for p in args.tokens]
    print("\n## Decode before (previous code) / after (this branch), same run\n")
    print("| batch | before tok/s | after tok/s | speedup | before ms/step | after ms/step | target | greedy tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for b, a in after["ours"].items():
        o = before["ours"].get(b)
        agree = token_agreement(tokens[0][int(b)], tokens[1][int(b)]) if tokens else "—"
        if o is None:
            print(f"| {b} | — | {a['tok_s']:.0f} | — | — | {a['ms_token']:.3f} | {TARGETS.get(int(b), '')} | {agree} |")
            continue
        print(f"| {b} | {o['tok_s']:.0f} | {a['tok_s']:.0f} | {a['tok_s'] / o['tok_s']:.2f}× | {o['ms_token']:.3f} | "
              f"{a['ms_token']:.3f} | {TARGETS.get(int(b), '')} | {agree} |")


if __name__ == "__main__":
    main()
