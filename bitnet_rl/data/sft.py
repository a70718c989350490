"""Supervised fine-tuning examples: token ids plus labels that are -100 where no loss is taken.

Labels use the Hugging Face convention: `labels[t]` is the target for position t and the model
shifts internally, so prompt tokens are masked by setting their labels to -100 and nothing
else is ever masked (padding aside, which the collator adds).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from bitnet_rl.data.chat import chat_segments, encode_prompt_completion
from bitnet_rl.data.readers import where_of
from bitnet_rl.errors import UserError

IGNORE_INDEX = -100
Example = dict[str, list[int]]


def _text_example(record: dict[str, Any], tokenizer: Any) -> Example:
    input_ids = list(tokenizer(record["text"])["input_ids"])
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": list(input_ids)}


def _pair_example(record: dict[str, Any], tokenizer: Any, train_on_prompt: bool, where: str, chat: bool | None = None) -> Example:
    completion = record["completion"] if "completion" in record else record["response"]
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, record["prompt"], completion, where, chat=chat)
    prompt_labels = prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + completion_ids, "labels": prompt_labels + completion_ids}


def _messages_example(record: dict[str, Any], tokenizer: Any, train_on_prompt: bool, where: str) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_segments(tokenizer, record["messages"], where):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if is_assistant or train_on_prompt else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_sft(
    records: list[dict[str, Any]], tokenizer: Any, fmt: str, max_length: int, train_on_prompt: bool = False, chat: bool | None = None
) -> list[Example]:
    """Tokenize validated records of format `fmt` into `{input_ids, labels}` of at most `max_length`.

    Completions (and plain text) end with EOS so the model learns to stop; chat turns end with
    the template's end-of-turn text. `chat` renders prompt/completion pairs with the chat template
    (None: only pairs holding message lists). Examples whose trainable tokens were all cut by truncation
    are dropped with one warning, since they would only add a zero-token loss.
    """
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    examples, dropped = [], 0
    for index, record in enumerate(records):
        where = where_of(record, index)
        if fmt == "text":
            example = _text_example(record, tokenizer)
        elif fmt == "prompt_completion":
            example = _pair_example(record, tokenizer, train_on_prompt, where, chat)
        elif fmt == "messages":
            example = _messages_example(record, tokenizer, train_on_prompt, where)
        else:
            raise UserError(f"{where}: data format {fmt!r} cannot be used for SFT")
        example = {key: ids[:max_length] for key, ids in example.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
            continue
        examples.append(example)
    if dropped:
        warnings.warn(f"dropped {dropped} example(s) whose prompt fills max_length={max_length}", stacklevel=2)
    if not examples:
        raise UserError(f"no SFT examples left: every prompt is longer than max_length={max_length}")
    return examples


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate all examples and cut the stream into chunks of `max_length` tokens.

    Packing removes padding, which dominates short-example batches. Labels are cut at the same
    offsets as input_ids so they stay aligned; chunks with no trainable label are dropped.
    """
    input_ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    chunks = []
    for start in range(0, len(input_ids), max_length):
        chunk_labels = labels[start : start + max_length]
        if any(label != IGNORE_INDEX for label in chunk_labels):
            chunks.append({"input_ids": input_ids[start : start + max_length], "labels": chunk_labels})
    return chunks


class SFTCollator:
    """Right-pad a list of examples into tensors: input_ids, labels, attention_mask, all (B, T)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_val_split(examples: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle with `seed` and hold out `val_fraction` (at least one example when positive)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(examples):
        raise UserError(f"val_fraction={val_fraction} leaves no training examples out of {len(examples)}")
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val
