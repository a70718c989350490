"""`gguf` export: one GGUF file for llama.cpp's `bitnet` architecture, projections ternary.

Type: **TQ2_0** by default (2.0625 bits/weight: 2-bit codes + one fp16 scale per 256-weight
block). TQ1_0 (1.6875 bits/weight, base-3 packing) is smaller but llama.cpp decodes it with more
arithmetic per weight; for CPU decode, which is what GGUF is for, TQ2_0 is the faster choice.
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

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.export.gguf_vocab import add_vocab, vocab_metadata
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, dequantize_codes

BLOCK = 256  # weights per TQ1_0 / TQ2_0 block (QK_K)
ARCH = "bitnet"
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight` (llama.cpp's bitnet tensor names)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[module]}.{parts[-1]}"
    raise UserError(f"gguf: tensor {hf_name} has no place in llama.cpp's bitnet architecture")


def check_exportable(policy: nn.Module, modules: list[tuple[str, BitLinear]]) -> None:
    """Refuse, with one line, what llama.cpp's bitnet architecture or the TQ types cannot hold."""
    config = policy.config
    if config.model_type != "bitnet":
        raise UserError(f"gguf: llama.cpp's bitnet architecture needs a BitNet model (sub-norms); this is {config.model_type!r} (export --format packed or bf16)")
    head = policy.get_output_embeddings().weight
    if head.data_ptr() != policy.get_input_embeddings().weight.data_ptr() and not torch.equal(head, policy.get_input_embeddings().weight):
        raise UserError("gguf: llama.cpp's bitnet architecture reuses the token embeddings as output layer; this model has its own lm_head (export --format packed)")
    for name, module in modules:
        if not module.quantize_activations:
            raise UserError(f"gguf: llama.cpp multiplies ternary weights with 8-bit activations; {name} was trained without activation quantization")
        if module.in_features % BLOCK:
            raise UserError(f"gguf: ternary GGUF types store blocks of {BLOCK} weights; {name} has in_features={module.in_features}, not a multiple of {BLOCK}")
        if module.granularity == "per_group" and module.group_size % BLOCK:
            raise UserError(f"gguf: one fp16 scale per {BLOCK}-weight block cannot hold groups of {module.group_size} ({name}); use group_size a multiple of {BLOCK}")
        if module.bias is not None:
            raise UserError(f"gguf: llama.cpp's bitnet layers have no bias; {name} has one")


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
    if config.hidden_act != "silu":
        print(f"warning: gguf: this model uses {config.hidden_act}; llama.cpp's bitnet graph (llama-cpp-python <= 0.3.36) applies SiLU "
              "unless it reads bitnet.hidden_activation, so its outputs will differ", file=sys.stderr)  # fmt: skip
    quantized = {f"{name}.weight": module for name, module in modules}
    file_name = f"model-{ternary_type.lower()}.gguf"

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / file_name), ARCH)
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
        writer.add_string(f"{ARCH}.hidden_activation", config.hidden_act)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, meta)
        for key, tensor in policy.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied to token_embd
            name = gguf_name(key)
            if key in quantized:
                writer.add_tensor(name, gguf.quants.quantize(ternary_weight(quantized[key]), qtype), raw_dtype=qtype)
            elif tensor.dim() == 1:
                writer.add_tensor(name, tensor.detach().float().numpy())
            else:
                writer.add_tensor(name, tensor.detach().to(torch.float16).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomically(out, fill)
