"""`packed` export: transformers' offline bitnet layout, 2 bits per ternary weight.

`config.json` names `quantization_config = {"quant_method": "bitnet", "linear_class":
"autobitlinear", "quantization_mode": "offline"}`. For every BitLinear the safetensors file holds
- `<layer>.weight`: uint8 `(out / 4, in)`, four codes per byte (`quant.pack.pack_hf`, the layout of
  `transformers.integrations.bitnet.pack_weights`), and
- `<layer>.weight_scale`: float32 `(1,)` holding `mean|W|` (= 1 / s). Offline `AutoBitLinear`
  *multiplies* its output by `weight_scale` (offline `BitLinear` divides; see FACTS.md), so the
  layer computes `ActQuant(x) · codesᵀ · mean|W|`, which is our BitLinear at λ = 1.
Embeddings, norms and `lm_head` are stored in bfloat16. We write AutoBitLinear because
transformers unpacks its weights once at load time, where offline BitLinear unpacks on every
forward (slower). `load_policy` reads the directory back (codes and scales exactly).

transformers' offline layers hold one scale per tensor and always quantize activations to int8:
per-channel / per-group scales or unquantized activations are refused (use `bf16` or `gguf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules
from bitnet_rl.quant.pack import VALUES_PER_BYTE, pack_hf

OFFLINE_QUANT_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}


def check_packable(modules: list[tuple[str, BitLinear]]) -> None:
    """Refuse, with one line, what transformers' offline format cannot hold."""
    for name, module in modules:
        if module.granularity != "per_tensor":
            raise UserError(
                f"packed: transformers' offline bitnet format holds one scale per tensor; {name} uses "
                f"{module.granularity} scales (export --format bf16, or gguf for per_channel)"
            )
        if not module.quantize_activations:
            raise UserError(f"packed: transformers' offline bitnet layers always quantize activations to int8; {name} was trained without (export --format bf16)")
        if module.out_features % VALUES_PER_BYTE:
            raise UserError(f"packed: transformers unpacks 4 rows per byte; {name} has out_features={module.out_features}, not a multiple of 4")
        if module.bias is not None:
            raise UserError(f"packed: offline AutoBitLinear multiplies its bias by the weight scale; {name} has a bias (export --format bf16)")


def packed_state_dict(policy: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Tensors of the offline layout: packed codes + float32 `weight_scale` per BitLinear, the rest in `dtype`."""
    modules = bitlinear_modules(policy)
    check_packable(modules)
    quantized = {f"{name}.weight": module for name, module in modules}
    state = {}
    for key, tensor in policy.state_dict().items():
        module = quantized.get(key)
        if module is None:
            state[key] = tensor.detach().to(dtype).contiguous()
            continue
        codes, inv_scale = module.ternary_codes()
        state[key] = pack_hf(codes).contiguous()
        state[key[: -len("weight")] + "weight_scale"] = (1.0 / inv_scale.float()).reshape(1).contiguous()
    if getattr(policy.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def offline_config(policy: nn.Module, dtype: torch.dtype) -> dict:
    """`config.json` for the offline layout; linear layers we keep dense are listed as not to convert."""
    from bitnet_rl.models.io import OUR_KEY, quant_config_from_model

    config = policy.config.to_dict()
    quantized = {name for name, _ in bitlinear_modules(policy)}
    dense = sorted(name for name, m in policy.named_modules() if isinstance(m, nn.Linear) and name not in quantized and name != "lm_head")
    config["quantization_config"] = {**OFFLINE_QUANT_CONFIG, "modules_to_not_convert": ["lm_head", *dense]}
    config[OUR_KEY] = {"quant": quant_config_from_model(policy).layer_settings()}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config


def write_packed(policy: nn.Module, tokenizer, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from bitnet_rl.export import write_atomically

    state = packed_state_dict(policy, dtype)
    config = offline_config(policy, dtype)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(policy, "generation_config", None) is not None:
            policy.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomically(out, fill)
