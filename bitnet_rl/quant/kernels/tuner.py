"""KernelTuner: the W2A8 tile chosen per shape, owned by whoever runs the kernels.

A generator (or a frozen packed model) owns one tuner; nothing about tuning lives in module
globals. The first call for a `(row class, N, packed K, per-group)` shape times every candidate
tile of `triton_w2a8.candidates` as CUDA-graph replays and keeps the fastest; without tuning
(`autotune=False`) the heuristic `select_config` tile runs, the same tile every time, which
makes runs with and without graphs do identical arithmetic. `use_asm` records whether the
inline-PTX unpack builds on this Triton (switched off by the first failing launch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KernelTuner:
    autotune: bool = True
    use_asm: bool = True
    configs: dict = field(default_factory=dict)  # (m_class, N, KB, group) → triton_w2a8.Config

    @staticmethod
    def key(m: int, n: int, kb: int, group: bool) -> tuple[int, int, int, bool]:
        from bitnet_rl.quant.kernels.triton_w2a8 import m_class

        return (m_class(m), n, kb, group)

    def config(self, m: int, n: int, kb: int, group: bool, device: torch.device):
        """The tuned tile for this shape if one was timed, else the heuristic one."""
        from bitnet_rl.quant.kernels.triton_w2a8 import select_config

        tuned = self.configs.get(self.key(m, n, kb, group))
        return tuned if tuned is not None else select_config(m, n, kb, group, device)

    def tune(self, weight, m: int, *, verbose: bool = False) -> list:
        """Time every candidate for `weight` at `m` rows and keep the fastest; `(µs, config)` list."""
        from bitnet_rl.quant.kernels.triton_w2a8 import time_candidates

        results = time_candidates(weight, m, verbose=verbose, use_asm=None if self.use_asm else False)
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
