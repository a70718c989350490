"""CUDA-graph capture of the decode step: the one place the generator compiles anything.

The decode step writes only into preallocated buffers, reads its inputs (tokens, positions,
cache slots) from device memory and makes no host syncs, so one captured graph per batch
bucket replays it exactly. Running the step a few times on a side stream first compiles the
Triton kernels and settles the caching allocator; the step is idempotent for a given state,
so warming up (or capturing) in the middle of a generation is harmless.
"""

from __future__ import annotations

from typing import Callable

import torch


def capture_graph(step: Callable[[], None], *, pool=None, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Warm `step` up on a side stream, then capture one call of it into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph
