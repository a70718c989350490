"""On-disk size of each `bitnet-rl export` format: measured on a tiny model, computed for 2B4T.

    python benchmarks/export_sizes.py [--hidden 256 --layers 2 --intermediate 512]

The tiny model (random, tied embeddings, SiLU so every format accepts it) is exported for real
and its files are measured; the 2B4T rows apply the same layouts' byte counts to the
BitNet b1.58 2B4T shape (2-bit packed: 1/4 byte per ternary weight + a float32 scale per
tensor; TQ2_0: 66 bytes per 256 weights; TQ1_0: 54; bf16 tensors 2 bytes; GGUF norms float32).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SHAPE_2B4T

PROJECTIONS = 7


def shape_counts(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int) -> dict[str, int]:
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate
    return {"ternary": layers * per_layer, "embed": vocab * hidden, "norms": layers * (3 * hidden + intermediate) + hidden, "tensors": layers * PROJECTIONS}


def computed_sizes(counts: dict[str, int], tied: bool) -> dict[str, int]:
    heads = 1 if tied else 2  # embedding (+ separate lm_head)
    dense = counts["embed"] * heads
    return {
        "bf16 (master weights)": 2 * (counts["ternary"] + dense + counts["norms"]),
        "packed (2-bit + bf16)": counts["ternary"] // 4 + 4 * counts["tensors"] + 2 * (dense + counts["norms"]),
        "gguf TQ2_0": counts["ternary"] * 66 // 256 + 2 * counts["embed"] + 4 * counts["norms"] if tied else None,
        "gguf TQ1_0": counts["ternary"] * 54 // 256 + 2 * counts["embed"] + 4 * counts["norms"] if tied else None,
    }


def measured_sizes(hidden: int, layers: int, intermediate: int) -> dict[str, int]:
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_rl.export import export_checkpoint
    from bitnet_rl.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = BitNetConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=True, hidden_act="silu", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        BitNetForCausalLM(config).to(torch.bfloat16).save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        for label, fmt, options in [("bf16 (master weights)", "bf16", {}), ("packed (2-bit + bf16)", "packed", {}),
                                    ("gguf TQ2_0", "gguf", {"ternary_type": "TQ2_0"}), ("gguf TQ1_0", "gguf", {"ternary_type": "TQ1_0"})]:  # fmt: skip
            result = export_checkpoint(ckpt, fmt, Path(tmp) / fmt / label.replace(" ", "_"), **options)
            sizes[label] = sum(size for name, size in result.files.items() if name.endswith((".safetensors", ".gguf")))
    return sizes, shape_counts(hidden, intermediate, 4, 2, layers, len(tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    args = parser.parse_args()
    measured, tiny_counts = measured_sizes(args.hidden, args.layers, args.intermediate)
    tiny_computed = computed_sizes(tiny_counts, tied=True)
    s = SHAPE_2B4T
    big = shape_counts(s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"], 30, s["vocab_size"])
    tied, untied = computed_sizes(big, tied=True), computed_sizes(big, tied=False)
    print(f"| format | tiny (hidden {args.hidden}, {args.layers} layers) measured, weights file | same, computed | 2B4T tied, computed | 2B4T untied, computed |")
    print("| --- | --- | --- | --- | --- |")
    mib, gb = 2**20, 1e9
    for label in measured:
        untied_cell = f"{untied[label] / gb:.3f} GB" if untied[label] else "refused (llama.cpp ties lm_head)"
        print(f"| {label} | {measured[label] / mib:.3f} MiB | {tiny_computed[label] / mib:.3f} MiB | {tied[label] / gb:.3f} GB | {untied_cell} |")


if __name__ == "__main__":
    main()
