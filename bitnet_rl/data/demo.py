"""The bundled demo task: sort 3-5 digits. Prompt `sort: 3 1 2 =`, completion ` 1 2 3`.

Small enough for a ~1M-parameter model to learn on CPU in minutes, and verifiable, so
SFT, DPO and PPO can all be checked end to end with `reward_models/demo_task.py`.
Everything is deterministic from a seed. Problems are split once by a hash of their digits:
about 1 in 10 are held out, and only those are ever used by `make_prompts`, so evaluation
prompts can never appear in training data, whatever `n` and seeds are used.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

MIN_DIGITS, MAX_DIGITS = 3, 5
HELD_OUT_BUCKETS = 10  # one bucket in ten is held out


def format_prompt(digits: list[int]) -> str:
    """`sort: 3 1 2 =`; ends with ' =' so every digit token keeps its leading space."""
    return "sort: " + " ".join(map(str, digits)) + " ="


def format_completion(digits: list[int]) -> str:
    """` 1 2 3`; the leading space makes each digit the same token as in the prompt."""
    return " " + " ".join(map(str, digits))


def is_held_out(digits: list[int]) -> bool:
    """Whether a problem belongs to the held-out split (stable across runs and machines)."""
    return zlib.crc32(format_prompt(digits).encode()) % HELD_OUT_BUCKETS == 0


def _problems(n: int, seed: int, stream: str, held_out: bool) -> list[list[int]]:
    """`n` digit lists from their own random stream, all from the requested split."""
    rng = random.Random(f"bitnet-rl-demo/{stream}/{seed}")
    problems = []
    while len(problems) < n:
        digits = [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        if is_held_out(digits) == held_out:
            problems.append(digits)
    return problems


def make_sft_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` prompt/completion records with the correct answer."""
    return [
        {"prompt": format_prompt(digits), "completion": format_completion(sorted(digits))}
        for digits in _problems(n, seed, "sft", held_out=False)
    ]


def _wrong_answer(digits: list[int], rng: random.Random) -> list[int]:
    """A plausible mistake: a swapped adjacent pair, a dropped or duplicated digit, or no sorting."""
    answer = sorted(digits)
    mistakes = ["drop", "duplicate"]
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swappable:
        mistakes.append("swap")
    if digits != answer:
        mistakes.append("unsorted")
    mistake = rng.choice(mistakes)
    if mistake == "swap":
        i = rng.choice(swappable)
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    elif mistake == "drop":
        del answer[rng.randrange(len(answer))]
    elif mistake == "duplicate":
        i = rng.randrange(len(answer))
        answer.insert(i, answer[i])
    else:
        answer = list(digits)
    return answer


def make_pref_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` preference records: chosen is the sorted list, rejected a plausible wrong answer."""
    rng = random.Random(f"bitnet-rl-demo/mistakes/{seed}")
    return [
        {
            "prompt": format_prompt(digits),
            "chosen": format_completion(sorted(digits)),
            "rejected": format_completion(_wrong_answer(digits, rng)),
        }
        for digits in _problems(n, seed, "prefs", held_out=False)
    ]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` held-out prompts for PPO rollouts and evaluation, never seen in SFT or prefs data."""
    return [format_prompt(digits) for digits in _problems(n, seed, "prompts", held_out=True)]


def demo_corpus() -> list[str]:
    """Text to train the demo tokenizer on: the task's strings, with every digit after a space."""
    samples = make_sft_records(500, seed=0)
    texts = [record["prompt"] + record["completion"] for record in samples]
    return texts + ["sort: 0 1 2 3 4 5 6 7 8 9 = 0 1 2 3 4 5 6 7 8 9"]


def demo_tokenizer() -> Any:
    """The tiny tokenizer used by the demo recipes and tests, trained on `demo_corpus()`."""
    from bitnet_rl.data.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(demo_corpus())
