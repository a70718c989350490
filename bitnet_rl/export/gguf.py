"""`gguf` export: one GGUF file for llama.cpp, projections ternary.

BitNet models go to llama.cpp's `bitnet` architecture; Llama models converted to BitLinear
(`recipes/llama-to-1.58/`) to its `llama` architecture, with q/k rows permuted for llama.cpp's
adjacent-pair RoPE and a separate `lm_head` written as `output.weight`.

Type: **TQ2_0** by default (2.0625 bits/weight: 2-bit codes + one fp16 scale per 256-weight
block). TQ1_0 (1.6875 bits/weight, base-3 packing: 5 codes per byte) is 18% smaller but each
weight costs llama.cpp a multiply-and-shift to decode instead of a 2-bit mask; for CPU decode,
which is what GGUF is for, TQ2_0 is the faster choice (78 vs 65 tok/s in `benchmarks/cpu_decode.py`).
Both store the absmean scale as each block's fp16 `d`, so one format holds per-tensor,
per-channel (a block never crosses a row) and per-group scales when the group is a multiple
of 256 weights; smaller groups, rows not a multiple of 256 and unquantized activations are
refused. llama.cpp quantizes activations per 256-value block (Q8_K) rather than per token, so
its function is close to, not equal to, ours: the test bounds the difference.

llama.cpp's `bitnet` graph ties the output layer to the token embeddings and, in the llama.cpp
vendored by llama-cpp-python 0.3.36, applies SiLU in the FFN whatever `hidden_act` says
(BitNet b1.58 2B4T uses relu², llama.cpp PRs 25885 / 26751 were closed unmerged). We write
`bitnet.hidden_activation` so a runtime that reads it gets relu², and warn when it matters.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.export.gguf_vocab import add_vocab, vocab_metadata
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, dequantize_codes

BLOCK = 256  # weights per TQ1_0 / TQ2_0 block (QK_K)
COMMON_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp architecture for each transformers model_type we export, and its extra layer tensors
ARCHS = {"bitnet": "bitnet", "llama": "llama"}
LAYER_NAMES = {
    "bitnet": {**COMMON_NAMES, "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"},
    "llama": COMMON_NAMES,
}


def gguf_name(hf_name: str, model_type: str = "bitnet") -> str:
    """`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight` (llama.cpp's tensor names)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight" and model_type == "llama":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in LAYER_NAMES[model_type]:
            return f"blk.{parts[2]}.{LAYER_NAMES[model_type][module]}.{parts[-1]}"
    raise UserError(f"gguf: tensor {hf_name} has no place in llama.cpp's {ARCHS[model_type]} architecture")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q/k reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1).

    llama.cpp's `llama` architecture applies RoPE to adjacent pairs ("NORM" rope), transformers'
    Llama to halves; permuting the output rows per head makes both compute the same attention.
    Shape `(heads * head_dim, in)` → same shape.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_exportable(policy: nn.Module, modules: list[tuple[str, BitLinear]]) -> None:
    """Refuse, with one line, what llama.cpp's bitnet architecture or the TQ types cannot hold."""
    config = policy.config
    if config.model_type not in ARCHS:
        raise UserError(f"gguf: exports BitNet and Llama models (llama.cpp architectures bitnet, llama); this is {config.model_type!r} (export --format packed or bf16)")
    if config.model_type == "bitnet" and not tied_head(policy):
        raise UserError("gguf: llama.cpp's bitnet architecture reuses the token embeddings as output layer; this model has its own lm_head (export --format packed)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("gguf: this model has projection biases, which llama.cpp's ternary export does not carry")
    for name, module in modules:
        if not module.quantize_activations:
            raise UserError(f"gguf: llama.cpp multiplies ternary weights with 8-bit activations; {name} was trained without activation quantization")
        if module.in_features % BLOCK:
            raise UserError(f"gguf: ternary GGUF types store blocks of {BLOCK} weights; {name} has in_features={module.in_features}, not a multiple of {BLOCK}")
        if module.granularity == "per_group" and module.group_size % BLOCK:
            raise UserError(f"gguf: one fp16 scale per {BLOCK}-weight block cannot hold groups of {module.group_size} ({name}); use group_size a multiple of {BLOCK}")
        if module.bias is not None:
            raise UserError(f"gguf: llama.cpp's bitnet layers have no bias; {name} has one")


def tied_head(policy: nn.Module) -> bool:
    head, embed = policy.get_output_embeddings().weight, policy.get_input_embeddings().weight
    return head.data_ptr() == embed.data_ptr() or torch.equal(head, embed)


def ternary_weight(module: BitLinear) -> np.ndarray:
    """The λ = 1 weight `codes / s` as float32 `(out, in)`: every block's max |w| is its scale."""
    codes, scale = module.ternary_codes()
    return dequantize_codes(codes, scale, module.group_size).numpy()


def write_gguf(policy: nn.Module, tokenizer, out: Path, ternary_type: str = "TQ2_0") -> Path:
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'bitnet-rl[gguf]'") from None

    from bitnet_rl.export import write_atomically

    qtypes = {"TQ2_0": (gguf.GGMLQuantizationType.TQ2_0, gguf.LlamaFileType.MOSTLY_TQ2_0), "TQ1_0": (gguf.GGMLQuantizationType.TQ1_0, gguf.LlamaFileType.MOSTLY_TQ1_0)}
    if ternary_type.upper() not in qtypes:
        raise UserError(f"--gguf-type: unknown value {ternary_type!r} (expected TQ2_0 or TQ1_0)")
    qtype, file_type = qtypes[ternary_type.upper()]
    policy = policy.float()
    modules = bitlinear_modules(policy)
    check_exportable(policy, modules)
    config = policy.config
    meta = vocab_metadata(tokenizer, config.vocab_size)
    arch, tied = ARCHS[config.model_type], tied_head(policy)
    if config.hidden_act != "silu":
        warnings.warn(
            f"gguf: this model uses {config.hidden_act}; llama.cpp's {arch} graph (llama-cpp-python <= 0.3.36) applies SiLU "
            f"unless it reads {arch}.hidden_activation, so its outputs will differ",
            stacklevel=2,
        )
    quantized = {f"{name}.weight": module for name, module in modules}
    file_name = f"model-{ternary_type.lower()}.gguf"

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / file_name), arch)
        writer.add_name(getattr(config, "_name_or_path", "") or "bitnet-rl export")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_vocab_size(config.vocab_size)
        writer.add_string(f"{arch}.hidden_activation", config.hidden_act)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, meta)
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        for key, tensor in policy.state_dict().items():
            if key == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd
            name = gguf_name(key, config.model_type)
            if key in quantized:
                weight = ternary_weight(quantized[key])
                module = ".".join(key.split(".")[3:-1])
                if arch == "llama" and module in heads:
                    weight = rope_permute(weight, heads[module])
                writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
            elif tensor.dim() == 1:
                writer.add_tensor(name, tensor.detach().float().numpy())
            else:
                writer.add_tensor(name, tensor.detach().to(torch.float16).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomically(out, fill)
