"""Preference pairs: one prompt, a chosen and a rejected completion, as token ids and batches.

DPO and reward-model training compare log-probabilities of the two completions given the same
prompt, so the prompt is tokenized once and each completion separately; the collator marks
which positions are completion tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from bitnet_rl.data.chat import encode_prompt_completion
from bitnet_rl.data.readers import where_of
from bitnet_rl.errors import UserError

PrefExample = dict[str, list[int]]


def tokenize_prefs(
    records: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int, max_length: int, chat: bool | None = None
) -> list[PrefExample]:
    """Tokenize validated prefs records into `{prompt_ids, chosen_ids, rejected_ids}`.

    A prompt over `max_prompt_length` is an error rather than silently cut, because cutting
    a prompt changes the question both answers respond to. Completions are cut so that
    prompt + completion fits `max_length`. `chat` renders every pair with the chat template
    (None: only pairs holding message lists).
    """
    if not 0 < max_prompt_length < max_length:
        raise UserError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    examples = []
    for index, record in enumerate(records):
        where = where_of(record, index)
        prompt_ids, chosen_ids = encode_prompt_completion(tokenizer, record["prompt"], record["chosen"], where, chat=chat)
        _, rejected_ids = encode_prompt_completion(tokenizer, record["prompt"], record["rejected"], where, chat=chat)
        if len(prompt_ids) > max_prompt_length:
            raise UserError(
                f"{where}: field 'prompt' is {len(prompt_ids)} tokens, over max_prompt_length={max_prompt_length}"
            )
        room = max_length - len(prompt_ids)
        examples.append(
            {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:room], "rejected_ids": rejected_ids[:room]}
        )
    return examples


def model_pref_examples(records: list[dict[str, Any]], fmt: str, tokenizer: Any, model: Any, data: Any) -> list[PrefExample]:
    """Preference examples for training `model` (DPO policy or reward model) as the recipe's `data` says.

    The chat setting is resolved against the model's recorded prompt format and recorded on the
    model (its checkpoints then say what it was trained on); pairs must fit the model's context.
    """
    from bitnet_rl.data.load import check_fits_context, choose_chat
    from bitnet_rl.data.prompts import context_length
    from bitnet_rl.models.io import prompt_format_of, set_prompt_format

    chat = choose_chat(data, records, fmt, prompt_format_of(model))
    set_prompt_format(model, "chat" if chat else "plain")
    examples = tokenize_prefs(records, tokenizer, data.max_prompt_length, data.max_length, chat=chat)
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    check_fits_context(longest, context_length(model), data.path or "data")
    return examples


class PrefCollator:
    """Batch preference examples into right-padded tensors, all (B, T) with one shared T.

    Returns `chosen_input_ids`, `chosen_attention_mask`, `chosen_completion_mask` and the same
    for `rejected_`. The completion mask is 1 on completion tokens of input_ids; to sum
    log-probs, take `logits[:, :-1]` against `input_ids[:, 1:]` masked by `completion_mask[:, 1:]`.
    Chosen and rejected share T so they can be concatenated into one (2B, T) forward pass.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[PrefExample]) -> dict[str, torch.Tensor]:
        width = max(
            len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
            for example in examples
        )
        batch = {}
        for side in ("chosen", "rejected"):
            input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
            completion_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
            for row, example in enumerate(examples):
                prompt_length = len(example["prompt_ids"])
                ids = example["prompt_ids"] + example[f"{side}_ids"]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                completion_mask[row, prompt_length : len(ids)] = 1
            batch[f"{side}_input_ids"] = input_ids
            batch[f"{side}_attention_mask"] = attention_mask
            batch[f"{side}_completion_mask"] = completion_mask
        return batch
