"""CPU decode speed of an exported model: llama.cpp (GGUF TQ2_0, TQ1_0) vs our PackedGenerator vs bf16 transformers.

    python benchmarks/cpu_decode.py [--hidden 1024 --layers 8 --intermediate 2816 --vocab 32000 --new 64 --threads 1]

One random BitNet model (tied embeddings, SiLU: the variant llama.cpp's bitnet graph computes)
is saved, exported with `bitnet-rl export --format gguf`, and decoded greedily from the same
16-token prompt by each runtime on this machine with the same thread count. Decode tokens/s
excludes prefill for all three: (new - 1) / (time(new tokens) - time(1 token)) for transformers
and ours (best of 5 each), the timed greedy loop after the prompt for llama.cpp (best of 3).
Needs `llama-cpp-python` for the llama.cpp row (skipped without it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(run, new: int) -> float:
    """Tokens/s of decoding alone: `run(n)` generates n tokens after the same prefill."""
    run(2)  # warm-up
    return (new - 1) / max(timed(lambda: run(new)) - timed(lambda: run(1)), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_rl import PackedGenerator, export_checkpoint, load_policy
    from bitnet_rl.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = BitNetConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 256, 1), vocab_size=args.vocab, tie_word_embeddings=True, hidden_act="silu",
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
    )  # fmt: skip
    prompt = list(range(10, 26))
    load_before = f"{os.getloadavg()[0]:.1f}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        dense = BitNetForCausalLM(config).to(torch.bfloat16).eval()
        dense.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        params = sum(p.numel() for p in dense.parameters())
        gguf_files = {}
        for qtype in ("TQ2_0", "TQ1_0"):
            (gguf_files[qtype],) = export_checkpoint(ckpt, "gguf", Path(tmp) / qtype, ternary_type=qtype).path.glob("*.gguf")
        gguf_mib = {q: f.stat().st_size / 2**20 for q, f in gguf_files.items()}

        ids = torch.tensor([prompt])
        with torch.no_grad():
            rows.append(("transformers bf16 dense (generate)", decode_rate(
                lambda n: dense.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0), args.new)))  # fmt: skip
        policy = load_policy(ckpt, dtype=torch.float32).eval()
        generator = PackedGenerator.from_model(policy, max_batch_size=1, max_seq_len=len(prompt) + args.new + 1)
        rows.append(("bitnet-rl PackedGenerator (2-bit, fp32 CPU)", decode_rate(
            lambda n: generator.generate([prompt], max_new_tokens=n, temperature=0.0, stop_token_ids=[]), args.new)))  # fmt: skip
        try:
            import llama_cpp
        except ImportError:
            llama_cpp = None
        for qtype, gguf_file in gguf_files.items() if llama_cpp is not None else ():
            llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=len(prompt) + args.new + 8, n_threads=args.threads, n_batch=64, logits_all=True, verbose=False)

            def llama_decode(llm=llm) -> float:
                """Tokens/s of the greedy decode loop alone (the prompt is evaluated before the clock starts)."""
                llm.reset()
                llm.eval(prompt)
                start = time.perf_counter()
                for _ in range(args.new):
                    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
                return args.new / (time.perf_counter() - start)

            rates = [llama_decode() for _ in range(4)]
            rows.append((f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) GGUF {qtype}", max(rates[1:])))
            llm.close()
        if llama_cpp is None:
            rows.append(("llama.cpp (llama-cpp-python not installed)", float("nan")))

    print(f"load average before: {load_before}; after: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(f"model: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab} "
          f"({params / 1e6:.0f}M parameters); prompt {len(prompt)} tokens, {args.new} new, batch 1, {args.threads} thread(s)")  # fmt: skip
    print("GGUF files: " + ", ".join(f"{q} {mib:.1f} MiB" for q, mib in gguf_mib.items()))
    base = rows[0][1]
    print("| runtime | decode tok/s | vs transformers bf16 |")
    print("| --- | --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
