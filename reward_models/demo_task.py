"""Reward for the bundled demo task: sort a short list of digits.

Prompt `sort: 3 1 2 =`, ideal completion ` 1 2 3`. The reward parses the digits out of the
prompt itself, so it needs nothing but the text; copy this file to start your own reward.

    reward = 1.0                                                    if exactly sorted
           = overlap * (0.5 + 0.3 * in_order + 0.2 * same_length)  otherwise
           = 0.0                                                    if not all single digits

overlap = |multiset(out) ∩ multiset(sorted)| / max(len(out), len(sorted)) rewards the right
digits; in_order is the fraction of adjacent output pairs with a <= b; same_length is 1 or 0.
Order and length credit scale with overlap, so sorted digits unrelated to the prompt earn 0,
and every wrong answer earns less than 1 (overlap = in_order = 1 means exactly sorted).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

PROMPT_PATTERN = re.compile(r"sort:((?:\s*\d)+)\s*=")


def parse_prompt(prompt: str) -> list[int]:
    """The digits to sort, from the last `sort: ... =` in the prompt (chat text may surround it)."""
    matches = PROMPT_PATTERN.findall(prompt)
    if not matches:
        raise ValueError(f"not a demo-task prompt (expected 'sort: 3 1 2 ='): {prompt!r}")
    return [int(digit) for digit in matches[-1].split()]


def parse_completion(completion: str) -> list[int] | None:
    """The digits of a completion, or None when it is empty or has anything but single digits."""
    tokens = completion.split()
    if not tokens or any(len(token) != 1 or not token.isdigit() for token in tokens):
        return None
    return [int(token) for token in tokens]


def score(digits: list[int], completion: str) -> float:
    """Reward in [0, 1] for one completion answering `digits` (formula in the module docstring)."""
    target = sorted(digits)
    output = parse_completion(completion)
    if output is None:
        return 0.0
    if output == target:
        return 1.0
    overlap = sum((Counter(output) & Counter(target)).values()) / max(len(output), len(target))
    pairs = list(zip(output, output[1:]))
    in_order = sum(a <= b for a, b in pairs) / len(pairs) if pairs else 0.0
    same_length = float(len(output) == len(target))
    return overlap * (0.5 + 0.3 * in_order + 0.2 * same_length)


def reward(prompts: list[str], completions: list[str], **meta: Any) -> list[float]:
    """One reward in [0, 1] per (prompt, completion); extra metadata is accepted and ignored."""
    return [score(parse_prompt(prompt), completion) for prompt, completion in zip(prompts, completions, strict=True)]


def exact_match(prompts: list[str], completions: list[str], **meta: Any) -> list[float]:
    """1.0 when the completion is exactly sorted, else 0.0: the quickstart's GRPO reward.

    With group-normalized advantages, partial credit ranks wrong answers against each other (a
    dropped repeated digit vs a wrong digit), and groups whose answers are all wrong are never
    tied, so dynamic sampling keeps spending updates on them. Exact match ties those groups and
    spends the updates on groups with a right answer (measured in the README's "RL" section)."""
    return [float(is_correct(prompt, completion)) for prompt, completion in zip(prompts, completions, strict=True)]


def is_correct(prompt: str, completion: str) -> bool:
    """True when the completion is exactly the prompt's digits in ascending order."""
    return parse_completion(completion) == sorted(parse_prompt(prompt))
