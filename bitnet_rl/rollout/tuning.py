"""Tuning and graph capture for the packed generator: one `Tuner` object, owned by the generator.

It keeps every choice made on this GPU for this model: the W2A8 tiles per shape (a
`KernelTuner`), the decode-attention tile per batch bucket, and the captured decode graph per
bucket (sharing one memory pool). Nothing here is module-level state, so two generators in
one process tune and capture independently.
"""

from __future__ import annotations

from typing import Callable

import torch

from bitnet_rl.quant.kernels.tuner import KernelTuner
from bitnet_rl.rollout.capture import capture_graph
from bitnet_rl.rollout.layers import decode_attention

# (block_n, num_warps, num_stages) candidates for the Triton decode attention
ATTENTION_TILES = ((32, 4, 3), (64, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 2), (256, 8, 1))


class Tuner:
    def __init__(self, *, autotune: bool, pdl: bool = True) -> None:
        self.autotune = autotune
        self.kernels = KernelTuner(autotune=autotune, pdl=pdl)
        self.attention_tiles: dict[int, dict] = {}  # bucket → Triton attention tile
        self.graphs: dict = {}  # key (bucket, or the generator's (bucket, variant)) → captured graph
        self._pool = None

    def prepare(self, model, rows: int) -> None:
        """Tune the W2A8 tiles of `model`'s projection shapes at `rows` rows (once per row class)."""
        self.kernels.ensure(model.layers[0].projections(), rows)

    def attention_tile(self, b: int) -> dict:
        return self.attention_tiles.get(b, {})

    def tune_attention(self, model, b: int, max_seq_len: int, length: int = 256) -> list[tuple[float, dict]]:
        """Time the decode-attention tiles for `b` rows at `length` cached tokens on scratch
        buffers (the live cache is untouched); remember the fastest for bucket `b`."""
        from bitnet_rl.quant.kernels.tuner import time_graph
        from bitnet_rl.rollout.forward import attention_kwargs

        a, dev = model.arch, model.device
        length = min(length, max_seq_len - 1)
        k_cache = torch.randn((b, a.n_kv_heads, length + 1, a.head_dim), dtype=model.dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        qkv = torch.randn((b, a.qkv_width), device=dev)
        out = torch.empty((b, a.attn_width), dtype=model.dtype, device=dev)
        slots = torch.arange(b, dtype=torch.int32, device=dev)
        positions = torch.full((b,), length, dtype=torch.int32, device=dev)
        results = []
        for block_n, warps, stages in ATTENTION_TILES:
            tile = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            run = lambda: decode_attention(qkv, k_cache, v_cache, slots, positions, model.cos, model.sin, out, **attention_kwargs(model), **tile, pdl=self.kernels.pdl_for(b))  # noqa: E731
            try:
                results.append((1e3 * time_graph(run), tile))
            except Exception:  # a tile that needs more shared memory than the GPU has is skipped
                continue
        results.sort(key=lambda r: r[0])
        self.attention_tiles[b] = results[0][1] if results else {}
        return results

    def reset_graphs(self) -> None:
        """Drop every captured graph and their memory pool (the next use captures again, into a new
        pool: capturing into the pool of destroyed graphs trips the caching allocator)."""
        self.graphs.clear()
        self._pool = None

    def graph(self, key, b: int, model, max_seq_len: int, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """The graph `key` of a decode step for bucket `b`: tuned (tiles, attention) and captured on first use."""
        graph = self.graphs.get(key)
        if graph is None:
            self.prepare(model, b)
            if self.autotune and b not in self.attention_tiles:
                self.tune_attention(model, b, max_seq_len)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = capture_graph(step, pool=self._pool)
            self.graphs[key] = graph
        return graph
