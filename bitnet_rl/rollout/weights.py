"""Packing and sync: the generator's inference copy of a policy, in buffers that never move.

`PackedModel.allocate` sizes every buffer once (projections packed to 2 bits and fused q|k|v,
gate|up; embeddings, norms, `lm_head` and RoPE tables in the activation dtype); `sync_from`
re-packs the training policy into those same tensors through `PackedWeight.pack_rows_`, the one
packing path, so captured CUDA graphs that read them stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.quant.kernels.packed_weight import PackedWeight
from bitnet_rl.rollout.arch import Arch, inspect_policy, projection


@dataclass
class LayerWeights:
    qkv: PackedWeight
    o: PackedWeight
    gate_up: PackedWeight
    down: PackedWeight
    input_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,)
    attn_sub_norm: torch.Tensor | None  # (H·hd,)
    ffn_sub_norm: torch.Tensor | None  # (I,)

    def projections(self) -> tuple[PackedWeight, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class PackedModel:
    """Packed projections + activation-dtype embeddings, norms, head and RoPE tables of one policy."""

    def __init__(
        self, arch: Arch, policy: nn.Module, *, device: torch.device, dtype: torch.dtype, max_seq_len: int, lm_head: bool = True
    ) -> None:
        """Buffers for `policy`'s shapes (filled by `sync_from`); `lm_head=False` for a backbone
        without a vocabulary head (scalar-head models: `lm_head` is then None)."""
        a, dev, dt = arch, device, dtype
        self.arch, self.device, self.dtype = arch, device, dtype
        self.has_lm_head = lm_head
        self.layers: list[LayerWeights] = []
        for layer in policy.model.layers:
            fused = {key: PackedWeight.fused([projection(layer, n) for n in names], device=dev) for key, names in FUSED.items()}
            self.layers.append(
                LayerWeights(
                    **fused,
                    input_norm=torch.zeros(a.hidden, dtype=dt, device=dev),
                    post_norm=torch.zeros(a.hidden, dtype=dt, device=dev),
                    attn_sub_norm=torch.zeros(a.attn_width, dtype=dt, device=dev) if a.sub_norms else None,
                    ffn_sub_norm=torch.zeros(a.intermediate, dtype=dt, device=dev) if a.sub_norms else None,
                )
            )
        embed = policy.model.embed_tokens.weight
        self.tied = lm_head and policy.lm_head.weight.data_ptr() == embed.data_ptr()
        self.embed = torch.zeros(embed.shape, dtype=dt, device=dev)
        self.lm_head = None
        if lm_head:
            self.lm_head = self.embed if self.tied else torch.zeros(policy.lm_head.weight.shape, dtype=dt, device=dev)
        self.lm_head_bias = None
        if lm_head and getattr(policy.lm_head, "bias", None) is not None:
            self.lm_head_bias = torch.zeros(a.vocab, dtype=dt, device=dev)
        self.final_norm = torch.zeros(a.hidden, dtype=dt, device=dev)
        positions = torch.arange(max_seq_len, device=next(policy.parameters()).device)[None]
        probe = torch.zeros(1, dtype=dt, device=positions.device)
        with torch.no_grad():
            cos, sin = policy.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(dev).contiguous(), sin[0].to(dev).contiguous()

    @torch.no_grad()
    def sync_from(self, policy: nn.Module) -> None:
        """Re-pack `policy`'s current weights into these buffers, in place (no reallocation)."""
        inspect_policy(policy, lm_head=self.has_lm_head)
        if len(policy.model.layers) != len(self.layers):
            raise UserError("sync_from: the policy has a different number of layers; build a new generator with from_model")
        for layer, weights in zip(policy.model.layers, self.layers):
            for key, names in FUSED.items():
                getattr(weights, key).pack_all_([projection(layer, n) for n in names])
            weights.input_norm.copy_(layer.input_layernorm.weight)
            weights.post_norm.copy_(layer.post_attention_layernorm.weight)
            if weights.attn_sub_norm is not None:
                weights.attn_sub_norm.copy_(layer.self_attn.attn_sub_norm.weight)
                weights.ffn_sub_norm.copy_(layer.mlp.ffn_sub_norm.weight)
        self.embed.copy_(policy.model.embed_tokens.weight)
        if self.lm_head is not None and not self.tied:
            self.lm_head.copy_(policy.lm_head.weight)
        if self.lm_head_bias is not None:
            self.lm_head_bias.copy_(policy.lm_head.bias)
        self.final_norm.copy_(policy.model.norm.weight)

    def buffers(self) -> list[torch.Tensor]:
        """Every weight buffer `sync_from` writes (for checking that none moved)."""
        out = [t for t in (self.embed, self.lm_head, self.final_norm) if t is not None]
        for w in self.layers:
            for pw in w.projections():
                out += [pw.packed, pw.dequant] + ([pw.bias] if pw.bias is not None else [])
            out += [t for t in (w.input_norm, w.post_norm, w.attn_sub_norm, w.ffn_sub_norm) if t is not None]
        return out

    def weight_bytes(self) -> dict[str, int]:
        """Bytes read per decode step: packed projections (codes + scales) and the lm_head."""
        packed = sum(pw.nbytes() for w in self.layers for pw in w.projections())
        head = 0 if self.lm_head is None else self.lm_head.numel() * self.lm_head.element_size()
        return {"packed": packed, "lm_head": head}
