"""`bitnet-rl info`: what a model directory holds and what it costs in memory."""

from __future__ import annotations

from pathlib import Path

import torch

from bitnet_rl.models.build import resolve_model_dir
from bitnet_rl.models.io import KINDS, load_policy, model_kind, prompt_format_of, read_config
from bitnet_rl.quant.bitlinear import bitlinear_modules
from bitnet_rl.quant.health import ternary_health


def memory_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Weight bytes in bf16 vs with BitLinear weights 2-bit packed (+ one fp32 scale per scale group)."""
    bit_params = scale_count = 0
    for _, module in bitlinear_modules(model):
        bit_params += module.weight.numel()
        scale_count += module.ternary_codes()[1].numel()
    total = sum(p.numel() for p in model.parameters())
    other = total - bit_params
    return {"bf16": 2 * total, "packed": bit_params // 4 + 4 * scale_count + 2 * other}


def model_summary(path: str | Path) -> str:
    path = resolve_model_dir(path)
    raw = read_config(path)
    kind = model_kind(raw)
    if kind == "policy":
        model = load_policy(path, dtype=torch.bfloat16)
    else:
        from bitnet_rl.models.value import load_scalar_model

        model = load_scalar_model(path, dtype=torch.bfloat16, kinds=(kind,))
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(m.weight.numel() for _, m in bitlinear_modules(model))
    report = ternary_health(model)
    health = report.overall()
    mem = memory_bytes(model)
    quant = raw.get("quantization_config") or {}
    lines = [
        f"model:        {path}",
        f"kind:         {KINDS[kind]}" + (f", trained on {prompt_format_of(raw)} prompts" if prompt_format_of(raw) else ""),
        f"architecture: {type(model).__name__} ({raw.get('model_type')}), layers={raw.get('num_hidden_layers')}, "
        f"hidden={raw.get('hidden_size')}, heads={raw.get('num_attention_heads')}/{raw.get('num_key_value_heads')}, "
        f"vocab={raw.get('vocab_size')}",
        f"stored as:    {quant.get('quantization_mode', 'dense master weights')}"
        + (f" ({quant.get('linear_class')})" if quant else ""),
        f"parameters:   {total:,} total, {quantized:,} in {len(bitlinear_modules(model))} BitLinear layers "
        f"({quantized / total:.1%}), {total - quantized:,} full precision",
        f"ternary:      -1 {health['frac_neg']:.1%}  0 {health['frac_zero']:.1%}  +1 {health['frac_pos']:.1%}  "
        f"mean scale {health['mean_scale']:.3g}  weight std {health['weight_std']:.3g}",
        f"memory:       bf16 {mem['bf16'] / 2**20:,.1f} MiB, 2-bit packed {mem['packed'] / 2**20:,.1f} MiB "
        f"({mem['bf16'] / mem['packed']:.1f}x smaller)",
    ]
    collapsed = report.collapsed
    if collapsed:
        lines.append(f"warning:      weight collapse (std < 1e-3) in {len(collapsed)} layers, e.g. {collapsed[0]}")
    return "\n".join(lines)
