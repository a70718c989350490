"""The demo task: deterministic data, held-out prompts, the reward's partial credit, the tokenizer."""

import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bitnet_rl.data.demo import (
    demo_corpus,
    demo_tokenizer,
    is_held_out,
    make_pref_records,
    make_prompts,
    make_sft_records,
)
from bitnet_rl.data.formats import detect_format, validate

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reward_models.demo_task import exact_match, is_correct, parse_prompt, reward  # noqa: E402

PROMPT = "sort: 3 1 2 ="


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 1 2 3", 1.0),
        ("1 2 3\n", 1.0),
        (" 2 1 3", 1.0 * (0.5 + 0.3 * 0.5 + 0.2)),  # right digits, one of two pairs in order
        (" 3 2 1", 1.0 * (0.5 + 0.0 + 0.2)),  # right digits, reversed
        (" 1 2", 2 / 3 * (0.5 + 0.3)),  # a digit dropped
        (" 1 2 3 3", 3 / 4 * (0.5 + 0.3)),  # a digit duplicated
        (" 1", 1 / 3 * 0.5),  # no pairs to be in order
        (" 7 8 9", 0.0),  # sorted, but not the prompt's digits
        ("", 0.0),
        (" 1 2 x", 0.0),
        (" 12 3", 0.0),
        ("banana", 0.0),
    ],
)
def test_reward_partial_credit_by_hand(completion, expected):
    (value,) = reward([PROMPT], [completion], answer="ignored")
    assert value == pytest.approx(expected)
    assert 0.0 <= value <= 1.0


def test_reward_parses_chat_prompts_and_rejects_others():
    assert parse_prompt("<s><|user|>\nsort: 3 1 2 =\n<|assistant|>\n") == [3, 1, 2]
    with pytest.raises(ValueError, match="not a demo-task prompt"):
        reward(["what is 2+2?"], [" 4"])


def test_exact_match_is_one_only_where_the_partial_reward_is_one():
    prompts = ["sort: 5 0 5 ="] * 4 + [PROMPT]
    completions = [" 0 5 5", " 0 5", " 0 5 5 5", " 5 0 5", "1 2 3\n"]  # right, a repeat dropped, one added, unsorted; trailing newline
    assert exact_match(prompts, completions, answer="ignored") == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert [float(r == 1.0) for r in reward(prompts, completions)] == exact_match(prompts, completions)
    assert 0.0 < reward(prompts[1:2], completions[1:2])[0] < 1.0  # partial credit for the dropped repeat


def test_is_correct():
    assert is_correct(PROMPT, " 1 2 3")
    assert is_correct("sort: 5 0 5 =", " 0 5 5")
    assert not is_correct(PROMPT, " 1 3 2")
    assert not is_correct("sort: 5 0 5 =", " 0 5")
    assert not is_correct(PROMPT, "")


def test_records_are_valid_correct_and_deterministic():
    records = make_sft_records(50, seed=4)
    assert records == make_sft_records(50, seed=4)
    assert records != make_sft_records(50, seed=5)
    assert validate(records, "prompt_completion") == records
    assert all(detect_format(record) == "prompt_completion" for record in records)
    assert all(is_correct(record["prompt"], record["completion"]) for record in records)
    assert {len(parse_prompt(record["prompt"])) for record in records} == {3, 4, 5}
    assert records[0]["prompt"].startswith("sort: ") and records[0]["completion"].startswith(" ")


def test_pref_records_are_plausibly_wrong():
    records = make_pref_records(200, seed=2)
    assert records == make_pref_records(200, seed=2)
    assert validate(records, "prefs") == records  # no chosen == rejected pair, no warning
    for record in records:
        assert is_correct(record["prompt"], record["chosen"])
        assert not is_correct(record["prompt"], record["rejected"])
        assert 0.0 < reward([record["prompt"]], [record["rejected"]])[0] < 1.0  # wrong, but not garbage


def test_held_out_prompts_never_appear_in_training_data():
    prompts = make_prompts(300, seed=0)
    assert prompts == make_prompts(300, seed=0)
    assert all(is_held_out(parse_prompt(prompt)) for prompt in prompts)
    training = {record["prompt"] for record in make_sft_records(3000, seed=0) + make_pref_records(3000, seed=0)}
    assert training.isdisjoint(prompts)
    assert not any(is_held_out(parse_prompt(prompt)) for prompt in training)


def test_demo_tokenizer_one_token_per_digit_and_round_trip(tmp_path):
    tokenizer = demo_tokenizer()
    ids = tokenizer("sort: 3 1 2 = 1 2 3", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["sort", ":", "Ġ3", "Ġ1", "Ġ2", "Ġ=", "Ġ1", "Ġ2", "Ġ3"]
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = demo_corpus()[0]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"][0] == loaded.bos_token_id
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "sort: 2 1 ="}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|>\nsort: 2 1 =\n<|assistant|>\n"
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_reward_file_loads_by_path_and_by_module_name():
    path = ROOT / "reward_models" / "demo_task.py"
    spec = importlib.util.spec_from_file_location("demo_task_by_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.reward([PROMPT], [" 1 2 3"]) == [1.0]
    assert "bitnet_rl" not in path.read_text()  # stands alone, users copy it
    assert importlib.import_module("reward_models.demo_task").is_correct(PROMPT, " 1 2 3")
