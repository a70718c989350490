"""Architecture checks for the packed generator: which policies it can pack, and their shapes.

A policy qualifies when it is a BitNet or Llama-style causal LM (`model.layers`, `lm_head`)
whose seven projections per layer are `BitLinear` with int8 activations. Anything else raises a
`UserError` that names the offending module and points at `rollout.backend: policy`. Frozen
copies qualify too (projections already packed, `models.frozen.PackedTernaryLinear`), and with
`lm_head=False` so do scalar-head models (reward models, critics: `model.layers` + `score`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import BitLinear
from bitnet_rl.rollout.layers import ACT_FNS

SUPPORTED_MODEL_TYPES = ("bitnet", "llama")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
HINT = "use `rollout.backend: policy` to sample with the policy itself"


@dataclass
class Arch:
    """Shapes and constants of a supported decoder."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    act: str
    scale: float
    sub_norms: bool  # BitNet's attn_sub_norm / ffn_sub_norm
    pad_token_id: int
    eos_token_ids: tuple[int, ...]

    @property
    def qkv_width(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim


def projection(layer: nn.Module, name: str) -> nn.Module:
    """Layer `layer`'s projection `name` (q_proj … down_proj)."""
    parent = layer.self_attn if name in ATTN_PROJ else layer.mlp
    return getattr(parent, name)


def _ternary_types() -> tuple[type, ...]:
    from bitnet_rl.models.frozen import PackedTernaryLinear

    return (BitLinear, PackedTernaryLinear)


def inspect_policy(policy: nn.Module, *, lm_head: bool = True) -> Arch:
    """Check that `policy` is a BitNet/Llama-style causal LM with BitLinear (or frozen packed) projections.

    `lm_head=False` accepts a backbone with any head (a scalar-head model); `vocab` is then the
    embedding's row count.
    """
    config = getattr(policy, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"rollout.backend packed supports BitNet and Llama-style policies, not model_type={model_type!r}; {HINT}")
    inner = getattr(policy, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or (lm_head and not hasattr(policy, "lm_head")):
        raise UserError(f"rollout.backend packed: {type(policy).__name__} has no model.layers / lm_head (a wrapped model?); {HINT}")
    for i, layer in enumerate(layers):
        for name in ATTN_PROJ + MLP_PROJ:
            module = projection(layer, name)
            if not isinstance(module, _ternary_types()):
                raise UserError(
                    f"rollout.backend packed: layers.{i}.{name} is {type(module).__name__}, not BitLinear "
                    f"(convert with bitnet_rl.models.convert.to_bitlinear, merge adapters first); {HINT}"
                )
            if not module.quantize_activations:
                raise UserError(f"rollout.backend packed needs int8 activations (layers.{i}.{name} has quantize_activations=False); {HINT}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ACT_FNS:
        raise UserError(f"rollout.backend packed: activation {act!r} is not supported (only {', '.join(ACT_FNS)}); {HINT}")
    attn = layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return Arch(
        n_layers=len(layers),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab=policy.lm_head.out_features if lm_head else inner.embed_tokens.num_embeddings,
        eps=layers[0].input_layernorm.variance_epsilon,
        act=act,
        scale=float(getattr(attn, "scaling", head_dim**-0.5)),
        sub_norms=hasattr(attn, "attn_sub_norm"),
        pad_token_id=int(pad),
        eos_token_ids=eos_ids,
    )
