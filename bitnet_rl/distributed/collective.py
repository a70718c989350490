"""The cross-rank operations the training loops call, bound to an accelerate `Accelerator`.

With one process every function here is the identity (no collective is issued), so the
single-process path is unchanged. With several, the run directory is written by the main
process only, behind barriers (`main_then_wait`), and statistics become global.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from bitnet_rl.distributed.reduce import AllReduce, local_only, weighted_means

T = TypeVar("T")


def all_reduce_sum(accelerator) -> AllReduce:
    """`t ↦ Σ_ranks t` on the accelerator's device (the identity in one process); returns on `t`'s device."""
    return local_only if accelerator.num_processes == 1 else sum_over_ranks(accelerator.device)


def sum_over_ranks(device: torch.device | str) -> AllReduce:
    """`t ↦ Σ_ranks t` through `device` (a CUDA tensor for NCCL, a CPU one for gloo); returns on `t`'s device."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    return reduce


def all_reduce_max(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    out = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out[0])


def all_ranks(accelerator) -> Callable[[bool], bool]:
    """`flag ↦ True when every rank's flag is True` (one all-reduce per call; `bool` in one process)."""
    if accelerator.num_processes == 1:
        return bool
    reduce = all_reduce_sum(accelerator)
    return lambda flag: float(reduce(torch.tensor([0.0 if flag else 1.0]))[0]) == 0.0


def main_then_wait(accelerator, fn: Callable[[], T]) -> T | None:
    """Everyone reaches this point, the main process runs `fn`, everyone waits for it.

    The first barrier makes sure no rank is still checking OUT (`check_run`) while the main
    process starts writing it; the second that nothing reads OUT before it is written.
    """
    accelerator.wait_for_everyone()
    result = fn() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return result


def gather_rows(accelerator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of `(B, T…)` tensors concatenated in rank order (T padded with 0 to the
    longest rank's): what one process would hold after sampling all ranks' prompts."""
    if accelerator.num_processes == 1:
        return tensors
    out = []
    for tensor in tensors:
        padded = accelerator.pad_across_processes(tensor.contiguous(), dim=1, pad_index=0) if tensor.dim() > 1 else tensor.contiguous()
        out.append(accelerator.gather(padded))
    return tuple(out)


def reduce_step_stats(accelerator, stats: Mapping[str, float], count: float, sums: Mapping[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(means, sums) over ranks: `stats` are local means over `count` items (sequences, tokens), so
    the global value weighs each rank by its count; `sums` (tokens, examples) add up."""
    reduce = all_reduce_sum(accelerator)
    means = weighted_means(stats, {k: count for k in stats}, reduce) if accelerator.num_processes > 1 else dict(stats)
    totals = dict(sums or {})
    if totals and accelerator.num_processes > 1:
        keys = sorted(totals)
        summed = reduce(torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64))
        totals = {k: float(v) for k, v in zip(keys, summed)}
    return means, totals


def reduce_rollout_stats(
    accelerator, stats: dict[str, Any], weights: Mapping[str, float], maxima: tuple[str, ...] = (), sums: tuple[str, ...] = ()
) -> dict[str, Any]:
    """PPO's per-iteration numbers over ranks: weighted means for the keys of `weights` (prefix
    match: `mismatch/` covers all mismatch keys), maxima for `maxima` (times, rounds), totals for
    `sums` (throughputs, counts), the rest (constants like kl_coef, strings) left as the main
    process has them. Every rank must pass the same keys."""
    if accelerator.num_processes == 1:
        return stats
    weights = {**weights, **{k: 1.0 for k in sums}}
    numeric = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    weight_of = {k: next((w for prefix, w in weights.items() if k == prefix or (prefix.endswith("/") and k.startswith(prefix))), None) for k in numeric}
    averaged = {k: v for k, v in numeric.items() if weight_of[k] is not None}
    out = dict(stats)
    out.update(weighted_means(averaged, {k: weight_of[k] for k in averaged}, all_reduce_sum(accelerator)))
    for key in sums:
        if key in out:
            out[key] = out[key] * accelerator.num_processes  # mean over ranks × ranks
    for key in maxima:  # every rank issues the same collectives, whatever keys it has
        value = all_reduce_max(accelerator, numeric.get(key, float("-inf")))
        if key in numeric:
            out[key] = value
    return out


def skip_grad_sync(accelerator, models, sync: bool):
    """Gradient accumulation under DDP: inside, backward leaves the gradients of `models` local
    (`no_sync`) unless `sync` (the last micro-batch, whose backward all-reduces the sum)."""
    stack = ExitStack()
    if not sync and accelerator.num_processes > 1:
        for model in models:
            if model is not None:
                stack.enter_context(accelerator.no_sync(model))
    return stack


def forward_through(model, fn: Callable[..., T], **inputs) -> T:
    """`fn(inner, **inputs)` run as the forward pass of `model`, where `inner` is the plain module.

    Code that calls parts of a model (the backbone, then a head) must still enter through the
    wrapper's forward: DDP only all-reduces the gradients of a backward whose forward went through
    it (otherwise the ranks silently drift apart), and FSDP2 gathers the root's shards (embeddings,
    heads) in the root's forward hooks. The plain module's `forward` is replaced for this one call.
    Without a wrapper or shards this is just `fn(model, **inputs)`.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        inner = model.module
    elif isinstance(model, FSDPModule):
        inner = model
    else:
        return fn(model, **inputs)
    inner.forward = lambda **kwargs: fn(inner, **kwargs)  # an instance attribute shadows the class's forward
    try:
        return model(**inputs)
    finally:
        del inner.forward
