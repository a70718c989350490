"""Preference tokenization and batching: prompt once, two completions, masks on completions."""

import pytest

from bitnet_rl.data.demo import demo_tokenizer, make_pref_records
from bitnet_rl.data.prefs import PrefCollator, tokenize_prefs
from bitnet_rl.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def test_plain_string_prefs(tokenizer):
    records = make_pref_records(10, seed=1)
    for record, example in zip(records, tokenize_prefs(records, tokenizer, 16, 32)):
        assert example["prompt_ids"] == tokenizer(record["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            expected = tokenizer(record[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert example[f"{side}_ids"] == expected


def test_chat_prefs_mix_strings_and_messages(tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "sort: 2 1 ="}],
        "chosen": [{"role": "assistant", "content": " 1 2"}],
        "rejected": " 2 1",  # a string completion is an assistant message
    }
    (example,) = tokenize_prefs([record], tokenizer, 32, 64)
    assert tokenizer.decode(example["prompt_ids"]) == "<s><|user|>\nsort: 2 1 =\n<|assistant|>\n"
    assert tokenizer.decode(example["chosen_ids"]) == " 1 2</s>"
    assert tokenizer.decode(example["rejected_ids"]) == " 2 1</s>"
    (same,) = tokenize_prefs([{**record, "prompt": "sort: 2 1 ="}], tokenizer, 32, 64)  # string prompt = user turn
    assert same == example


def test_long_prompt_names_file_line_and_field(tokenizer):
    records = [{"prompt": "sort: 1 2 3 4 5 =", "chosen": " 1", "rejected": " 2", "_where": "prefs.jsonl:12"}]
    with pytest.raises(UserError, match=r"prefs\.jsonl:12: field 'prompt' is 9 tokens, over max_prompt_length=4"):
        tokenize_prefs(records, tokenizer, max_prompt_length=4, max_length=32)
    with pytest.raises(UserError, match="max_prompt_length < max_length"):
        tokenize_prefs(records, tokenizer, max_prompt_length=32, max_length=32)


def test_completions_cut_to_max_length(tokenizer):
    records = [{"prompt": "sort: 5 4 3 =", "chosen": " 3 4 5", "rejected": " 5 4 3 3"}]
    (example,) = tokenize_prefs(records, tokenizer, max_prompt_length=8, max_length=9)
    assert len(example["prompt_ids"]) == 7
    assert len(example["chosen_ids"]) == len(example["rejected_ids"]) == 2


def test_collator_shapes_and_masks():
    examples = [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
        {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [2]},
    ]
    batch = PrefCollator(pad_token_id=0)(examples)
    assert {tensor.shape for tensor in batch.values()} == {(2, 6)}
    assert batch["chosen_input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 5, 7, 7, 7, 2]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["chosen_completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["rejected_input_ids"].tolist() == [[1, 5, 6, 8, 9, 2], [1, 5, 2, 0, 0, 0]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["rejected_completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0]]
