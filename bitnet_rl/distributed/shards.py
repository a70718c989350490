"""Held-out evaluation split across ranks: each rank scores its share of the validation
examples and the sums are all-reduced, so N processes evaluate N times faster and report what
one process reports.

Under FSDP2 every forward is collective (each layer all-gathers its shards), so every rank must
run as many forwards: ranks with fewer examples repeat a batch of their own, marked as padding,
whose results are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from bitnet_rl.distributed.collective import sum_over_ranks
from bitnet_rl.distributed.reduce import AllReduce, local_only


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks: `rank` of `world`, and the sum over ranks."""

    rank: int = 0
    world: int = 1
    all_reduce: AllReduce = field(default=local_only, compare=False)

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is True on every rank (one all-reduce; `flag` itself in one process)."""
        return float(self.all_reduce(torch.tensor([0.0 if flag else 1.0]))[0]) == 0.0


def process_shard(device: torch.device | str) -> Shard:
    """The running process's `Shard` (one process: `Shard()`); sums go through `device`
    (a CUDA tensor for NCCL, a CPU one for gloo)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Shard()
    return Shard(dist.get_rank(), dist.get_world_size(), sum_over_ranks(device))


def shard_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches over `n` examples: `(indices, is_padding)` pairs.

    The rank takes examples rank, rank + world, rank + 2·world, … in batches of `batch_size`;
    every rank gets ceil(ceil(n / world) / batch_size) batches, the ranks that run out first
    repeating their first batch (or example 0) as padding. One process: batches of 0..n-1 in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    count = -(-per_rank // batch_size)
    batches = [(mine[start : start + batch_size], False) for start in range(0, len(mine), batch_size)]
    filler = batches[0][0] if batches else [0]
    return batches + [(filler, True)] * (count - len(batches)) if n else []


def shard_loader(
    examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]], batch_size: int, shard: Shard, device: torch.device | str
) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """`(batch, is_padding)` for each of this rank's `shard_batches`: collated and moved to `device`."""
    for rows, padding in shard_batches(len(examples), batch_size, shard.rank, shard.world):
        yield {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}, padding
