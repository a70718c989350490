"""The four record formats, how to tell them apart, and one pass that checks every record.

Checking everything up front turns a crash deep inside tokenization or training into one
line that names the file, the line and the field.

    text               {"text": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}   ("response" is an alias)
    messages           {"messages": [{"role": "user", "content": "..."}, ...]}
    prefs              {"prompt": ..., "chosen": ..., "rejected": ...}  (strings or message lists)
"""

from __future__ import annotations

import warnings
from typing import Any

from bitnet_rl.data.readers import WHERE, where_of
from bitnet_rl.errors import UserError

FORMATS = ("text", "prompt_completion", "messages", "prefs")


def detect_format(record: dict[str, Any], where: str = "<record>") -> str:
    """Name the format of one record from its keys; preference keys win over the others."""
    keys = set(record) - {WHERE}
    if keys & {"chosen", "rejected"}:
        return "prefs"
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and keys & {"completion", "response"}:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    found = ", ".join(sorted(keys)) or "none"
    raise UserError(
        f"{where_of(record, source=where)}: cannot tell the data format from the fields ({found}); expected 'text', "
        "'prompt'+'completion', 'messages', or 'prompt'+'chosen'+'rejected'"
    )


def _check_string(value: Any, field: str, where: str) -> None:
    if value is None:
        raise UserError(f"{where}: missing field '{field}'")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: field '{field}' is empty")


def _check_messages(value: Any, field: str, where: str) -> None:
    if value is None:
        raise UserError(f"{where}: missing field '{field}'")
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise UserError(f"{where}: field '{field}[{index}]' must be a {{role, content}} object")
        _check_string(message.get("role"), f"{field}[{index}].role", where)
        content = message.get("content")
        if not isinstance(content, str):
            _check_string(content, f"{field}[{index}].content", where)


def _check_text_or_messages(value: Any, field: str, where: str) -> None:
    if isinstance(value, list):
        _check_messages(value, field, where)
    else:
        _check_string(value, field, where)


def _check(record: dict[str, Any], fmt: str, where: str) -> None:
    if fmt == "text":
        _check_string(record.get("text"), "text", where)
    elif fmt == "prompt_completion":
        _check_text_or_messages(record.get("prompt"), "prompt", where)
        _check_text_or_messages(record.get("completion"), "completion", where)
    elif fmt == "messages":
        _check_messages(record.get("messages"), "messages", where)
        replies = [m for m in record["messages"] if m["role"] == "assistant" and m["content"].strip()]
        if not replies:
            raise UserError(f"{where}: field 'messages' has no non-empty assistant message to train on")
    else:
        for field in ("prompt", "chosen", "rejected"):
            _check_text_or_messages(record.get(field), field, where)


def validate(records: list[dict[str, Any]], fmt: str, where: str = "<records>") -> list[dict[str, Any]]:
    """Check every record against `fmt`; return the records to use.

    `where` names the source of records without a `_where` key (e.g. generated ones). The
    `response` alias is renamed to `completion`. Preference pairs whose chosen equals rejected
    carry no signal and are dropped with one warning giving their count.
    """
    if fmt not in FORMATS:
        raise UserError(f"{where}: unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
    kept, identical = [], []
    for index, record in enumerate(records):
        location = where_of(record, index, where)
        if fmt == "prompt_completion" and "completion" not in record and "response" in record:
            record = {key: value for key, value in record.items() if key != "response"} | {
                "completion": record["response"]
            }
        _check(record, fmt, location)
        if fmt == "prefs" and record["chosen"] == record["rejected"]:
            identical.append(location)
            continue
        kept.append(record)
    if identical:
        warnings.warn(
            f"skipped {len(identical)} preference pair(s) whose 'chosen' equals 'rejected' "
            f"(first at {identical[0]})",
            stacklevel=2,
        )
    if not kept:
        source = where_of(records[0], 0, where).rsplit(":", 1)[0] if records else where
        raise UserError(f"{source}: no usable records left after validation")
    return kept
