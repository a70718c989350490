"""Chat templates: render conversations to text and split them into prompt and assistant parts.

Loss masks need to know which characters the assistant wrote. Instead of parsing template
output (every model family differs), we render growing prefixes of the conversation and take
the difference: the text added by an assistant message is its part, everything else is prompt.
This works for any template where rendering a prefix yields a prefix of the full text.
"""

from __future__ import annotations

import warnings
from typing import Any

from bitnet_rl.errors import UserError

Message = dict[str, Any]

# Used when a tokenizer has no chat template: `<s><|user|>\nHi\n<|assistant|>\nHello</s>`.
# An assistant turn ends with EOS and nothing after it, so a model trained on it learns to stop
# and no token after EOS is ever a target. The role markers are special tokens in
# `train_tiny_tokenizer`.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_messages(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render `messages` as text with the tokenizer's chat template, or ours if it has none."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _added_text(tokenizer: Any, before: str, after_messages: list[Message], where: str) -> str:
    """Text that rendering `after_messages` adds to `before`; the template must extend prefixes."""
    after = render_messages(tokenizer, after_messages)
    if not after.startswith(before):
        raise UserError(
            f"{where}: the chat template does not render a conversation prefix as a text prefix, "
            "so assistant tokens cannot be masked; use a template without history rewriting"
        )
    return after[len(before):]


def chat_segments(tokenizer: Any, messages: list[Message], where: str = "<messages>") -> list[tuple[str, bool]]:
    """Split a rendered conversation into `(text, is_assistant)` pieces that concatenate to it.

    Every assistant turn is its own piece (content plus the template's end-of-turn text); the
    role header before it (the generation prompt) belongs to the prompt piece, exactly as at
    inference time when the model continues after the generation prompt.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render_messages(tokenizer, messages[:index], add_generation_prompt=True)
        if not prompt_text.startswith(rendered):
            raise UserError(f"{where}: the chat template rewrites earlier turns; cannot mask assistant tokens")
        segments.append((prompt_text[len(rendered):], False))
        assistant_text = _added_text(tokenizer, prompt_text, messages[: index + 1], where)
        segments.append((assistant_text, True))
        rendered = prompt_text + assistant_text
    segments.append((_added_text(tokenizer, rendered, messages, where), False))  # turns after the last reply
    return [(text, is_assistant) for text, is_assistant in segments if text]


def as_messages(value: str | list[Message], role: str) -> list[Message]:
    """A plain string becomes one message with `role`; a message list is returned as is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def render_prompt_completion(
    tokenizer: Any, prompt: str | list[Message], completion: str | list[Message], where: str = "<record>"
) -> tuple[str, str]:
    """Render a conversational pair as (prompt text ending in the generation prompt, reply text).

    A string prompt is a user message and a string completion an assistant message, so
    preference data may mix both styles. The reply text is what the template adds after the
    generation prompt: the assistant content and its end-of-turn text.
    """
    prompt_messages = as_messages(prompt, "user")
    prompt_text = render_messages(tokenizer, prompt_messages, add_generation_prompt=True)
    full_messages = prompt_messages + as_messages(completion, "assistant")
    return prompt_text, _added_text(tokenizer, prompt_text, full_messages, where)


def resolve_chat(setting: str, has_messages: bool, recorded: str | None, source: str) -> bool:
    """Whether a run renders prompts with the chat template (`data.chat_template`).

    `always`: yes (a plain string is a user / assistant message); `never`: no (an error if the
    data holds message lists, which only exist through a template); `auto`: yes when the data
    holds message lists or the model was trained on chat prompts (`recorded`, from its
    checkpoint), so a chat-tuned model never silently gets raw prompts. A warning says when the
    result differs from the model's recorded training format.
    """
    if setting == "never" and has_messages:
        raise UserError(f"{source}: data.chat_template=never, but the records hold chat messages, which need the template")
    chat = setting == "always" or (setting == "auto" and (has_messages or recorded == "chat"))
    used = "chat" if chat else "plain"
    if recorded is not None and recorded != used:
        warnings.warn(
            f"{source}: the model was trained on {recorded} prompts but this run uses {used} ones (data.chat_template={setting})",
            stacklevel=2,
        )
    return chat


def uses_messages(records: list[Any], fields: tuple[str, ...] = ("messages", "prompt", "completion", "chosen", "rejected")) -> bool:
    """Whether any record (or any bare prompt) is a message list."""
    for record in records:
        values = [record.get(f) for f in fields] if isinstance(record, dict) else [record]
        if any(isinstance(v, list) for v in values):
            return True
    return False


def encode_prompt_completion(
    tokenizer: Any, prompt: str | list[Message], completion: str | list[Message], where: str = "<record>", chat: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its completion, tokenized separately so the boundary is exact.

    Plain (`chat=False`): the prompt gets the tokenizer's usual special tokens (BOS) and the
    completion gets EOS appended. Chat (`chat=True`): both go through the chat template
    (`render_prompt_completion`; a string is a user / assistant message) and the template's
    own end-of-turn text ends the reply. `chat=None` uses the template only when a side is a
    message list.
    """
    if chat is None:
        chat = not (isinstance(prompt, str) and isinstance(completion, str))
    if not chat:
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise UserError(f"{where}: chat messages need the chat template (data.chat_template=never)")
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        return prompt_ids, completion_ids
    prompt_text, completion_text = render_prompt_completion(tokenizer, prompt, completion, where)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids)
