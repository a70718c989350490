"""Shared pieces of the GPU benchmarks: the BitNet b1.58 2B4T shape, memory and tables."""

from __future__ import annotations

import time

import torch

SHAPE_2B4T = dict(
    hidden_size=2560,
    intermediate_size=6912,
    num_attention_heads=20,
    num_key_value_heads=5,
    vocab_size=128256,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def bitnet_2b4t(layers: int = 30, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """A random `BitNetForCausalLM` of the 2B4T shape (`layers` decoder layers), plain nn.Linear."""
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(seed)
    config = BitNetConfig(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPE_2B4T)
    with torch.device(device):
        model = BitNetForCausalLM(config).to(dtype)
    return model


def reset_peak() -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def now_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**30


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs (synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def copy_bandwidth(device="cuda") -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted); nan off CUDA."""
    if torch.device(device).type != "cuda":
        return float("nan")
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def set_bitlinear_fast_paths(model, enabled: bool) -> None:
    """Switch `model`'s BitLinear training fast paths (Q(W) cache, Triton fake quant) on or off.

    Off reproduces the BitLinear of before those levers: both quantizers in plain torch on
    every forward. The Triton switch is per process (a benchmark-only patch of the dispatch).
    """
    import bitnet_rl.quant.kernels.train as train_kernels
    from bitnet_rl.quant.bitlinear import bitlinear_modules, quantize_activation

    for _, module in bitlinear_modules(model):
        module.cache_quantized_weight = enabled
        module._weight_cache = None
    original = getattr(train_kernels, "_original_fake_quant", train_kernels.fake_quantize_activation)
    train_kernels._original_fake_quant = original
    train_kernels.fake_quantize_activation = original if enabled else (lambda x, **_: quantize_activation(x))


def matmul_peak(device="cuda", n: int = 8192) -> float:
    """FLOP/s of a bf16 `n³` matmul on random data (mean of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3)


def bitnet_critic(layers: int = 30, dtype=torch.bfloat16, device="cuda", seed: int = 1):
    """A random BitNet scalar-head model (critic / reward model) of the 2B4T shape, plain nn.Linear."""
    from transformers import BitNetConfig

    from bitnet_rl.models.value import BitNetForSequenceClassification

    torch.manual_seed(seed)
    config = BitNetConfig(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1, **SHAPE_2B4T)
    with torch.device(device):
        model = BitNetForSequenceClassification(config).to(dtype)
    return model
