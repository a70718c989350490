"""Every supported file type round-trips, records know their location, bad files name file:line."""

import json

import pytest

from bitnet_rl.data.readers import WHERE, read_records
from bitnet_rl.errors import UserError

ROWS = [{"prompt": "sort: 3 1 2 =", "completion": " 1 2 3"}, {"prompt": "sort: 5 4 =", "completion": " 4 5"}]


def _strip(records):
    return [{key: value for key, value in record.items() if key != WHERE} for record in records]


def test_jsonl_round_trip_with_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    records = read_records(path)
    assert _strip(records) == ROWS
    assert [record[WHERE] for record in records] == [f"{path}:1", f"{path}:3"]  # blank line 2 skipped


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_and_data_key(tmp_path, wrapped):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": ROWS} if wrapped else ROWS))
    records = read_records(path)
    assert _strip(records) == ROWS
    assert records[1][WHERE] == f"{path}:record 2"


def test_parquet_round_trip(tmp_path):
    import pandas as pd

    path = tmp_path / "data.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    records = read_records(path)
    assert _strip(records) == ROWS
    assert records[0][WHERE] == f"{path}:row 1"


def test_csv_round_trip_with_file_lines(tmp_path):
    import pandas as pd

    path = tmp_path / "data.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    records = read_records(path)
    assert _strip(records) == ROWS
    assert [record[WHERE] for record in records] == [f"{path}:2", f"{path}:3"]  # line 1 is the header


def test_load_from_disk_dataset_and_datasetdict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "splits")
    )
    assert _strip(read_records(tmp_path / "plain")) == ROWS
    records = read_records(tmp_path / "splits")
    assert _strip(records) == ROWS  # the train split
    assert records[1][WHERE] == f"{tmp_path / 'splits'}:row 2"


def test_datasetdict_without_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(UserError, match="no 'train' split"):
        read_records(tmp_path / "splits")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "x", \n')
    with pytest.raises(UserError, match=r"prefs\.jsonl:3: invalid JSON"):
        read_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(UserError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        read_records(path)


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(UserError, match=r"data\.json:3: invalid JSON"):
        read_records(path)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, content", [("empty.jsonl", "\n\n"), ("empty.json", "[]"), ("empty.csv", "text\n")])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="has no records"):
        read_records(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"data\.txt: unsupported file type"):
        read_records(path)
