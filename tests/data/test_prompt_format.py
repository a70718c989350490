"""One setting decides the chat template (`data.chat_template`), checkpoints record it, later stages
and `generate` follow it; a tiny model's tokenizer learns the run's own text."""

import json
import warnings

import pytest

from bitnet_rl.data.chat import resolve_chat
from bitnet_rl.data.prefs import tokenize_prefs
from bitnet_rl.errors import UserError
from bitnet_rl.recipe import Recipe, validate

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def recipe(out, data, **sections):
    raw = {
        "out": str(out),
        "model": {"tiny": TINY},
        "data": {"max_length": 48, "val_fraction": 0, **data},
        "train": {"max_steps": 2, "batch_size": 4},
        "logging": {"progress": False, "health_every": 0},
        **sections,
    }
    return validate(Recipe, raw, "test")


@pytest.mark.parametrize(
    "setting, has_messages, recorded, expected",
    [
        ("always", False, None, True),
        ("never", False, "chat", False),  # warns: the model was trained on chat prompts
        ("auto", True, None, True),
        ("auto", False, "chat", True),  # a chat-tuned model keeps its template for plain strings
        ("auto", False, "plain", False),
        ("auto", False, None, False),
    ],
)
def test_resolve_chat(setting, has_messages, recorded, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_chat(setting, has_messages, recorded, "data.jsonl") is expected
    differs = recorded is not None and recorded != ("chat" if expected else "plain")
    assert bool([w for w in caught if "trained on" in str(w.message)]) == differs


def test_never_with_messages_is_an_error():
    with pytest.raises(UserError, match="data.jsonl: data.chat_template=never"):
        resolve_chat("never", True, None, "data.jsonl")


def test_messages_sft_is_recorded_and_followed(tmp_path, no_compile):
    from bitnet_rl.generate import generate_to_records
    from bitnet_rl.models.io import load_tokenizer
    from bitnet_rl.train.sft import run_sft

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"sort: {a} {b} ="}, {"role": "assistant", "content": f" {min(a, b)} {max(a, b)}"}]} for a in range(5) for b in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = run_sft(recipe(tmp_path / "sft", {"path": str(data)}))
    assert json.loads((final / "config.json").read_text())["bitnet_rl"]["prompt_format"] == "chat"

    # string preference pairs after chat SFT: auto renders them with the template, like the SFT data
    from bitnet_rl.data.load import choose_chat
    from bitnet_rl.recipe import DataConfig

    pairs = [{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}]
    chat = choose_chat(DataConfig(path=str(data)), pairs, "prefs", "chat")
    tokenizer = load_tokenizer(final)
    ids = tokenize_prefs(pairs, tokenizer, 32, 48, chat=chat)[0]["prompt_ids"]
    assert chat is True and tokenizer.convert_tokens_to_ids("<|user|>") in ids and tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    # ... so the string pairs train exactly what the same pairs in messages format train
    as_messages = [{"prompt": [{"role": "user", "content": "sort: 2 1 ="}], "chosen": [{"role": "assistant", "content": " 1 2"}],
                    "rejected": [{"role": "assistant", "content": " 2 1"}]}]  # fmt: skip
    assert tokenize_prefs(pairs, tokenizer, 32, 48, chat=chat) == tokenize_prefs(as_messages, tokenizer, 32, 48)
    assert tokenize_prefs(pairs, tokenizer, 32, 48, chat=False) != tokenize_prefs(as_messages, tokenizer, 32, 48)

    # generate follows the record; --no-chat renders differently and says so
    def run(chat):
        return generate_to_records(final, ["sort: 3 1 ="], None, 4, 0.0, 0, 1.0, 0, 1, chat=chat)[0]

    default, forced = run(None), run(True)
    assert default["logprob"] == forced["logprob"] and default["completion"] == forced["completion"]
    with pytest.warns(UserWarning, match="trained on chat prompts; --no-chat"):
        plain = run(False)
    assert plain["logprob"] != default["logprob"]


def test_tiny_tokenizer_learns_the_runs_data(tmp_path, no_compile):
    from bitnet_rl.models.io import load_tokenizer
    from bitnet_rl.models.tiny import tiny_tokenizer
    from bitnet_rl.train.sft import run_sft

    data = tmp_path / "words.jsonl"
    words = ["banana bread", "pancake batter", "banana pancake", "bread and butter"]
    data.write_text("".join(json.dumps({"prompt": f"recipe {i}:", "completion": f" {w}"}) + "\n" for i, w in enumerate(words * 20)))
    final = run_sft(recipe(tmp_path / "sft", {"path": str(data)}))
    own, demo = load_tokenizer(final), tiny_tokenizer()
    for word in (" banana", " pancake", " butter"):
        assert len(own(word, add_special_tokens=False)["input_ids"]) == 1
        assert len(demo(word, add_special_tokens=False)["input_ids"]) >= 3

    # or a corpus the recipe names
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "zucchini zucchini zucchini"}) + "\n" for _ in range(20)))
    tiny = {**TINY, "tokenizer_data": str(corpus)}
    final = run_sft(recipe(tmp_path / "sft2", {"path": str(data)}, model={"tiny": tiny}))
    named = load_tokenizer(final)
    assert len(named(" zucchini", add_special_tokens=False)["input_ids"]) == 1
    assert len(named(" banana", add_special_tokens=False)["input_ids"]) > 1
