"""A reward that fails in the second process only (NaN), for the 2-process reward-error test."""

import os


def reward(prompts, completions, **meta):
    value = float("nan") if os.environ.get("RANK") == "1" else 0.5
    return [value] * len(completions)
