"""Token sampling from logits: temperature, top-k, top-p (pure functions)."""

from __future__ import annotations

import torch

from bitnet_rl.errors import UserError


def prompt_lists(input_ids) -> list[list[int]]:
    """Prompts as lists of ids, from a (B, P) / (P,) tensor or a ragged list of lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return input_ids.tolist()
    return [list(map(int, row)) for row in input_ids]


def checked_request(input_ids, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> list[list[int]]:
    """The prompts of a `generate` call, after checking the call's settings (a `UserError` if off)."""
    prompts = prompt_lists(input_ids)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError(f"generate: invalid sampling settings temperature={temperature}, top_k={top_k}, top_p={top_p}")
    return prompts


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits / temperature` with everything outside the top-k and the top-p nucleus set to -inf.

    Order as in transformers: temperature, then top-k, then top-p. top-p keeps the smallest set
    of highest-probability tokens whose mass reaches `top_p` (always at least one token).
    """
    scaled = logits / temperature
    if top_k and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    with_logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Draw one token per row of `logits (B, V)` (float32, or bf16 upcast exactly to float32 first).

    Returns `(tokens (B,), logprobs (B,), logprobs_t1 (B,))`: log-probabilities of the drawn
    tokens under the sampling distribution and under the plain softmax of `logits`
    (None when `with_logprobs` is False). Greedy (`temperature == 0`) takes the argmax and
    reports logprob 0. Sampling uses the Gumbel-max trick `argmax(log p + G)`, G = −log(−log U),
    U ~ Uniform(0, 1), which draws from `p` exactly; with a seeded `generator` it is reproducible.
    """
    if temperature == 0:
        tokens = logits.argmax(-1)  # the same index on bf16 logits as on their exact float32 copy
        if not with_logprobs:
            return tokens, None, None
        logprobs_t1 = logits.log_softmax(-1, dtype=torch.float32).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, torch.zeros_like(logprobs_t1), logprobs_t1
    logits = logits.float()
    filtered = filter_logits(logits, temperature, top_k, top_p)
    logp = filtered.log_softmax(-1)
    uniform = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_(min=torch.finfo(torch.float32).tiny)
    tokens = (logp - (-uniform.log()).log()).argmax(-1)
    if not with_logprobs:
        return tokens, None, None
    logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs_t1 = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs, logprobs_t1
