"""Prompts for rollouts, evaluation and `generate`: encoded exactly as training encoded them.

A prompt is refused when it is empty or when it and the tokens to generate do not fit the
model's context (`max_position_embeddings`): a model run past its context produces garbage
after a long wait instead of an error.
"""

from __future__ import annotations

from typing import Any

from bitnet_rl.data.chat import as_messages, render_messages, resolve_chat, uses_messages
from bitnet_rl.data.readers import read_records, where_of
from bitnet_rl.errors import UserError


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool | None = None) -> list[int]:
    """Plain: the tokenizer's special tokens (BOS) and the text, as in SFT. Chat: the chat template with
    the generation prompt (a string is one user message). `chat=None`: chat only for message lists."""
    if chat is None:
        chat = not isinstance(prompt, str)
    if not chat:
        if not isinstance(prompt, str):
            raise UserError("chat messages need the chat template (data.chat_template=never / --no-chat)")
        return list(tokenizer(prompt)["input_ids"])
    text = render_messages(tokenizer, as_messages(prompt, "user"), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_length(model: Any) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings`), None if it records none."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def encode_prompts(
    tokenizer: Any,
    prompts: list[Any],
    *,
    chat: bool | None,
    context: int | None,
    new_tokens: int,
    where: list[str] | None = None,
    new_tokens_key: str = "rollout.max_new_tokens",
) -> list[list[int]]:
    """Encode every prompt; refuse one that leaves no room for `new_tokens` in `context`, naming it."""
    if context is not None and new_tokens >= context:
        raise UserError(f"{new_tokens_key}={new_tokens} does not fit the model's context of {context} tokens")
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat)
        if context is not None and len(ids) + new_tokens > context:
            name = where[index] if where else f"prompt {index + 1}"
            raise UserError(
                f"{name}: prompt is {len(ids)} tokens; with {new_tokens_key}={new_tokens} it exceeds the model's "
                f"context of {context} tokens (max_position_embeddings); shorten it"
            )
        encoded.append(ids)
    return encoded


def check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: prompt is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise UserError(f"{where}: prompt must be a non-empty string or a list of {{role, content}} messages")
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not isinstance(message.get("role"), str):
            raise UserError(f"{where}: prompt messages must be {{role, content}} objects with string values")
    if not any(m["content"].strip() for m in prompt):
        raise UserError(f"{where}: prompt is empty (every message has empty content)")


def load_prompts_with_where(path: str, n: int = 256, seed: int = 0) -> tuple[list[Any], list[str]]:
    """(prompts, where each came from) from a data file (field `prompt`, or `messages` without the last
    assistant turn), or `demo`. Empty prompts are errors naming `file:line`."""
    if path == "demo":
        from bitnet_rl.data.demo import make_prompts

        prompts = make_prompts(n, seed)
        return prompts, [f"demo prompt {i + 1}" for i in range(len(prompts))]
    prompts, wheres = [], []
    for index, record in enumerate(read_records(path)):
        where = where_of(record, index, path)
        if "prompt" in record:
            prompt = record["prompt"]
        elif isinstance(record.get("messages"), list):
            turns = record["messages"]
            prompt = turns[:-1] if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant" else turns
        else:
            raise UserError(f"{where}: missing field 'prompt'")
        check_prompt(prompt, where)
        prompts.append(prompt)
        wheres.append(where)
    return prompts, wheres


def load_prompts(path: str, n: int = 256, seed: int = 0) -> list[Any]:
    """Prompts from a data file (field `prompt`, or `messages` without the last assistant turn), or `demo`."""
    return load_prompts_with_where(path, n, seed)[0]


def rollout_prompt_ids(tokenizer: Any, policy: Any, prompts: list[Any], setting: str, new_tokens: int, source: str) -> list[list[int]]:
    """Prompt ids for RL rollouts: the chat setting resolved against the policy's recorded training format
    (and recorded on the policy, so its checkpoints say what it was trained on), every prompt fitting the context."""
    from bitnet_rl.models.io import prompt_format_of, set_prompt_format

    for index, prompt in enumerate(prompts):
        check_prompt(prompt, f"{source}: prompt {index + 1}")
    chat = resolve_chat(setting, uses_messages(prompts), prompt_format_of(policy), source)
    set_prompt_format(policy, "chat" if chat else "plain")
    where = [f"{source}: prompt {index + 1}" for index in range(len(prompts))]
    return encode_prompts(tokenizer, prompts, chat=chat, context=context_length(policy), new_tokens=new_tokens, where=where)
