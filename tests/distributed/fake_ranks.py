"""Simulated ranks in one process: each rank is a thread, `all_reduce` sums over them (a barrier
per call), so a function written for `distributed.reduce` runs unchanged on each rank's data."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch


def run_ranks(fn: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], Any], world: int) -> list[Any]:
    """[fn(rank, all_reduce) for each rank], the ranks running concurrently."""
    barrier = threading.Barrier(world)
    slots: list[torch.Tensor | None] = [None] * world
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def all_reduce_for(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.detach().clone()
            barrier.wait()
            total = torch.stack([s for s in slots]).sum(0)  # type: ignore[misc]
            barrier.wait()  # everyone has read before the next call overwrites
            return total.to(tensor.dtype)

        return reduce

    def work(rank: int) -> None:
        try:
            results[rank] = fn(rank, all_reduce_for(rank))
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def split_rows(tensor: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(tensor.split(list(sizes)))
