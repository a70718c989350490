"""Format detection and validation: every bad record is named by file:line and field."""

import json

import pytest

from bitnet_rl.data.formats import detect_format, validate
from bitnet_rl.data.readers import read_records
from bitnet_rl.errors import UserError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
PAIR = {"prompt": "p", "completion": "c"}
PREFS = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"text": "hello"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": "p", "response": "c"}, "prompt_completion"),
        ({"messages": CHAT}, "messages"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "prefs"),
        ({"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [{"role": "assistant", "content": "x"}]}, "prefs"),
        ({"text": "t", "_where": "x.jsonl:1"}, "text"),
    ],
)
def test_detect_each_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_unknown_names_location_and_fields():
    with pytest.raises(UserError, match=r"d\.jsonl:4: cannot tell .*\(prompt, question\)"):
        detect_format({"prompt": "p", "question": "q", "_where": "d.jsonl:4"})


def test_response_alias_becomes_completion():
    (record,) = validate([{"prompt": "p", "response": "c"}], "prompt_completion")
    assert record == {"prompt": "p", "completion": "c"}


def _write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_records(path)


@pytest.mark.parametrize(
    "fmt, good, bad, field",
    [
        ("text", {"text": "a"}, {"text": "  "}, "'text' is empty"),
        ("text", {"text": "a"}, {"text": 3}, "'text' must be a string"),
        ("prompt_completion", PAIR, {"prompt": "p"}, "missing field 'completion'"),
        ("prompt_completion", PAIR, {"prompt": "", "completion": "c"}, "'prompt' is empty"),
        ("messages", {"messages": CHAT}, {"messages": []}, "'messages' must be a non-empty list"),
        ("messages", {"messages": CHAT}, {"messages": [{"role": "user"}]}, "field 'messages[0].content'"),
        ("messages", {"messages": CHAT}, {"messages": [{"content": "x"}]}, "missing field 'messages[0].role'"),
        ("messages", {"messages": CHAT}, {"messages": CHAT[:1]}, "'messages' has no non-empty assistant"),
        ("prefs", PREFS, {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ("prefs", PREFS, {"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ("prefs", PREFS, {**PREFS, "chosen": ""}, "'chosen' is empty"),
        ("prefs", PREFS, {**PREFS, "chosen": [{"role": "assistant"}]}, "missing field 'chosen[0].content'"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, fmt, good, bad, field):
    records = _write_jsonl(tmp_path, [good, good, bad])
    with pytest.raises(UserError) as error:
        validate(records, fmt)
    message = str(error.value)
    assert "data.jsonl:3: " in message and field in message
    assert "\n" not in message


def test_in_memory_records_are_named_by_source_and_index():
    with pytest.raises(UserError, match=r"demo:2: missing field 'text'"):
        validate([{"text": "a"}, {"txt": "b"}], "text", where="demo")


def test_identical_pairs_skipped_with_one_counting_warning(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ]
    records = _write_jsonl(tmp_path, rows, "prefs.jsonl")
    with pytest.warns(UserWarning) as caught:
        kept = validate(records, "prefs")
    assert len(caught) == 1
    assert "skipped 2 preference pair(s)" in str(caught[0].message) and "prefs.jsonl:2" in str(caught[0].message)
    assert [record["chosen"] for record in kept] == ["a", "c"]


def test_all_pairs_identical_is_an_error(tmp_path):
    records = _write_jsonl(tmp_path, [{"prompt": "p", "chosen": "x", "rejected": "x"}], "prefs.jsonl")
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"prefs\.jsonl: no usable records"):
        validate(records, "prefs")
