"""Evaluation math as pure functions: reward summaries, win rate with a bootstrap interval,
KL estimates with standard errors, perplexity, pass@k, repetition.

Inputs are plain tensors or lists; nothing here touches a model. Each function states its
formula and source; the tests check them against hand calculations.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def summary_stats(values: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """n, mean, std (unbiased; 0 for one value), min, max and the 10/25/50/75/90 % quantiles
    (linear interpolation, as `numpy.quantile`). Empty input gives n = 0 only."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return {"n": 0}
    out = {"n": int(x.numel()), "mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0}
    out["min"], out["max"] = float(x.min()), float(x.max())
    for q, value in zip(QUANTILES, torch.quantile(x, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()):
        out[f"q{round(q * 100):02d}"] = value
    return out


def pairwise_outcomes(policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
    """1 where the policy's reward is higher, 0.5 on a tie, 0 where lower. (P, K), (P, K) -> (P, K)

    Row p holds the K samples for prompt p; sample k of the policy is compared with sample k
    of the reference (same prompt, same seed offset)."""
    if policy_rewards.shape != reference_rewards.shape:
        raise ValueError(f"reward shapes differ: {tuple(policy_rewards.shape)} vs {tuple(reference_rewards.shape)}")
    p, r = policy_rewards.double(), reference_rewards.double()
    return (p > r).double() + 0.5 * (p == r).double()


def bootstrap_mean_ci(per_prompt: torch.Tensor, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_prompt` (P,), resampling prompts.

    Draw `n_boot` resamples of P prompts with replacement, take each resample's mean, and return
    the (1-c)/2 and (1+c)/2 quantiles of those means (Efron & Tibshirani 1993, ch. 13)."""
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        return (math.nan, math.nan)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=gen)
    means = x[index].mean(1)
    alpha = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return low, high


def win_rate(policy_rewards: torch.Tensor, reference_rewards: torch.Tensor, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Win rate of the policy over the reference judged by a reward, ties counting half.

    Rewards are (P,) or (P, K) with K samples per prompt. win_rate = mean over all pairs of
    1[p > r] + 0.5·1[p = r]; the interval bootstraps the per-prompt means over prompts, since
    samples of one prompt are not independent. Also returns the counts of wins, ties, losses."""
    outcomes = pairwise_outcomes(policy_rewards.reshape(policy_rewards.shape[0], -1), reference_rewards.reshape(reference_rewards.shape[0], -1))
    low, high = bootstrap_mean_ci(outcomes.mean(1), n_boot, confidence, seed)
    return {
        "win_rate": float(outcomes.mean()),
        "ci_low": low,
        "ci_high": high,
        "wins": int((outcomes == 1).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0).sum()),
    }


def kl_summary(policy_logprobs: list[torch.Tensor], reference_logprobs: list[torch.Tensor], exact_kl: list[torch.Tensor] | None = None) -> dict[str, float]:
    """KL(policy ‖ reference) from the policy's own samples, per token and per sequence, k1 and k3.

    For sample tokens y_t ~ π with log-ratio d_t = log π(y_t) − log π_ref(y_t) (one 1-D tensor per
    sequence): k1_t = d_t, k3_t = exp(−d_t) + d_t − 1 (Schulman, "Approximating KL divergence").
    Per sequence: S_i = Σ_t k_t, reported as mean_i S_i with standard error std(S)/√n.
    Per token: Σ_i S_i / Σ_i n_i (a ratio estimator) with the delta-method standard error
    sqrt(Σ_i (S_i − R·n_i)² / (n(n−1))) / mean(n_i), which treats sequences, not tokens, as the
    independent units (tokens of one sequence are correlated).
    `exact_kl` (optional, same layout) holds the full-vocabulary KL at each sampled position,
    Σ_v π(v) log π(v)/π_ref(v): the lower-variance "exact" estimate, summarized the same way."""
    out: dict[str, float] = {"sequences": len(policy_logprobs)}
    lengths = torch.tensor([float(p.numel()) for p in policy_logprobs], dtype=torch.float64)
    deltas = [(p.double() - r.double()) for p, r in zip(policy_logprobs, reference_logprobs)]
    per_token = {"k1": deltas, "k3": [torch.expm1(-d) + d for d in deltas]}
    if exact_kl is not None:
        per_token["exact"] = [e.double() for e in exact_kl]
    for name, values in per_token.items():
        sums = torch.tensor([float(v.sum()) for v in values], dtype=torch.float64)
        out.update(_sequence_and_token(name, sums, lengths))
    return out


def _sequence_and_token(name: str, sums: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    n = sums.numel()
    if n == 0:
        return {}
    seq_mean = float(sums.mean())
    seq_se = float(sums.std() / math.sqrt(n)) if n > 1 else math.nan
    total = float(lengths.sum())
    ratio = float(sums.sum()) / total if total else math.nan
    token_se = math.nan
    if n > 1 and total:
        residual = sums - ratio * lengths
        token_se = math.sqrt(float(residual.square().sum()) / (n * (n - 1))) / float(lengths.mean())
    return {f"{name}_seq": seq_mean, f"{name}_seq_se": seq_se, f"{name}_token": ratio, f"{name}_token_se": token_se}


def perplexity(token_nll: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """exp(mean negative log-likelihood) over the scored tokens: ppl = exp(Σ nll / N).

    `token_nll` is every scored token's −log p (nats), flattened over documents."""
    x = torch.as_tensor(token_nll, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return {"tokens": 0, "nll": math.nan, "perplexity": math.nan}
    nll = float(x.mean())
    return {"tokens": int(x.numel()), "nll": nll, "perplexity": math.exp(min(nll, 700.0))}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (Chen et al. 2021, Codex):

        pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

    (the product form avoids huge binomials). Requires 1 ≤ k ≤ n."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_metrics(correct: Sequence[Sequence[bool]], k: int) -> dict[str, float]:
    """pass@1, pass@k and mean@k averaged over prompts, from per-prompt lists of n ≥ k checks.

    pass@1 = mean_p c_p/n_p (the unbiased estimator at k = 1); pass@k as in `pass_at_k`;
    mean@k = the mean correctness of the k samples, i.e. average accuracy (equal to pass@1 in
    expectation; reported as DeepSeek-R1 and verl do)."""
    if not correct:
        return {}
    counts = [(len(row), sum(bool(x) for x in row)) for row in correct]
    out = {"pass@1": sum(pass_at_k(n, c, 1) for n, c in counts) / len(counts)}
    if k > 1:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        out[f"mean@{k}"] = sum(sum(bool(x) for x in row[:k]) / k for row in correct) / len(correct)
    return out


def repetition_rate(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Share of repeated n-grams within sequences (rep-n of Welleck et al. 2019, pooled):

        1 − Σ_s |unique n-grams of s| / Σ_s |n-grams of s|

    0 when no n-gram repeats inside any sequence; sequences shorter than n contribute nothing."""
    total = unique = 0
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        total += len(grams)
        unique += len(set(grams))
    return 1.0 - unique / total if total else 0.0


def histogram(values: Sequence[float], bins: int = 10) -> dict[str, list[float]]:
    """Counts of `values` in `bins` equal-width bins between their min and max (edges has bins+1)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return {"edges": [], "counts": []}
    low, high = float(x.min()), float(x.max())
    if high == low:
        high = low + 1.0
    counts = torch.histc(x, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}
