"""The packed forward pass: decoder layers on W2A8 kernels, prefill and one decode step.

Pure functions over a `PackedModel` (weights), a `Work` (per-row scratch) and the KV cache;
the generator owns all three. Every op writes into preallocated outputs (`rollout/layers.py`),
so the decode step is graph-safe; prefill runs the same layers on right-padded prompts, which
keeps every real token at its true position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bitnet_rl.rollout.arch import Arch
from bitnet_rl.rollout.layers import decode_attention, norm_quant_linear, prefill_attention, rms_norm
from bitnet_rl.rollout.weights import PackedModel


@dataclass
class Work:
    """Per-row scratch of one forward pass (decode: views of static buffers)."""

    x_int8: torch.Tensor  # (M, max(D, I, H·hd)) int8
    act_dequant: torch.Tensor  # (M,) float32
    act_sum: torch.Tensor  # (M,) int32
    qkv: torch.Tensor  # (M, (H + 2·Hkv)·hd) float32
    attn: torch.Tensor  # (M, H·hd) dtype
    y: torch.Tensor  # (M, D) float32
    gate_up: torch.Tensor  # (M, 2·I) float32

    @classmethod
    def empty(cls, rows: int, arch: Arch, dtype: torch.dtype, device: torch.device) -> "Work":
        width = max(arch.hidden, arch.intermediate, arch.attn_width)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            x_int8=torch.zeros((rows, width), dtype=torch.int8, device=device),
            act_dequant=torch.zeros(rows, **f32),
            act_sum=torch.zeros(rows, dtype=torch.int32, device=device),
            qkv=torch.zeros((rows, arch.qkv_width), **f32),
            attn=torch.zeros((rows, arch.attn_width), dtype=dtype, device=device),
            y=torch.zeros((rows, arch.hidden), **f32),
            gate_up=torch.zeros((rows, 2 * arch.intermediate), **f32),
        )

    def rows(self, b: int) -> "Work":
        return Work(*(t[:b] for t in (self.x_int8, self.act_dequant, self.act_sum, self.qkv, self.attn, self.y, self.gate_up)))


@dataclass
class DecodeState:
    """Static per-row decode inputs (row i of the running bucket)."""

    tokens: torch.Tensor  # (B_max,) long, the token fed at this step
    positions: torch.Tensor  # (B_max,) int32, its position
    slots: torch.Tensor  # (B_max,) int32, its KV-cache slot
    origin: torch.Tensor  # (B_max,) long, its row in the output (B = dummy)
    active: torch.Tensor  # (B_max,) bool
    hidden: torch.Tensor  # (B_max, D) dtype, residual stream
    logits: torch.Tensor  # (B_max, V) activation dtype (the lm_head's output, as the policy computes it)

    @classmethod
    def empty(cls, rows: int, arch: Arch, dtype: torch.dtype, device: torch.device) -> "DecodeState":
        return cls(
            tokens=torch.zeros(rows, dtype=torch.long, device=device),
            positions=torch.zeros(rows, dtype=torch.int32, device=device),
            slots=torch.arange(rows, dtype=torch.int32, device=device),
            origin=torch.zeros(rows, dtype=torch.long, device=device),
            active=torch.zeros(rows, dtype=torch.bool, device=device),
            hidden=torch.zeros((rows, arch.hidden), dtype=dtype, device=device),
            logits=torch.zeros((rows, arch.vocab), dtype=dtype, device=device),
        )


Attend = Callable[[int, torch.Tensor, torch.Tensor], None]


def run_layers(model: PackedModel, hidden: torch.Tensor, work: Work, attend: Attend, kernels=None) -> None:
    """All decoder layers over the rows of `hidden` (updated in place to the final residual).

    `attend(i, qkv, out)` is layer i's attention; `kernels` (a `KernelTuner`) picks the W2A8 tiles.
    Each projection is `norm_quant_linear`: the norm + int8 quantization kernel, then the GEMM.
    """
    a, dt = model.arch, model.dtype
    quant = (work.x_int8, work.act_dequant, work.act_sum)
    kw = dict(dtype=dt, eps=a.eps, tuner=kernels)
    delta = None
    for i, w in enumerate(model.layers):
        first = delta is None
        norm_quant_linear(hidden if first else delta, w.qkv, work.qkv, quant, residual=None if first else hidden, norm_weight=w.input_norm, **kw)
        attend(i, work.qkv, work.attn)
        norm_quant_linear(work.attn, w.o, work.y, quant, norm_weight=w.attn_sub_norm, **kw)
        norm_quant_linear(work.y, w.gate_up, work.gate_up, quant, residual=hidden, norm_weight=w.post_norm, **kw)
        norm_quant_linear(work.gate_up, w.down, work.y, quant, gated=True, act=a.act, norm_weight=w.ffn_sub_norm, **kw)
        delta = work.y
    hidden.add_(delta.to(dt))


def head(model: PackedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head in the activation dtype → float32 logits."""
    x = rms_norm(hidden, model.final_norm, model.arch.eps)
    return F.linear(x, model.lm_head, model.lm_head_bias).float()


def head_into(model: PackedModel, hidden: torch.Tensor, out: torch.Tensor) -> None:
    """`head` without the float32 copy: the activation-dtype logits written into `out (b, V)`.

    The same cuBLAS product as `F.linear` (`mm` / `addmm` with the transposed weight), so the
    values equal `head`'s before its `.float()`; the sampler upcasts what it needs.
    """
    x = rms_norm(hidden, model.final_norm, model.arch.eps)
    if model.lm_head_bias is None:
        torch.mm(x, model.lm_head.t(), out=out)
    else:
        torch.addmm(model.lm_head_bias, x, model.lm_head.t(), out=out)


def attention_kwargs(model: PackedModel) -> dict:
    a = model.arch
    return dict(n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, scale=a.scale, dtype=model.dtype)


def decode_step(
    model: PackedModel, state: DecodeState, work: Work, k_cache: torch.Tensor, v_cache: torch.Tensor, b: int,
    *, kernels=None, attention_tile: dict | None = None,
) -> None:
    """One token for rows `0 … b−1` of the decode state → `state.logits[:b]` (activation dtype; graph-safe)."""
    hidden = state.hidden[:b]
    torch.index_select(model.embed, 0, state.tokens[:b], out=hidden)
    slots, positions = state.slots[:b], state.positions[:b]
    kwargs = dict(attention_kwargs(model), **(attention_tile or {}), pdl=kernels is not None and kernels.pdl_for(b))

    def attend(i: int, qkv: torch.Tensor, out: torch.Tensor) -> None:
        decode_attention(qkv, k_cache[i], v_cache[i], slots, positions, model.cos, model.sin, out, **kwargs)

    run_layers(model, hidden, work.rows(b), attend, kernels)
    head_into(model, hidden, state.logits[:b])


def prefill(
    model: PackedModel, ids: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
    *, slot_offset: int = 0, last: torch.Tensor | None = None, prefill_tokens: int = 16384, tuner=None,
    project: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Right-padded prompts `ids (B, P)` into cache slots `slot_offset …`, `prefill_tokens` rows a pass.

    Returns float32 logits at positions `last (B,)` → `(B, V)`, or at every position → `(B, P, V)`;
    with `project`, `project(final residual (b, P, D), first row)` per pass instead (concatenated).
    `tuner` (a `rollout.tuning.Tuner`) tunes the W2A8 tiles for each new row count first.
    Without caches (`k_cache = v_cache = None`, scoring and log-prob passes) no k/v is stored.
    """
    batch, length = ids.shape
    chunk = max(1, prefill_tokens // length)
    kwargs = attention_kwargs(model)
    kernels = tuner.kernels if tuner is not None else None
    outs = []
    for r0 in range(0, batch, chunk):
        sub = ids[r0 : r0 + chunk]
        b = sub.shape[0]
        rows = b * length
        if tuner is not None:
            tuner.prepare(model, rows)
        hidden = F.embedding(sub.reshape(-1), model.embed)
        slots = torch.arange(slot_offset + r0, slot_offset + r0 + b, device=model.device)

        def attend(i: int, qkv: torch.Tensor, out: torch.Tensor) -> None:
            caches = (None, None) if k_cache is None else (k_cache[i], v_cache[i])
            prefill_attention(qkv, *caches, slots, model.cos, model.sin, out, batch=b, **kwargs)

        run_layers(model, hidden, Work.empty(rows, model.arch, model.dtype, model.device), attend, kernels)
        hidden = hidden.view(b, length, -1)
        if project is not None:
            outs.append(project(hidden, r0))
            continue
        if last is not None:
            hidden = hidden[torch.arange(b, device=model.device), last[r0 : r0 + b]]
        outs.append(head(model, hidden))
    return torch.cat(outs)


def final_hidden(model: PackedModel, residual: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm of the residual stream (what the LM head reads)."""
    return rms_norm(residual, model.final_norm, model.arch.eps)


def prefill_logprobs(
    model: PackedModel, ids: torch.Tensor, *, prefill_tokens: int = 16384, tuner=None, chunk_rows: int = 4096
) -> torch.Tensor:
    """Log-probs `(B, L-1)` float32 of `ids[:, 1:]` under the packed model, on the prefill path.

    `ids (B, L)` right-padded (values after a row's end are don't-cares). No KV cache is written,
    and the LM head runs `chunk_rows` positions at a time (`models.forward.chunked_head_logprobs`),
    so no `(B, L, V)` logits exist.
    """
    from bitnet_rl.models.forward import chunked_head_logprobs

    labels = ids[:, 1:]

    def project(residual: torch.Tensor, r0: int) -> torch.Tensor:
        x = final_hidden(model, residual[:, :-1])
        rows = labels[r0 : r0 + x.shape[0]]
        return chunked_head_logprobs(x, model.lm_head, rows, model.lm_head_bias, chunk_rows=chunk_rows)[0]

    return prefill(model, ids, None, None, prefill_tokens=prefill_tokens, tuner=tuner, project=project)
