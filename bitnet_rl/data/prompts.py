"""Prompts for rollouts and evaluation: encoded exactly as training encoded them."""

from __future__ import annotations

from typing import Any

from bitnet_rl.data.chat import as_messages, render_messages
from bitnet_rl.data.readers import read_records, where_of
from bitnet_rl.errors import UserError


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """A plain prompt gets the tokenizer's special tokens (BOS), as in SFT; messages go through the chat template."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = render_messages(tokenizer, as_messages(prompt, "user"), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(path: str, n: int = 256, seed: int = 0) -> list[Any]:
    """Prompts from a data file (field `prompt`, or `messages` without the last assistant turn), or `demo`."""
    if path == "demo":
        from bitnet_rl.data.demo import make_prompts

        return make_prompts(n, seed)
    prompts = []
    for index, record in enumerate(read_records(path)):
        if "prompt" in record:
            prompts.append(record["prompt"])
        elif isinstance(record.get("messages"), list):
            turns = record["messages"]
            prompts.append(turns[:-1] if turns and turns[-1].get("role") == "assistant" else turns)
        else:
            raise UserError(f"{where_of(record, index, path)}: missing field 'prompt'")
    return prompts
