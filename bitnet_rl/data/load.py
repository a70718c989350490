"""From a recipe's `data` section to tokenized examples: the bundled demo task or a local file."""

from __future__ import annotations

from typing import Any

from bitnet_rl.data.chat import resolve_chat, uses_messages
from bitnet_rl.data.formats import detect_format, validate
from bitnet_rl.data.readers import read_records, where_of
from bitnet_rl.errors import UserError
from bitnet_rl.recipe import DataConfig

DEMO = "demo"


def load_records(data: DataConfig, path: str | None, demo_kind: str, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """(validated records, format). `path == "demo"` generates the demo task's `demo_kind` records."""
    if not path:
        raise UserError("data.path is not set (give a file, a datasets directory, or `demo`)")
    if path == DEMO:
        from bitnet_rl.data import demo

        makers = {"sft": demo.make_sft_records, "prefs": demo.make_pref_records}
        records, source = makers[demo_kind](data.demo_size, seed), "demo"
    else:
        records, source = read_records(path), path
    fmt = data.format if data.format != "auto" else detect_format(records[0], where_of(records[0], 0, source))
    return validate(records, fmt, source), fmt


TEXT_FIELDS = ("text", "prompt", "completion", "response", "chosen", "rejected", "messages")


def record_texts(records: list[dict[str, Any]]) -> list[str]:
    """Every string a record holds in a data field (message contents included): a tokenizer's training text."""
    texts: list[str] = []
    for record in records:
        for field in TEXT_FIELDS:
            value = record.get(field)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


def corpus_texts(path: str, key: str) -> list[str]:
    """The text of a data file named by recipe key `key` (any supported format, any record format)."""
    if path == DEMO:
        from bitnet_rl.data.demo import demo_corpus

        return demo_corpus()
    from pathlib import Path

    if not Path(path).exists():
        raise UserError(f"{key}={path}: no such file or directory")
    texts = record_texts(read_records(path))
    if not texts:
        raise UserError(f"{key}={path}: no text fields ({', '.join(TEXT_FIELDS)}) to train a tokenizer on")
    return texts


def tokenizer_texts(path: str, records: list[dict[str, Any]]) -> list[str] | None:
    """What a tiny model's tokenizer trains on by default: the run's own records (None for the demo task)."""
    return None if path == DEMO else record_texts(records)


def choose_chat(data: DataConfig, records: list[dict[str, Any]], fmt: str, recorded: str | None) -> bool | None:
    """Whether this run's prompts go through the chat template (see `resolve_chat`); None for plain text data."""
    source = data.path or "data"
    if fmt == "text":
        if data.chat_template == "always":
            raise UserError(f"{source}: data.chat_template=always, but the records are plain text (format text) with no prompt to render")
        return None
    return resolve_chat(data.chat_template, uses_messages(records), recorded, source)


def check_fits_context(longest: int, context: int | None, source: str) -> None:
    """Refuse examples longer than the model's context (positions past it were never trained)."""
    if context is not None and longest > context:
        raise UserError(
            f"{source}: examples reach {longest} tokens, over the model's context of {context} (max_position_embeddings); "
            f"lower data.max_length to {context} or less"
        )
