"""Cross-rank statistics as pure functions of the local data and an all-reduce callable.

`all_reduce(t)` returns the elementwise sum of `t` over all ranks (the identity in one process),
so every function here computes, on each rank, exactly what one process computes on the
concatenated data of all ranks; tests check that by simulating ranks in one process.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # elementwise sum over ranks


def local_only(tensor: torch.Tensor) -> torch.Tensor:
    """The all-reduce of a single process."""
    return tensor


@torch.no_grad()
def global_masked_moments(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = local_only) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance, count) of `values` where `mask` is 1, over all ranks.

    Two reductions: n = Σ m and s = Σ m·x first, then the centred sum of squares
    q = Σ m·(x − mean)² (more stable than Σ m·x² − n·mean²). var = q / (n − 1). Shapes: any, equal.
    """
    mask = mask.to(values.dtype)
    first = all_reduce(torch.stack([mask.sum(), (values * mask).sum()]))
    count, mean = first[0], first[1] / first[0].clamp(min=1)
    centred = all_reduce(((values - mean).square() * mask).sum().reshape(1))[0]
    return mean, centred / (count - 1).clamp(min=1), count


def global_masked_whiten(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = local_only, shift_mean: bool = True) -> torch.Tensor:
    """`rl.advantages.masked_whiten` with the mean and unbiased variance of all ranks' valid entries:
    (x − mean) / sqrt(var + 1e-8) (mean added back if not `shift_mean`); padding comes back 0. (B, T) -> (B, T)"""
    mean, var, count = global_masked_moments(values, mask, all_reduce)
    if count < 2:
        raise ValueError("whitening needs at least 2 valid entries over all ranks")
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def global_whiten_per_sequence(per_sequence: torch.Tensor, all_reduce: AllReduce = local_only) -> torch.Tensor:
    """`rl.estimators.whiten_per_sequence` over all ranks' sequences: (a − mean) / (std + 1e-8),
    unbiased std; with fewer than 2 sequences in all, only the mean is removed. (B,) -> (B,)"""
    mean, var, count = global_masked_moments(per_sequence, torch.ones_like(per_sequence), all_reduce)
    if count < 2:
        return per_sequence - mean
    return (per_sequence - mean) / (var.sqrt() + 1e-8)


def loss_denominator(local_count: torch.Tensor | float, world_size: int, all_reduce: AllReduce = local_only) -> torch.Tensor:
    """The denominator that makes DDP's gradient average equal one process's global mean.

    Each rank divides its loss sum S_r by D = (Σ_r n_r) / world; DDP averages the ranks'
    gradients, so the result is ∇ Σ_r S_r / Σ_r n_r: the token (or sequence) mean over the
    whole global minibatch, whatever each rank's share of tokens.
    """
    count = torch.as_tensor(local_count, dtype=torch.float32).reshape(1)
    return (all_reduce(count)[0] / world_size).clamp(min=1e-8)


def rank_share(local_count: torch.Tensor | float, world_size: int, all_reduce: AllReduce = local_only) -> torch.Tensor:
    """n_r / (Σ_r n_r / world): the factor that turns rank r's local mean loss into its share of
    the global mean under DDP's gradient average (see `loss_denominator`); 1 in one process."""
    count = torch.as_tensor(local_count, dtype=torch.float32)
    return count / loss_denominator(count, world_size, all_reduce)


def weighted_means(stats: Mapping[str, float], weights: Mapping[str, float], all_reduce: AllReduce = local_only) -> dict[str, float]:
    """Global means of per-rank means: Σ_r w_r·v_r / Σ_r w_r for each key, one all-reduce.

    `weights[key]` is how many items the local mean `stats[key]` averages (sequences, tokens,
    groups); a rank with weight 0 (nothing to average) does not count. Keys missing from
    `weights` get weight 1 (a plain mean over ranks).
    """
    keys = sorted(stats)
    if not keys:
        return {}
    w = torch.tensor([float(weights.get(k, 1.0)) for k in keys], dtype=torch.float64)
    v = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    both = all_reduce(torch.cat([w * v, w]))
    sums, totals = both[: len(keys)], both[len(keys) :]
    return {k: float(s / t) if t > 0 else float(stats[k]) for k, s, t in zip(keys, sums, totals)}


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = local_only) -> torch.Tensor:
    """`rl.losses.explained_variance` over all ranks' valid tokens: 1 − Var[R − V] / Var[R]
    (unbiased variances from `global_masked_moments`). (B, T) x3 -> scalar."""
    _, residual_var, _ = global_masked_moments(returns - values, mask, all_reduce)
    _, returns_var, _ = global_masked_moments(returns, mask, all_reduce)
    return 1.0 - residual_var / returns_var
