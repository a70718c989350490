"""PackedGenerator: rollouts from 2-bit packed weights and int8 activations.

The generator owns its own copy of the policy in inference form: every projection packed to
2 bits (fused q|k|v and gate|up), embeddings, norms and `lm_head` in bf16 (float32 on CPU), a
static KV cache of `max_batch_size × max_seq_len`, and preallocated decode buffers.
`sync_from(policy)` re-packs the training policy into those same tensors (no reallocation, so
captured CUDA graphs stay valid).

It always samples from the fully quantized model (ternary weights, int8 activations): at
λ < 1 the training policy computes a blend of full-precision and quantized weights, which this
generator does not reproduce. Use `PolicyGenerator` (backend "policy") when rollouts must come
from the λ-blended policy itself, e.g. during λ warm-up.

Prompts keep their own lengths: prefill runs right-padded (every token at its true position),
and each decode row carries its own position and cache slot, so a ragged batch produces the
same tokens as one prompt at a time. Decode runs in batch buckets (1, 2, 4, …): when enough rows
have finished, the live rows are moved to the front and the next smaller bucket runs, so
finished rows stop costing compute. On CUDA each bucket's decode step is one CUDA graph
(`rollout/capture.py`), built from Triton kernels (`quant/kernels`); elsewhere the same code
runs eagerly on torch reference ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import BitLinear, ternary_codes
from bitnet_rl.quant.kernels.w2a8 import PackedWeight, triton_available
from bitnet_rl.quant.pack import kernel_padded_in, pack_kernel
from bitnet_rl.rollout.capture import capture_graph
from bitnet_rl.rollout.layers import ACT_FNS, decode_attention, linear, norm_quant, prefill_attention, rms_norm
from bitnet_rl.rollout.output import RolloutOutput
from bitnet_rl.rollout.sampling import checked_request, prompt_lists, sample_tokens

SUPPORTED_MODEL_TYPES = ("bitnet", "llama")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


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
        width = max(arch.hidden, arch.intermediate, arch.n_heads * arch.head_dim)
        qkv_width = (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            x_int8=torch.zeros((rows, width), dtype=torch.int8, device=device),
            act_dequant=torch.zeros(rows, **f32),
            act_sum=torch.zeros(rows, dtype=torch.int32, device=device),
            qkv=torch.zeros((rows, qkv_width), **f32),
            attn=torch.zeros((rows, arch.n_heads * arch.head_dim), dtype=dtype, device=device),
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
    logits: torch.Tensor  # (B_max, V) float32


def _projection(layer: nn.Module, name: str) -> nn.Module:
    parent = layer.self_attn if name in ATTN_PROJ else layer.mlp
    return getattr(parent, name)


def inspect_policy(policy: nn.Module) -> Arch:
    """Check that `policy` is a BitNet/Llama-style causal LM with BitLinear projections."""
    config = getattr(policy, "config", None)
    model_type = getattr(config, "model_type", None)
    hint = "use `rollout.backend: policy` to sample with the policy itself"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"rollout.backend packed supports BitNet and Llama-style policies, not model_type={model_type!r}; {hint}")
    inner = getattr(policy, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(policy, "lm_head"):
        raise UserError(f"rollout.backend packed: {type(policy).__name__} has no model.layers / lm_head (a wrapped model?); {hint}")
    for i, layer in enumerate(layers):
        for name in ATTN_PROJ + MLP_PROJ:
            module = _projection(layer, name)
            if not isinstance(module, BitLinear):
                raise UserError(
                    f"rollout.backend packed: layers.{i}.{name} is {type(module).__name__}, not BitLinear "
                    f"(convert with bitnet_rl.models.convert.to_bitlinear, merge adapters first); {hint}"
                )
            if not module.quantize_activations:
                raise UserError(f"rollout.backend packed needs int8 activations (layers.{i}.{name} has quantize_activations=False); {hint}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ACT_FNS:
        raise UserError(f"rollout.backend packed: activation {act!r} is not supported (only {', '.join(ACT_FNS)}); {hint}")
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
        vocab=policy.lm_head.out_features,
        eps=layers[0].input_layernorm.variance_epsilon,
        act=act,
        scale=float(getattr(attn, "scaling", head_dim**-0.5)),
        sub_norms=hasattr(attn, "attn_sub_norm"),
        pad_token_id=int(pad),
        eos_token_ids=eos_ids,
    )


def _empty_packed(sources: Sequence[BitLinear], device: torch.device) -> PackedWeight:
    """Zeroed buffers for the row-stacked projections `sources` (filled by `sync_from`)."""
    in_features = sources[0].in_features
    groups = {m.group_size if m.granularity == "per_group" else 0 for m in sources}
    if len(groups) > 1 or any(m.in_features != in_features for m in sources):
        raise UserError("rollout.backend packed: fused projections (q/k/v, gate/up) must share in_features and quant.group_size")
    group = groups.pop()
    if group and device.type == "cuda" and group % 32:
        raise UserError(f"rollout.backend packed on CUDA needs quant.group_size divisible by 32, got {group}")
    n = sum(m.out_features for m in sources)
    has_bias = any(m.bias is not None for m in sources)
    return PackedWeight(
        packed=torch.zeros((n, kernel_padded_in(in_features) // 4), dtype=torch.uint8, device=device),
        dequant=torch.zeros((n, in_features // group) if group else (n,), dtype=torch.float32, device=device),
        in_features=in_features,
        out_features=n,
        group_size=group,
        bias=torch.zeros(n, dtype=torch.float32, device=device) if has_bias else None,
    )


def _pack_rows_(target: PackedWeight, row: int, module: BitLinear) -> int:
    """Re-pack `module` (λ = 1 codes and scale) into rows `row …` of `target`, in place."""
    group = module.group_size if module.granularity == "per_group" else 0
    if group != target.group_size or module.in_features != target.in_features:
        raise UserError("sync_from: the policy's quantization settings changed; build a new generator with from_model")
    weight = module.weight.detach().to(target.device)
    codes, scale = ternary_codes(weight, module.granularity, module.group_size)
    n = module.out_features
    pack_kernel(codes, out=target.packed[row : row + n])
    dequant = 1.0 / scale
    if group:
        target.dequant[row : row + n].copy_(dequant.squeeze(-1))
    else:
        target.dequant[row : row + n].copy_(dequant.reshape(-1).expand(n))
    if target.bias is not None:
        if module.bias is None:
            target.bias[row : row + n].zero_()
        else:
            target.bias[row : row + n].copy_(module.bias.detach())
    return row + n


class PackedGenerator:
    """Batched sampling from a 2-bit packed copy of a BitNet/Llama-style BitLinear policy.

    Build with `from_model`; refresh after optimizer steps with `sync_from`. See the module
    docstring for what is computed (always the fully quantized model, also at λ < 1).
    """

    def __init__(
        self,
        arch: Arch,
        *,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool,
        autotune: bool,
        prefill_tokens: int,
    ) -> None:
        self.arch = arch
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = device
        self.dtype = dtype
        self.use_triton = device.type == "cuda" and triton_available()
        self.cuda_graphs = cuda_graphs and self.use_triton
        self.autotune = autotune and self.use_triton
        self.prefill_tokens = prefill_tokens
        self.poll_every = 8 if device.type == "cuda" else 1
        self.layers: list[LayerWeights] = []
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._attention_tiles: dict[int, dict] = {}  # bucket → Triton attention tile

    # ---------------------------------------------------------------- building and syncing
    @classmethod
    def from_model(
        cls,
        policy: nn.Module,
        max_batch_size: int = 64,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        autotune: bool = True,
        prefill_tokens: int = 16384,
    ) -> "PackedGenerator":
        """Allocate every buffer for `policy`'s shapes and pack its current weights.

        `device` defaults to the policy's; `dtype` (embeddings, norms, lm_head, KV cache) to
        bf16 on CUDA and float32 elsewhere. `prefill_tokens` bounds the rows of one prefill pass.
        """
        arch = inspect_policy(policy)
        device = torch.device(device) if device is not None else next(policy.parameters()).device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.bfloat16, torch.float32):
            raise UserError(f"rollout dtype must be bfloat16 or float32, got {dtype}")
        gen = cls(
            arch, max_batch_size=max_batch_size, max_seq_len=max_seq_len, device=device, dtype=dtype,
            cuda_graphs=cuda_graphs, autotune=autotune, prefill_tokens=prefill_tokens,
        )
        gen._allocate(policy)
        gen.sync_from(policy)
        return gen

    def _allocate(self, policy: nn.Module) -> None:
        a, dev, dt = self.arch, self.device, self.dtype
        for layer in policy.model.layers:
            proj = {name: _projection(layer, name) for name in ATTN_PROJ + MLP_PROJ}
            self.layers.append(
                LayerWeights(
                    qkv=_empty_packed([proj["q_proj"], proj["k_proj"], proj["v_proj"]], dev),
                    o=_empty_packed([proj["o_proj"]], dev),
                    gate_up=_empty_packed([proj["gate_proj"], proj["up_proj"]], dev),
                    down=_empty_packed([proj["down_proj"]], dev),
                    input_norm=torch.zeros(a.hidden, dtype=dt, device=dev),
                    post_norm=torch.zeros(a.hidden, dtype=dt, device=dev),
                    attn_sub_norm=torch.zeros(a.n_heads * a.head_dim, dtype=dt, device=dev) if a.sub_norms else None,
                    ffn_sub_norm=torch.zeros(a.intermediate, dtype=dt, device=dev) if a.sub_norms else None,
                )
            )
        embed = policy.model.embed_tokens.weight
        self.tied = policy.lm_head.weight.data_ptr() == embed.data_ptr()
        self.embed = torch.zeros(embed.shape, dtype=dt, device=dev)
        self.lm_head = self.embed if self.tied else torch.zeros(policy.lm_head.weight.shape, dtype=dt, device=dev)
        self.lm_head_bias = None
        if getattr(policy.lm_head, "bias", None) is not None:
            self.lm_head_bias = torch.zeros(a.vocab, dtype=dt, device=dev)
        self.final_norm = torch.zeros(a.hidden, dtype=dt, device=dev)
        positions = torch.arange(self.max_seq_len, device=next(policy.parameters()).device)[None]
        probe = torch.zeros(1, dtype=dt, device=positions.device)
        with torch.no_grad():
            cos, sin = policy.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(dev).contiguous(), sin[0].to(dev).contiguous()
        cache_shape = (a.n_layers, self.max_batch_size, a.n_kv_heads, self.max_seq_len, a.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dt, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=dt, device=dev)
        bmax = self.max_batch_size
        self.state = DecodeState(
            tokens=torch.zeros(bmax, dtype=torch.long, device=dev),
            positions=torch.zeros(bmax, dtype=torch.int32, device=dev),
            slots=torch.arange(bmax, dtype=torch.int32, device=dev),
            origin=torch.zeros(bmax, dtype=torch.long, device=dev),
            active=torch.zeros(bmax, dtype=torch.bool, device=dev),
            hidden=torch.zeros((bmax, a.hidden), dtype=dt, device=dev),
            logits=torch.zeros((bmax, a.vocab), dtype=torch.float32, device=dev),
        )
        self.work = Work.empty(bmax, a, dt, dev)

    @torch.no_grad()
    def sync_from(self, policy: nn.Module) -> None:
        """Re-pack `policy`'s current weights into this generator's buffers, in place.

        No buffer is reallocated (their `data_ptr`s stay), so captured graphs remain valid.
        """
        inspect_policy(policy)
        if len(policy.model.layers) != len(self.layers):
            raise UserError("sync_from: the policy has a different number of layers; build a new generator with from_model")
        for layer, weights in zip(policy.model.layers, self.layers):
            row = 0
            for name in ("q_proj", "k_proj", "v_proj"):
                row = _pack_rows_(weights.qkv, row, _projection(layer, name))
            _pack_rows_(weights.o, 0, layer.self_attn.o_proj)
            row = _pack_rows_(weights.gate_up, 0, layer.mlp.gate_proj)
            _pack_rows_(weights.gate_up, row, layer.mlp.up_proj)
            _pack_rows_(weights.down, 0, layer.mlp.down_proj)
            weights.input_norm.copy_(layer.input_layernorm.weight)
            weights.post_norm.copy_(layer.post_attention_layernorm.weight)
            if weights.attn_sub_norm is not None:
                weights.attn_sub_norm.copy_(layer.self_attn.attn_sub_norm.weight)
                weights.ffn_sub_norm.copy_(layer.mlp.ffn_sub_norm.weight)
        self.embed.copy_(policy.model.embed_tokens.weight)
        if not self.tied:
            self.lm_head.copy_(policy.lm_head.weight)
        if self.lm_head_bias is not None:
            self.lm_head_bias.copy_(policy.lm_head.bias)
        self.final_norm.copy_(policy.model.norm.weight)

    def buffers(self) -> list[torch.Tensor]:
        """Every weight buffer `sync_from` writes (for checking that none moved)."""
        out = [self.embed, self.lm_head, self.final_norm]
        for w in self.layers:
            for pw in (w.qkv, w.o, w.gate_up, w.down):
                out += [pw.packed, pw.dequant] + ([pw.bias] if pw.bias is not None else [])
            out += [t for t in (w.input_norm, w.post_norm, w.attn_sub_norm, w.ffn_sub_norm) if t is not None]
        return out

    def weight_bytes(self) -> dict[str, int]:
        """Bytes read per decode step: packed projections (codes + scales) and the lm_head."""
        packed = sum(pw.packed.numel() + pw.dequant.numel() * 4 for w in self.layers for pw in (w.qkv, w.o, w.gate_up, w.down))
        return {"packed": packed, "lm_head": self.lm_head.numel() * self.lm_head.element_size()}

    # ---------------------------------------------------------------- forward passes
    def _run_layers(self, hidden: torch.Tensor, work: Work, attend: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """All decoder layers over the rows of `hidden` (updated in place to the final residual)."""
        a, dt = self.arch, self.dtype
        x_hidden = work.x_int8[:, : a.hidden]
        x_attn = work.x_int8[:, : a.n_heads * a.head_dim]
        x_inter = work.x_int8[:, : a.intermediate]
        quant = (work.act_dequant, work.act_sum)
        delta = None
        for i, w in enumerate(self.layers):
            norm_quant(
                hidden if delta is None else delta, x_hidden, *quant, dtype=dt,
                residual=None if delta is None else hidden, norm_weight=w.input_norm, eps=a.eps,
            )
            linear(x_hidden, *quant, w.qkv, work.qkv)
            attend(i, work.qkv, work.attn)
            norm_quant(work.attn, x_attn, *quant, dtype=dt, norm_weight=w.attn_sub_norm, eps=a.eps)
            linear(x_attn, *quant, w.o, work.y)
            norm_quant(work.y, x_hidden, *quant, dtype=dt, residual=hidden, norm_weight=w.post_norm, eps=a.eps)
            linear(x_hidden, *quant, w.gate_up, work.gate_up)
            norm_quant(work.gate_up, x_inter, *quant, dtype=dt, gated=True, act=a.act, norm_weight=w.ffn_sub_norm, eps=a.eps)
            linear(x_inter, *quant, w.down, work.y)
            delta = work.y
        hidden.add_(delta.to(dt))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head in the activation dtype → float32 logits."""
        x = rms_norm(hidden, self.final_norm, self.arch.eps)
        return F.linear(x, self.lm_head, self.lm_head_bias).float()

    def _attention_kwargs(self) -> dict:
        a = self.arch
        return dict(n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, scale=a.scale, dtype=self.dtype)

    def _decode_step(self, b: int) -> None:
        """One token for rows `0 … b−1` of the decode state → `state.logits[:b]` (graph-safe)."""
        s = self.state
        hidden = s.hidden[:b]
        torch.index_select(self.embed, 0, s.tokens[:b], out=hidden)
        slots, positions = s.slots[:b], s.positions[:b]
        kwargs = dict(self._attention_kwargs(), **self._attention_tiles.get(b, {}))

        def attend(i: int, qkv: torch.Tensor, out: torch.Tensor) -> None:
            decode_attention(qkv, self.k_cache[i], self.v_cache[i], slots, positions, self.cos, self.sin, out, **kwargs)

        self._run_layers(hidden, self.work.rows(b), attend)
        s.logits[:b].copy_(self._head(hidden))

    def _prefill(self, ids: torch.Tensor, slot_offset: int = 0, last: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded prompts `ids (B, P)` into cache slots `slot_offset …`.

        Returns float32 logits at positions `last (B,)` → `(B, V)`, or at every position → `(B, P, V)`.
        """
        batch, length = ids.shape
        chunk = max(1, self.prefill_tokens // length)
        kwargs = self._attention_kwargs()
        outs = []
        for r0 in range(0, batch, chunk):
            sub = ids[r0 : r0 + chunk]
            b = sub.shape[0]
            rows = b * length
            self._maybe_tune(rows)
            hidden = F.embedding(sub.reshape(-1), self.embed)
            slots = torch.arange(slot_offset + r0, slot_offset + r0 + b, device=self.device)

            def attend(i: int, qkv: torch.Tensor, out: torch.Tensor) -> None:
                prefill_attention(qkv, self.k_cache[i], self.v_cache[i], slots, self.cos, self.sin, out, batch=b, **kwargs)

            self._run_layers(hidden, Work.empty(rows, self.arch, self.dtype, self.device), attend)
            hidden = hidden.view(b, length, -1)
            if last is not None:
                hidden = hidden[torch.arange(b, device=self.device), last[r0 : r0 + b]]
            outs.append(self._head(hidden))
        return torch.cat(outs)

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Float32 logits `(B, P, V)` of a full forward pass (for tests); ragged lists are right-padded."""
        prompts = prompt_lists(input_ids)
        ids = self._padded(prompts)
        outs = [self._prefill(ids[i : i + self.max_batch_size]) for i in range(0, len(prompts), self.max_batch_size)]
        return torch.cat(outs)

    # ---------------------------------------------------------------- CUDA graphs and tuning
    def _maybe_tune(self, rows: int) -> None:
        if not self.autotune:
            return
        from bitnet_rl.quant.kernels import triton_w2a8

        key = triton_w2a8.m_class(rows)
        for pw in (self.layers[0].qkv, self.layers[0].o, self.layers[0].gate_up, self.layers[0].down):
            shape_key = (key, pw.out_features, pw.packed.shape[1], bool(pw.group_size))
            if shape_key not in triton_w2a8._TUNED:
                triton_w2a8.tune(pw, rows)

    # (block_n, num_warps, num_stages) candidates for the Triton decode attention
    ATTENTION_TILES = ((32, 4, 3), (64, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 2), (256, 8, 1))

    def _tune_attention(self, b: int, length: int = 256) -> list[tuple[float, dict]]:
        """Time the decode-attention tiles for `b` rows at `length` cached tokens on scratch
        buffers (the live cache is untouched); remember the fastest for bucket `b`."""
        from bitnet_rl.quant.kernels.triton_w2a8 import time_graph

        a, dev = self.arch, self.device
        length = min(length, self.max_seq_len - 1)
        k_cache = torch.randn((b, a.n_kv_heads, length + 1, a.head_dim), dtype=self.dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        qkv = torch.randn((b, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim), device=dev)
        out = torch.empty((b, a.n_heads * a.head_dim), dtype=self.dtype, device=dev)
        slots = torch.arange(b, dtype=torch.int32, device=dev)
        positions = torch.full((b,), length, dtype=torch.int32, device=dev)
        results = []
        for block_n, warps, stages in self.ATTENTION_TILES:
            tile = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            run = lambda: decode_attention(qkv, k_cache, v_cache, slots, positions, self.cos, self.sin, out, **self._attention_kwargs(), **tile)  # noqa: E731
            try:
                results.append((1e3 * time_graph(run), tile))
            except Exception:  # a tile that needs more shared memory than the GPU has is skipped
                continue
        results.sort(key=lambda r: r[0])
        self._attention_tiles[b] = results[0][1] if results else {}
        return results

    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Tune and capture the decode graphs of `buckets` (default: all) ahead of time."""
        for b in buckets or self.buckets():
            self._graph(b)

    def _graph(self, b: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(b)
        if graph is None:
            self._maybe_tune(b)
            if self.autotune and b not in self._attention_tiles:
                self._tune_attention(b)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = capture_graph(lambda: self._decode_step(b), pool=self._graph_pool)
            self._graphs[b] = graph
        return graph

    def _step(self, b: int) -> None:
        if self.cuda_graphs:
            self._graph(b).replay()
        else:
            self._maybe_tune(b)
            self._decode_step(b)

    def buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.max_batch_size:
            sizes.append(b)
            b *= 2
        return sizes + [self.max_batch_size]

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets() if b >= n)

    # ---------------------------------------------------------------- generation
    def _padded(self, prompts: list[list[int]]) -> torch.Tensor:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        length = max(len(p) for p in prompts)
        if length > self.max_seq_len:
            raise UserError(f"generate: a prompt has {length} tokens, more than max_seq_len={self.max_seq_len}")
        ids = torch.full((len(prompts), length), self.arch.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        return ids.to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        return_logprobs: bool = True,
    ) -> RolloutOutput:
        """Sample up to `max_new_tokens` per prompt (ragged prompts allowed, no left padding).

        `temperature == 0` is greedy. `stop_token_ids` (default: the policy's eos ids) end a
        row with finish reason "stop"; the stop token is part of the completion. A `seed`
        makes sampling reproducible (a private torch.Generator; the global RNG is untouched).
        """
        prompts = checked_request(input_ids, max_new_tokens, temperature, top_k, top_p)
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > self.max_seq_len:
            raise UserError(
                f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.max_seq_len}"
            )
        stops = self.arch.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, with_logprobs=return_logprobs)
        parts = [
            self._generate_batch(prompts[i : i + self.max_batch_size], max_new_tokens, stop_ids, sampling)
            for i in range(0, len(prompts), self.max_batch_size)
        ]
        return _concat_outputs(parts, self.arch.pad_token_id)

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: torch.Tensor, sampling: dict) -> RolloutOutput:
        pad, dev = self.arch.pad_token_id, self.device
        batch = len(prompts)
        ids = self._padded(prompts)
        lengths_in = torch.tensor([len(p) for p in prompts], device=dev)
        tokens, logprobs, logprobs_t1 = sample_tokens(self._prefill(ids, last=lengths_in - 1), **sampling)

        # Output rows 0 … B−1, plus a dummy row B that absorbs writes of padding rows.
        out_ids = torch.full((batch + 1, max_new_tokens), pad, dtype=torch.long, device=dev)
        out_lp = torch.zeros((batch + 1, max_new_tokens), dtype=torch.float32, device=dev)
        out_lp1 = torch.zeros_like(out_lp)
        lengths = torch.zeros(batch + 1, dtype=torch.long, device=dev)
        stopped = torch.zeros(batch + 1, dtype=torch.bool, device=dev)
        out_ids[:batch, 0] = tokens
        if logprobs is not None:
            out_lp[:batch, 0], out_lp1[:batch, 0] = logprobs, logprobs_t1
        lengths[:batch] = 1
        hit = torch.isin(tokens, stop_ids)
        stopped[:batch] = hit

        s, b = self.state, self._bucket(batch)
        s.tokens[:b].fill_(pad)
        s.tokens[:batch] = tokens
        s.positions[:b].zero_()
        s.positions[:batch] = lengths_in.to(torch.int32)
        s.slots[:b] = torch.arange(b, dtype=torch.int32, device=dev)
        s.origin[:b].fill_(batch)
        s.origin[:batch] = torch.arange(batch, device=dev)
        s.active[:b].zero_()
        s.active[:batch] = ~hit

        count = _ActiveCount(dev)
        for t in range(1, max_new_tokens):
            if (t - 1) % self.poll_every == 0:
                n = count.read(s.active[:b])
                if n == 0:
                    break
                if n is not None and self._bucket(n) < b:
                    self._compact(b)
                    b = self._bucket(n)
                count.start(s.active[:b])
            self._step(b)
            tokens, logprobs, logprobs_t1 = sample_tokens(s.logits[:b], **sampling)
            active, origin = s.active[:b], s.origin[:b]
            out_ids[origin, t] = torch.where(active, tokens, pad)
            if logprobs is not None:
                out_lp[origin, t] = torch.where(active, logprobs, 0.0)
                out_lp1[origin, t] = torch.where(active, logprobs_t1, 0.0)
            lengths.index_add_(0, origin, active.long())
            hit = active & torch.isin(tokens, stop_ids)
            stopped[origin] = stopped[origin] | hit
            s.positions[:b] += active.to(torch.int32)
            s.tokens[:b] = tokens
            s.active[:b] = active & ~hit

        lengths, stopped = lengths[:batch], stopped[:batch]
        width = int(lengths.max())
        return RolloutOutput(
            prompt_ids=ids,
            prompt_lengths=lengths_in,
            completion_ids=out_ids[:batch, :width],
            logprobs=out_lp[:batch, :width],
            logprobs_t1=out_lp1[:batch, :width],
            lengths=lengths,
            finish_reasons=["stop" if x else "length" for x in stopped.tolist()],
            pad_token_id=pad,
        )

    def _compact(self, b: int) -> None:
        """Move the live rows of bucket `b` to the front (their slots move with them)."""
        s = self.state
        order = torch.argsort((~s.active[:b]).to(torch.int8), stable=True)
        for buf in (s.tokens, s.positions, s.slots, s.origin, s.active):
            buf[:b] = buf[:b][order]


class _ActiveCount:
    """Number of live rows, read one poll late so the GPU queue never drains (CPU: at once)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: torch.cuda.Event | None = None
        self.host = torch.zeros((), dtype=torch.long, pin_memory=device.type == "cuda")

    def start(self, active: torch.Tensor) -> None:
        if self.device.type != "cuda":
            return
        self.host.copy_(active.sum(), non_blocking=True)
        self.pending = torch.cuda.Event()
        self.pending.record()

    def read(self, active: torch.Tensor) -> int | None:
        if self.device.type != "cuda":
            return int(active.sum())
        if self.pending is None:
            return None
        self.pending.synchronize()
        return int(self.host)


def _concat_outputs(parts: list[RolloutOutput], pad: int) -> RolloutOutput:
    if len(parts) == 1:
        return parts[0]

    def cat(name: str, fill) -> torch.Tensor:
        tensors = [getattr(p, name) for p in parts]
        width = max(t.shape[1] for t in tensors)
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])

    return RolloutOutput(
        prompt_ids=cat("prompt_ids", pad),
        prompt_lengths=torch.cat([p.prompt_lengths for p in parts]),
        completion_ids=cat("completion_ids", pad),
        logprobs=cat("logprobs", 0.0),
        logprobs_t1=cat("logprobs_t1", 0.0),
        lengths=torch.cat([p.lengths for p in parts]),
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        pad_token_id=pad,
    )
