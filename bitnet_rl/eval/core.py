"""The evaluation steps on loaded models, shared by `bitnet-rl eval` and the quickstart table.

Each function takes models/samples and returns plain dicts of numbers (math in `metrics.py`):
rewards per source and summed, sample statistics (length, stop rate, repetition, pass@k),
KL to a reference on the policy's samples, perplexity on data, ternary health.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from bitnet_rl.eval.metrics import histogram, kl_summary, pass_metrics, perplexity, repetition_rate, summary_stats
from bitnet_rl.eval.scoring import paired_logprobs, token_nll
from bitnet_rl.eval.task import Samples, sample

TOTAL = "total"  # the key of the weighted sum of all reward sources
# The reference samples with other seeds than the policy: independent draws, so the win rate
# estimates the usual P(policy sample beats reference sample). With shared seeds two similar
# models produce identical samples (ties) far more often than independent draws would.
REFERENCE_SEED_OFFSET = 1_000_003
REPETITION_N = 4


@dataclass
class Model:
    """One model under evaluation, with its tokenizer and rollout generator."""

    label: str  # "policy" | "reference"
    path: str
    module: nn.Module
    tokenizer: Any
    generator: Any


def load_model(label: str, path, backend: str, device: str, max_batch_size: int, max_seq_len: int, lam: float = 1.0) -> Model:
    """The policy at λ `lam` (bf16 on CUDA, float32 on CPU) with its tokenizer and a generator."""
    from bitnet_rl.models.io import load_policy, load_tokenizer
    from bitnet_rl.rollout import make_generator

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    module = load_policy(path, lam=lam, dtype=dtype, device=device).eval()
    generator = make_generator(module, backend, max_batch_size=max_batch_size, max_seq_len=max_seq_len, device=device)
    return Model(label, str(path), module, load_tokenizer(path), generator)


def model_lambda(module: nn.Module) -> float:
    """The λ the model's BitLinear layers compute with (1: fully ternary)."""
    from bitnet_rl.quant.bitlinear import bitlinear_modules

    layers = bitlinear_modules(module)
    return float(layers[0][1].lam) if layers else 1.0


def draw(model: Model, prompts: list[Any], n_samples: int, temperature: float, max_new_tokens: int, seed: int, batch_size: int, progress: Callable[[int], None] | None = None) -> Samples:
    """`n_samples` completions per prompt from `model`, batch b seeded `seed + b·batch_size`.

    A model trained on chat prompts (recorded in its checkpoint) gets plain-string prompts through
    its chat template too, as training rendered them."""
    from bitnet_rl.models.io import prompt_format_of

    chat = True if prompt_format_of(model.module) == "chat" else None
    return sample(model.generator, model.tokenizer, prompts, max_new_tokens, temperature, seed, batch_size, n_samples, progress, chat)


def score_rewards(sources: list[tuple[float, Any]], samples: Samples) -> dict[str, torch.Tensor]:
    """Each source's rewards (N,) under its name, and their weighted sum under `TOTAL`."""
    scores: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(samples.completions), dtype=torch.float64)
    for weight, source in sources:
        values = source.score(samples.prompts, samples.completions).double().cpu()
        scores[source.name] = values
        total = total + weight * values
    if sources:
        scores[TOTAL] = total
    return scores


def sample_metrics(samples: Samples, rewards: dict[str, torch.Tensor], n_samples: int, correct_fn: Callable[[Any, str], bool] | None = None) -> dict[str, Any]:
    """Reward statistics per source, length (stats and histogram), stop rate, repetition rate,
    and pass@1 / pass@K / mean@K when an exactness checker is given."""
    lengths = [len(c) for c in samples.completion_ids]
    out: dict[str, Any] = {
        "reward": {name: summary_stats(values) for name, values in rewards.items()},
        "length": summary_stats(lengths),
        "length_histogram": histogram(lengths, bins=min(20, max(lengths, default=1))),
        "stop_rate": sum(r == "stop" for r in samples.finish_reasons) / max(len(samples.finish_reasons), 1),
        f"repetition_rate_{REPETITION_N}gram": repetition_rate(samples.completion_ids, REPETITION_N),
    }
    if correct_fn is not None:
        checks = [bool(correct_fn(p, c)) for p, c in zip(samples.prompts, samples.completions)]
        per_prompt = [checks[i : i + n_samples] for i in range(0, len(checks), n_samples)]
        out["pass"] = pass_metrics(per_prompt, n_samples)
    return out


LOGIT_BUDGET = 2**24  # float32 logits held per model per batch of the KL pass (64 MiB)


def kl_metrics(policy: nn.Module, reference: nn.Module, samples: Samples, pad_id: int, batch_size: int | None = None) -> dict[str, float]:
    """KL(policy ‖ reference) on `samples` (drawn from the policy at temperature 1): k1, k3 and the
    full-vocabulary value, per token and per sequence, with standard errors. The default batch
    holds about `LOGIT_BUDGET` logits (batch × length × vocabulary)."""
    if batch_size is None:
        longest = max((len(p) + len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids)), default=1)
        batch_size = min(64, max(1, LOGIT_BUDGET // (longest * policy.config.vocab_size)))
    scored = paired_logprobs(policy, reference, samples.prompt_ids, samples.completion_ids, pad_id, batch_size)
    return kl_summary(scored.policy, scored.reference, scored.exact_kl)


def perplexity_metrics(model: nn.Module, examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, float]:
    """Perplexity over the trainable tokens of tokenized examples (completions only for pairs/chat)."""
    return perplexity(token_nll(model, examples, pad_id))


def health_metrics(model: nn.Module) -> dict[str, Any]:
    """Code fractions, mean scale, master-weight std and collapsed layers of every BitLinear."""
    from bitnet_rl.quant.health import ternary_health

    report = ternary_health(model)
    return {**report.overall(), "layers": len(report.layers), "collapsed_layers": report.collapsed}


def data_examples(path: str, tokenizer: Any, max_length: int = 4096) -> list[dict[str, list[int]]]:
    """`--data` tokenized as SFT examples: text (all tokens), prompt/completion or messages (completion tokens)."""
    from bitnet_rl.data.formats import detect_format, validate
    from bitnet_rl.data.readers import read_records, where_of
    from bitnet_rl.data.sft import tokenize_sft
    from bitnet_rl.errors import UserError

    records = read_records(path)
    if not records:
        raise UserError(f"--data {path}: no records")
    fmt = detect_format(records[0], where_of(records[0], 0, path))
    if fmt not in ("text", "prompt_completion", "messages"):
        raise UserError(f"--data {path}: format {fmt!r} has no completion to score (need text, prompt/completion or messages)")
    return tokenize_sft(validate(records, fmt, path), tokenizer, fmt, max_length)
