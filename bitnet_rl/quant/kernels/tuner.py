"""KernelTuner: the W2A8 tile chosen per shape, owned by whoever runs the kernels.

A generator (or a frozen packed model) owns one tuner; nothing about tuning lives in module
globals. The first call for a `(row class, N, packed K, per-group)` shape times every candidate
tile of `w2a8_tiles.candidates` as CUDA-graph replays and keeps the fastest; without tuning
(`autotune=False`) the heuristic `select_config` tile runs. Tiles differ in speed only: each sums
exact int32 products (split-K included) and applies the same float epilogue once, so the output
bits do not depend on the tile the tuner keeps. `use_asm` records whether the inline-PTX
unpack builds on this Triton (switched off by the first failing launch); `pdl` whether the
kernels run for this tuner's owner launch with programmatic dependent launch (`triton_gdc.py`;
only where the GPU supports it, and over at most `PDL_MAX_ROWS` rows); `scratch` is the int32
memory of its split-K tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# PDL lets the next kernel's programs start and wait on the GPU while this one's last programs run:
# a gain where grids are small, a loss where they fill the GPU. H200, 2B4T shape, decode ms/token
# without → with PDL (benchmarks/decode_pdl.py): batch 1 1.58 → 1.45, batch 64 2.61 → 2.60, batch 256 4.99 → 5.24.
PDL_MAX_ROWS = 64


@dataclass
class SplitScratch:
    """int32 memory of deterministic split-K, per device: the slices' partial-sum slabs and the
    tile counters, which the kernels leave at zero, so nothing is ever cleared. A larger shape
    gets larger buffers; the smaller ones stay alive for the CUDA graphs that use them."""

    buffers: dict = field(default_factory=dict)  # device → [(slabs, counters)], newest last

    def take(self, device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.buffers.setdefault(torch.device(device), [])
        if not held or held[-1][0].numel() < numel or held[-1][1].numel() < tiles:
            size = max(numel, held[-1][0].numel() if held else 0)
            count = max(tiles, held[-1][1].numel() if held else 0)
            held.append((torch.empty(size, dtype=torch.int32, device=device), torch.zeros(count, dtype=torch.int32, device=device)))
        slabs, counters = held[-1]
        return slabs[:numel], counters[:tiles]


@dataclass
class KernelTuner:
    autotune: bool = True
    use_asm: bool = True
    pdl: bool = True
    configs: dict = field(default_factory=dict)  # (m_class, N, KB, group) → w2a8_tiles.Config
    scratch: SplitScratch = field(default_factory=SplitScratch)

    def pdl_for(self, rows: int) -> bool:
        """Whether kernels over `rows` rows launch with PDL: `pdl` and at most `PDL_MAX_ROWS` rows."""
        return self.pdl and rows <= PDL_MAX_ROWS

    @staticmethod
    def key(m: int, n: int, kb: int, group: bool) -> tuple[int, int, int, bool]:
        from bitnet_rl.quant.kernels.w2a8_tiles import m_class

        return (m_class(m), n, kb, group)

    def config(self, m: int, n: int, kb: int, group: bool, device: torch.device):
        """The tuned tile for this shape if one was timed, else the heuristic one."""
        from bitnet_rl.quant.kernels.w2a8_tiles import select_config

        tuned = self.configs.get(self.key(m, n, kb, group))
        return tuned if tuned is not None else select_config(m, n, kb, group, device)

    def tune(self, weight, m: int, *, verbose: bool = False) -> list:
        """Time every candidate for `weight` at `m` rows and keep the fastest; `(µs, config)` list."""
        results = time_candidates(weight, m, verbose=verbose, use_asm=None if self.use_asm else False, pdl=self.pdl_for(m), scratch=self.scratch)
        if results:
            self.configs[self.key(m, *weight.packed.shape, bool(weight.group_size))] = results[0][1]
        return results

    def ensure(self, weights, m: int) -> None:
        """Tune each of `weights` at `m` rows once (no-op when autotune is off or already tuned)."""
        if not self.autotune:
            return
        for w in weights:
            if self.key(m, *w.packed.shape, bool(w.group_size)) not in self.configs:
                self.tune(w, m)


def time_graph(fn, replays: int = 10) -> float:
    """Milliseconds per call of `fn`, timed as CUDA-graph replays (no launch overhead in the number)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_replays(graph, replays)


def time_replays(graph, replays: int = 10) -> float:
    """Milliseconds per replay of a captured CUDA graph (one warm replay first)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def rotating_copies(weight, budget_bytes: int = 256 << 20, cap: int = 64) -> list:
    """Copies of `weight` whose total exceeds the L2 cache, so timing sees memory, not cache."""
    count = max(1, min(cap, budget_bytes // max(weight.nbytes(), 1)))
    return [weight.clone() for _ in range(count)]


def time_candidates(weight, m: int, *, verbose: bool = False, use_asm: bool | None = None, pdl: bool = False, scratch=None) -> list:
    """Time every candidate for `weight` at `m` rows (CUDA graphs, weights rotated past L2).
    Returns `(µs per call, config)`, fastest first (the caller keeps the winner)."""
    n, kb = weight.packed.shape
    group = bool(weight.group_size)
    device = weight.packed.device
    x = torch.randint(-127, 128, (m, weight.in_features), dtype=torch.int8, device=device)
    xdq = torch.rand(m, device=device) * 1e-2
    xsum = x.sum(-1, dtype=torch.int32)
    out = torch.empty((m, n), dtype=torch.float32, device=device)
    weights = rotating_copies(weight)
    from bitnet_rl.quant.kernels.triton_w2a8 import launch
    from bitnet_rl.quant.kernels.w2a8_tiles import candidates

    results = []
    for config in candidates(m, n, kb, group):
        def run(c=config):
            for w in weights:
                launch(x, xdq, xsum, w, out, c, use_asm=use_asm, pdl=pdl, scratch=scratch)

        try:
            ms = time_graph(run) / len(weights)
        except Exception as err:  # a tile that does not compile or fit is skipped
            if verbose:
                print(f"skip {config}: {type(err).__name__}: {err}")
            continue
        results.append((ms * 1e3, config))
    results.sort(key=lambda r: r[0])
    return results
