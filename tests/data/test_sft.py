"""SFT tokenization: labels are -100 exactly on prompt tokens; packing, padding and splitting."""

import copy

import pytest
import torch

from bitnet_rl.data.chat import chat_segments, render_messages
from bitnet_rl.data.demo import demo_tokenizer, make_sft_records
from bitnet_rl.data.sft import IGNORE_INDEX, SFTCollator, pack_examples, tokenize_sft, train_val_split
from bitnet_rl.errors import UserError

MULTI_TURN = [
    {"role": "system", "content": "You sort digits."},
    {"role": "user", "content": "sort: 2 1 ="},
    {"role": "assistant", "content": " 1 2"},
    {"role": "user", "content": "sort: 3 0 ="},
    {"role": "assistant", "content": " 0 3"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def test_completion_only_mask_token_by_token(tokenizer):
    records = make_sft_records(20, seed=3)
    examples = tokenize_sft(records, tokenizer, "prompt_completion", max_length=64)
    for record, example in zip(records, examples):
        prompt_ids = tokenizer(record["prompt"])["input_ids"]
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
        for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
            expected = IGNORE_INDEX if position < len(prompt_ids) else token
            assert label == expected, (position, record)
        assert example["labels"][-1] == tokenizer.eos_token_id
        text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
        assert text == record["prompt"] + record["completion"]


def test_train_on_prompt_keeps_every_label(tokenizer):
    (example,) = tokenize_sft(make_sft_records(1, seed=0), tokenizer, "prompt_completion", 64, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_text_format_trains_on_everything_and_ends_with_eos(tokenizer):
    (example,) = tokenize_sft([{"text": "sort: 1 0 = 0 1"}], tokenizer, "text", 64)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][-1] == tokenizer.eos_token_id


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    (example,) = tokenize_sft([{"messages": MULTI_TURN}], tokenizer, "messages", 128)
    # Same tokens as tokenizing the whole rendered conversation at once.
    full = tokenizer(render_messages(tokenizer, MULTI_TURN), add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == full
    # Each run of unmasked labels is exactly one assistant turn: its content plus EOS.
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current)
    assert [tokenizer.decode(span) for span in spans] == [" 1 2</s>", " 0 3</s>"]
    # Token by token: masked exactly where the segment is not the assistant's.
    position = 0
    for text, is_assistant in chat_segments(tokenizer, MULTI_TURN):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for offset, token in enumerate(ids):
            assert example["labels"][position + offset] == (token if is_assistant else IGNORE_INDEX)
        position += len(ids)
    assert position == len(example["input_ids"])


def test_segments_concatenate_to_rendered_text(tokenizer):
    segments = chat_segments(tokenizer, MULTI_TURN)
    assert "".join(text for text, _ in segments) == render_messages(tokenizer, MULTI_TURN)
    assert [text for text, is_assistant in segments if is_assistant] == [" 1 2</s>", " 0 3</s>"]
    assert segments[0][0].endswith("<|assistant|>\n")  # the generation prompt is prompt


def test_template_that_rewrites_history_is_a_user_error(tokenizer):
    last_message_only = copy.deepcopy(tokenizer)
    last_message_only.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(UserError, match=r"chat\.jsonl:5: the chat template"):
        tokenize_sft([{"messages": MULTI_TURN, "_where": "chat.jsonl:5"}], last_message_only, "messages", 64)


def test_truncation_and_dropping_prompt_only_examples(tokenizer):
    records = [
        {"prompt": "sort: 1 2 3 4 5 =", "completion": " 1 2 3 4 5"},  # 9 prompt tokens
        {"prompt": "sort: 2 1 =", "completion": " 1 2"},
    ]
    with pytest.warns(UserWarning, match="dropped 1 example"):
        examples = tokenize_sft(records, tokenizer, "prompt_completion", max_length=8)
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 8 == len(examples[0]["labels"])
    with pytest.warns(UserWarning), pytest.raises(UserError, match="max_length=3"):
        tokenize_sft(records, tokenizer, "prompt_completion", max_length=3)


def test_prefs_format_is_rejected_for_sft(tokenizer):
    with pytest.raises(UserError, match="prefs.jsonl:7: data format 'prefs'"):
        record = {"prompt": "p", "chosen": "a", "rejected": "b", "_where": "prefs.jsonl:7"}
        tokenize_sft([record], tokenizer, "prefs", 16)


def test_packing_keeps_labels_aligned():
    examples = [
        {"input_ids": [1, 10, 11, 2], "labels": [-100, -100, 11, 2]},
        {"input_ids": [1, 20, 21, 22, 2], "labels": [-100, -100, 21, 22, 2]},
        {"input_ids": [1, 30, 2], "labels": [-100, 30, 2]},
    ]
    chunks = pack_examples(examples, max_length=5)
    assert [chunk["input_ids"] for chunk in chunks] == [[1, 10, 11, 2, 1], [20, 21, 22, 2, 1], [30, 2]]
    assert [chunk["labels"] for chunk in chunks] == [[-100, -100, 11, 2, -100], [-100, 21, 22, 2, -100], [30, 2]]
    token_to_label = {t: l for e in examples for t, l in zip(e["input_ids"], e["labels"]) if t >= 10}
    for chunk in chunks:
        for token, label in zip(chunk["input_ids"], chunk["labels"]):
            if token >= 10:
                assert token_to_label[token] == label


def test_packing_drops_chunks_without_targets():
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}, {"input_ids": [9, 10], "labels": [9, 10]}]
    assert pack_examples(examples, max_length=2) == [{"input_ids": [9, 10], "labels": [9, 10]}]


def test_collator_pads_right():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = SFTCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_train_val_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = train_val_split(items, 0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == items
    assert (train, val) == train_val_split(items, 0.1, seed=7)
    assert val != train_val_split(items, 0.1, seed=8)[1]
    assert train_val_split(items[:5], 0.01, seed=0)[1] != []  # at least one when asked for any
    all_train, no_val = train_val_split(items, 0.0, seed=0)
    assert no_val == [] and sorted(all_train) == items
    with pytest.raises(UserError, match="val_fraction"):
        train_val_split(items, 1.0, seed=0)
