"""Rollout throughput: PackedGenerator vs transformers `generate` on the BitNet b1.58 2B4T shape.

    python benchmarks/generate.py [--layers 30] [--batch 1,16,64,256] [--prompt 128] [--new-tokens 256]
                                  [--baseline-batch 1,16,64] [--baseline-new-tokens 32] [--json out.json]

Random weights, greedy decoding, no stop tokens (every row generates exactly the requested
tokens). Rows measured in the same process:
- ours: `PackedGenerator` (2-bit packed projections, int8 activations, CUDA graphs);
- transformers `generate`, bf16 dense (plain nn.Linear);
- transformers `generate`, bitnet online (AutoBitLinear, online quantization);
- transformers `generate`, bitnet offline packed (transformers' BitLinear, uint8 weights).
tokens/s counts generated tokens over the whole call (prefill included); ms/token is the time of
one decode step (ours: (total − prefill-only call) / (new − 1); baselines: total / new tokens).
Peak memory is `max_memory_allocated` during the call and includes the resident bf16 policy.
The batch-1 roofline is (packed projection bytes + bf16 lm_head bytes) / copy bandwidth, with the
copy bandwidth measured in this run. `--tiny` runs a small model on CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from common import copy_bandwidth


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def build_policy(args, device: torch.device) -> nn.Module:
    import transformers

    from bitnet_rl.models.convert import to_bitlinear

    if args.tiny:
        config = transformers.BitNetConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers or 2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    else:
        config = transformers.BitNetConfig(num_hidden_layers=args.layers, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.BitNetForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    to_bitlinear(model)
    return model.eval()


def token_range(args) -> tuple[int, int]:
    return (3, 500) if args.tiny else (1000, 100000)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def time_greedy(gen, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, float, object]:
    """`(total s, prefill s, output)` of one greedy `generate` call of `new_tokens` tokens, after a
    warm-up call (prefill tuning, graph capture) and a prefill-only call timed for the subtraction;
    the peak-memory counter is reset just before the timed call."""
    kw = dict(temperature=0, stop_token_ids=())
    gen.generate(prompts, max_new_tokens=4, **kw)
    prefill_s, _ = timed(lambda: gen.generate(prompts, max_new_tokens=1, **kw), device)
    peak_reset(device)
    total_s, out = timed(lambda: gen.generate(prompts, max_new_tokens=new_tokens, **kw), device)
    return total_s, prefill_s, out


def decode_ms(total_s: float, prefill_s: float, new_tokens: int) -> float:
    """Milliseconds per decode step: (total − prefill-only call) / (new − 1)."""
    return 1e3 * (total_s - prefill_s) / (new_tokens - 1)


def bench_ours(model, args, device, batches) -> tuple[dict, dict]:
    from bitnet_rl.rollout import PackedGenerator

    build_s, gen = timed(
        lambda: PackedGenerator.from_model(model, max_batch_size=max(batches), max_seq_len=args.prompt + args.new_tokens), device
    )
    sync_times = [timed(lambda: gen.sync_from(model), device)[0] for _ in range(3)]
    capture_s, _ = timed(gen.capture, device) if gen.cuda_graphs else (0.0, None)
    info = dict(build_s=build_s, sync_ms=1e3 * statistics.median(sync_times), capture_s=capture_s, **gen.weight_bytes())
    print(f"ours: build {build_s:.1f} s, sync_from {info['sync_ms']:.1f} ms, tune + capture {capture_s:.1f} s", flush=True)
    rows, tokens = {}, {}
    for b in batches:
        prompts = torch.randint(*token_range(args), (b, args.prompt)).tolist()
        total_s, prefill_s, out = time_greedy(gen, prompts, args.new_tokens, device)
        assert int(out.lengths.min()) == args.new_tokens
        tokens[b] = out.completion_ids.cpu()
        ms = decode_ms(total_s, prefill_s, args.new_tokens)
        rows[b] = dict(tok_s=b * args.new_tokens / total_s, ms_token=ms, prefill_ms=1e3 * prefill_s, peak_gb=peak_gb(device))
        print(f"ours batch {b}: {rows[b]}", flush=True)
    if args.tokens:  # greedy completions, for `compare_generate.py` (old code vs new on the same prompts)
        torch.save(tokens, args.tokens)
    return rows, info, gen


def breakdown(gen, batches, position: int = 256) -> dict:
    """Per-op GPU time of one decode step, each op captured over all layers in one CUDA graph."""
    from bitnet_rl.quant.kernels.tuner import time_graph, time_replays
    from bitnet_rl.rollout.forward import attention_kwargs, head
    from bitnet_rl.rollout.layers import decode_attention, linear, norm_quant

    a, st, dt, model, kernels = gen.arch, gen.state, gen.dtype, gen.model, gen.tuner.kernels
    table: dict = {}
    for b in batches:
        st.positions[:b] = min(position, gen.max_seq_len - 2)
        st.slots[:b] = torch.arange(b, dtype=torch.int32, device=gen.device)
        st.tokens[:b] = torch.randint(3, a.vocab, (b,), device=gen.device)
        w = gen.work.rows(b)
        w.qkv.normal_()
        w.y.normal_()
        w.gate_up.normal_()
        w.attn.normal_()
        h = st.hidden[:b]
        h.normal_()
        xd, xa, xi = w.x_int8[:, : a.hidden], w.x_int8[:, : a.n_heads * a.head_dim], w.x_int8[:, : a.intermediate]
        quant = (w.act_dequant, w.act_sum)
        attn_kw = dict(attention_kwargs(model), **gen.tuner.attention_tile(b))
        per_layer = {
            "norm+quant (residual, input/post norm) ×2": lambda L: [
                norm_quant(w.y, xd, *quant, dtype=dt, residual=h, norm_weight=L.post_norm, eps=a.eps) for _ in range(2)
            ],
            "norm+quant (attn sub-norm)": lambda L: norm_quant(w.attn, xa, *quant, dtype=dt, norm_weight=L.attn_sub_norm, eps=a.eps),
            "gated act + norm + quant": lambda L: norm_quant(
                w.gate_up, xi, *quant, dtype=dt, gated=True, act=a.act, norm_weight=L.ffn_sub_norm, eps=a.eps
            ),
            "W2A8 qkv": lambda L: linear(xd, *quant, L.qkv, w.qkv, kernels),
            "W2A8 o": lambda L: linear(xa, *quant, L.o, w.y, kernels),
            "W2A8 gate|up": lambda L: linear(xd, *quant, L.gate_up, w.gate_up, kernels),
            "W2A8 down": lambda L: linear(xi, *quant, L.down, w.y, kernels),
        }
        row = {}
        for name, op in per_layer.items():
            row[name] = 1e3 * time_graph(lambda: [op(L) for L in model.layers]) / len(model.layers)
        row["attention"] = 1e3 * time_graph(
            lambda: [
                decode_attention(w.qkv, gen.k_cache[i], gen.v_cache[i], st.slots[:b], st.positions[:b], model.cos, model.sin, w.attn, **attn_kw)
                for i in range(len(model.layers))
            ]
        ) / len(model.layers)
        row["final norm + lm_head (once)"] = 1e3 * time_graph(lambda: head(model, h))
        row["whole decode step (graph)"] = 1e3 * time_replays(gen._graph(b), 20)
        row["attention tile"] = str(gen.tuner.attention_tile(b))
        table[b] = row
        print(f"breakdown batch {b}: {row}", flush=True)
    return table


def print_breakdown(table, n_layers) -> None:
    batches = list(table)
    print(f"\n## Decode step breakdown (µs; per layer unless noted; position 256; {n_layers} layers)\n")
    print("| op | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---" * (len(batches) + 1) + "|")
    names = [n for n in table[batches[0]] if n != "attention tile"]
    for name in names:
        print(f"| {name} | " + " | ".join(f"{table[b][name]:.1f}" for b in batches) + " |")
    layer_sum = {b: sum(v for n, v in table[b].items() if isinstance(v, float) and "once" not in n and "whole" not in n) for b in batches}
    print("| sum of layer ops × layers + head | " + " | ".join(
        f"{layer_sum[b] * n_layers + table[b]['final norm + lm_head (once)']:.1f}" for b in batches) + " |")
    print("| attention tile | " + " | ".join(table[b]["attention tile"] for b in batches) + " |")


def swap_projections(model: nn.Module, originals: dict, make) -> None:
    for name, module in originals.items():
        model.set_submodule(name, make(module))


def dense_linear(bit) -> nn.Module:
    linear = nn.Linear(bit.in_features, bit.out_features, bias=False, device="meta")
    linear.weight = bit.weight
    return linear


def online_linear(bit) -> nn.Module:
    from transformers.integrations.bitnet import AutoBitLinear

    layer = AutoBitLinear(bit.in_features, bit.out_features, bias=False, device="meta", dtype=bit.weight.dtype, online_quant=True)
    layer.weight = bit.weight
    return layer


def offline_linear(bit) -> nn.Module:
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    from bitnet_rl.quant.pack import pack_hf

    codes, scale = bit.ternary_codes()
    layer = HFBitLinear(bit.in_features, bit.out_features, bias=False, device=bit.weight.device, dtype=bit.weight.dtype)
    layer.weight = pack_hf(codes)
    layer.weight_scale = scale.reshape(1).to(bit.weight.dtype)  # offline BitLinear divides by it
    return layer


def bench_baselines(model, args, device, batches) -> dict:
    from bitnet_rl.quant.bitlinear import BitLinear

    originals = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    variants = {"dense": dense_linear, "online": online_linear, "offline": offline_linear}
    rows: dict = {name: {} for name in variants}
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for name, make in variants.items():
        swap_projections(model, originals, make)
        for b in batches:
            ids = torch.randint(*token_range(args), (b, args.prompt), device=device)
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad)
            try:
                with torch.inference_mode():
                    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (and torch.compile)
                    peak_reset(device)
                    n = args.baseline_new_tokens
                    total_s, out = timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw), device)
            except Exception as err:  # a baseline that fails is reported, not fatal
                print(f"{name} batch {b}: failed: {type(err).__name__}: {err}", flush=True)
                continue
            assert out.shape[1] == args.prompt + n
            rows[name][b] = dict(tok_s=b * n / total_s, ms_token=1e3 * total_s / n, peak_gb=peak_gb(device))
            print(f"{name} batch {b}: {rows[name][b]}", flush=True)
    swap_projections(model, originals, lambda m: m)
    return rows


def fmt(value, spec=".1f") -> str:
    return "—" if value is None else format(value, spec)


def print_tables(ours, info, baselines, bw, args, batches) -> None:
    names = {"dense": "bf16 dense", "online": "bitnet online", "offline": "bitnet offline packed"}
    print(f"\n## Rollout throughput (layers {args.layers}, prompt {args.prompt}, ours {args.new_tokens} new tokens, "
          f"baselines {args.baseline_new_tokens} new tokens, greedy)\n")
    head = "| batch | ours tok/s | ours ms/token | ours peak GB |"
    for n in names.values():
        head += f" {n} tok/s | {n} ms/token |"
    head += " ours / dense | ours / online | ours / offline |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for b in batches:
        o = ours[b]
        line = f"| {b} | {o['tok_s']:.0f} | {o['ms_token']:.3f} | {o['peak_gb']:.1f} |"
        ratios = ""
        for key in names:
            r = baselines.get(key, {}).get(b)
            line += f" {fmt(r and r['tok_s'], '.1f')} | {fmt(r and r['ms_token'], '.1f')} |"
            ratios += f" {fmt(r and o['tok_s'] / r['tok_s'], '.1f')}{'×' if r else ''} |"
        print(line + ratios)
    print("\n(— = not run: baselines at that batch would take too long)\n")
    if 1 in ours:
        weight_bytes = info["packed"] + info["lm_head"]
        roof_ms = 1e3 * weight_bytes / bw
        print("## Batch-1 decode vs HBM roofline\n")
        print("| packed projections GB | bf16 lm_head GB | copy bandwidth TB/s | roofline ms/token | ours ms/token | fraction of roofline |")
        print("|---|---|---|---|---|---|")
        print(f"| {info['packed'] / 1e9:.3f} | {info['lm_head'] / 1e9:.3f} | {bw / 1e12:.2f} | {roof_ms:.3f} | "
              f"{ours[1]['ms_token']:.3f} | {100 * roof_ms / ours[1]['ms_token']:.0f}% |")
    print("\n## Weight sync and setup\n")
    print("| sync_from ms | from_model s | tune + capture graphs s | prefill ms (batch: ms) |")
    print("|---|---|---|---|")
    prefill = ", ".join(f"{b}: {ours[b]['prefill_ms']:.0f}" for b in batches)
    print(f"| {info['sync_ms']:.1f} | {info['build_s']:.1f} | {info['capture_s']:.1f} | {prefill} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", default="1,16,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--baseline-batch", default="1,16,64")
    parser.add_argument("--baseline-new-tokens", type=int, default=32)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokens", default=None, help="save ours' greedy completions {batch: ids} to this .pt file")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    batches = [int(b) for b in args.batch.split(",")]
    torch.manual_seed(0)
    model = build_policy(args, device)
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    ours, info, gen = bench_ours(model, args, device, batches)
    table = None
    if device.type == "cuda" and not args.no_breakdown:
        try:
            table = breakdown(gen, [b for b in (1, 16, 64, 256) if b in batches])
        except Exception as err:  # diagnostics only: never lose the main tables
            print(f"breakdown failed: {type(err).__name__}: {err}", flush=True)
    del gen
    baselines = {}
    if not args.skip_baselines:
        baseline_batches = [int(b) for b in args.baseline_batch.split(",") if int(b) in batches]
        baselines = bench_baselines(model, args, device, baseline_batches)
    print_tables(ours, info, baselines, bw, args, batches)
    if table:
        print_breakdown(table, args.layers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ours=ours, info=info, baselines=baselines, breakdown=table, copy_bw=bw, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
