"""PPO's sampling step: generate, decode, score and shape rewards; DAPO's dynamic sampling.

One round generates `samples_per_prompt` completions for each picked prompt with the rollout
generator, scores the decoded text with the reward sources and adds the penalties (missing EOS,
overlong). With `ppo.dynamic_sampling`, groups whose scores all tie carry no GRPO/RLOO signal
(and, with `ppo.dynamic_sampling_max_mean`, groups the policy mostly solves carry little):
they are dropped and new prompts are drawn, for at most `dynamic_sampling_rounds` extra rounds;
the batch is then cut back to `prompts_per_iteration` groups (filled up with tied groups if the
rounds ran out), so every iteration has the same size and optimizer-step count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from bitnet_rl.recipe import PPOConfig, RolloutConfig
from bitnet_rl.rewards.base import RewardError
from bitnet_rl.rl.shaping import filtered_groups, overlong_penalty
from bitnet_rl.rollout.output import RolloutOutput
from bitnet_rl.rollout.output import concat_rollouts
from bitnet_rl.train.experience import select_rollout

T = TypeVar("T")


@dataclass
class Sampled:
    out: RolloutOutput  # (B rows) prompt and completion tensors, generator log-probs
    prompts: list[Any]  # B prompts (text or messages), each repeated samples_per_prompt times
    completions: list[str]  # B decoded completions
    raw: torch.Tensor  # (B,) reward sources' sum
    scores: torch.Tensor  # (B,) raw + penalties
    stopped: torch.Tensor  # (B,) bool, ended with a stop token
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    rounds: int = 1  # generation rounds used
    dropped_groups: int = 0  # tied groups seen and dropped


def shaped_scores(raw: torch.Tensor, stopped: torch.Tensor, lengths: torch.Tensor, cfg: PPOConfig, max_new_tokens: int) -> torch.Tensor:
    """raw + missing-EOS penalty (rows that did not stop) + DAPO overlong penalty. (B,) -> (B,)"""
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(stopped, scores, scores + cfg.missing_eos_penalty)
    if cfg.overlong_buffer:
        scores = scores + overlong_penalty(lengths.to(scores.device), max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return scores


def sample_round(generator, tokenizer, reward, prompts: list[Any], prompt_ids: list[list[int]], cfg: PPOConfig, rcfg: RolloutConfig, seed: int, device) -> Sampled:
    """Generate once for `prompts` (already repeated per sample), decode, score, shape."""
    t0 = time.perf_counter()
    out = generator.generate(
        prompt_ids,
        max_new_tokens=rcfg.max_new_tokens,
        temperature=rcfg.temperature,
        top_k=rcfg.top_k,
        top_p=rcfg.top_p,
        stop_token_ids=[tokenizer.eos_token_id],
        seed=seed,
    )
    t1 = time.perf_counter()
    completions = tokenizer.batch_decode(out.completions(), skip_special_tokens=True)
    raw = reward.score(prompts, completions).to(device)
    stopped = torch.tensor([r == "stop" for r in out.finish_reasons], device=device)
    scores = shaped_scores(raw, stopped, out.lengths, cfg, rcfg.max_new_tokens)
    return Sampled(out, list(prompts), completions, raw, scores, stopped, t1 - t0, time.perf_counter() - t1)


def _rows(sampled: Sampled, rows: torch.Tensor) -> Sampled:
    keep = rows.tolist()
    return Sampled(
        select_rollout(sampled.out, rows.to(sampled.out.lengths.device)),
        [sampled.prompts[i] for i in keep],
        [sampled.completions[i] for i in keep],
        sampled.raw[rows.to(sampled.raw.device)],
        sampled.scores[rows.to(sampled.scores.device)],
        sampled.stopped[rows.to(sampled.stopped.device)],
    )


def _concat(parts: list[Sampled]) -> Sampled:
    return Sampled(
        concat_rollouts([p.out for p in parts]),
        [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.completions],
        torch.cat([p.raw for p in parts]),
        torch.cat([p.scores for p in parts]),
        torch.cat([p.stopped for p in parts]),
    )


def _agreed_round(round_fn: Callable[[int], Sampled], index: int, everyone: Callable[[bool], bool]) -> Sampled:
    """`round_fn(index)`, raising on every process when a reward source failed on any of them."""
    return agreed(lambda: round_fn(index), everyone)


def agreed(fn: Callable[[], T], everyone: Callable[[bool], bool]) -> T:
    """`fn()` on every process, raising on all of them when a reward source failed on any one: a
    process that raised alone would leave the others waiting in their next collective."""
    error: RewardError | None = None
    try:
        result = fn()
    except RewardError as err:
        error = err
    if not everyone(error is None):
        raise error or RewardError("a reward source failed in another process (its error is above); stopping")
    return result


def sample_groups(round_fn: Callable[[int], Sampled], cfg: PPOConfig, everyone: Callable[[bool], bool] = bool) -> Sampled:
    """Round 0, then (dynamic sampling) more rounds until `prompts_per_iteration` groups have untied scores.

    `round_fn(r)` samples round r with fresh prompts. Without dynamic sampling this is round 0 as is.
    `everyone(done)` is True when every process is done (several processes: an all-reduce), so all
    ranks sample the same number of rounds and their prompt samplers stay in step. A reward error in
    any round stops every process at that round (each raises), so no rank waits in a collective.
    """
    if not cfg.dynamic_sampling:
        return _agreed_round(round_fn, 0, everyone)
    group, target = cfg.samples_per_prompt, cfg.prompts_per_iteration
    informative: list[Sampled] = []
    tied: list[Sampled] = []
    kept = dropped = 0
    rounds = 0
    generate_seconds = score_seconds = 0.0
    current = _agreed_round(round_fn, 0, everyone)
    while True:
        rounds += 1
        generate_seconds += current.generate_seconds
        score_seconds += current.score_seconds
        is_tied = filtered_groups(current.scores, current.raw, group, cfg.dynamic_sampling_max_mean).cpu()
        rows = lambda groups: (groups.nonzero().flatten()[:, None] * group + torch.arange(group)).flatten()  # noqa: E731
        if (~is_tied).any():
            informative.append(_rows(current, rows(~is_tied)))
            kept += int((~is_tied).sum())
        if is_tied.any():
            tied.append(_rows(current, rows(is_tied)))
            dropped += int(is_tied.sum())
        if everyone(kept >= target or rounds > cfg.dynamic_sampling_rounds):
            break
        current = _agreed_round(round_fn, rounds, everyone)
    parts = informative + tied
    batch = _concat(parts)  # informative groups first, tied ones only to fill up
    result = _rows(batch, torch.arange(target * group))
    result.rounds, result.dropped_groups = rounds, dropped
    result.generate_seconds, result.score_seconds = generate_seconds, score_seconds
    return result
