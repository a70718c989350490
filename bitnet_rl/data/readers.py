"""Read local data files into a list of plain dicts, each remembering where it came from.

Every record gets a `_where` key ("prefs.jsonl:12") so that an error found much later, while
validating or tokenizing, still names the line a user has to fix. Locations are
`file:LINE` for .jsonl and .csv (1-based file lines), `file:record N` for .json and
`file:row N` for .parquet and `datasets.save_to_disk` directories (1-based).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bitnet_rl.errors import UserError

WHERE = "_where"
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def where_of(record: dict[str, Any], index: int | None = None, source: str = "<records>") -> str:
    """The location of a record for an error message; in-memory records fall back to `source:N`."""
    if record.get(WHERE):
        return record[WHERE]
    return source if index is None else f"{source}:{index + 1}"


def _utf8_error(path: Path, raw: bytes, error: UnicodeDecodeError, line_offset: int = 0) -> UserError:
    """`file:LINE: not valid UTF-8 (byte 0x.. at column N)` for a decode error at `error.start` in `raw`."""
    line = line_offset + raw.count(b"\n", 0, error.start) + 1
    column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
    return UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column}); save the file as UTF-8")


def read_text_utf8(path: Path) -> str:
    """A whole file as UTF-8 text; an invalid byte is a `UserError` naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _utf8_error(path, raw, error) from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open("rb") as raw_lines:
        for line_number, raw in enumerate(raw_lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _utf8_error(path, raw, error, line_offset=line_number - 1) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number}: invalid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append({**record, WHERE: f"{path}:{line_number}"})
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        content = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    if isinstance(content, dict) and "data" in content:
        content = content["data"]
    if not isinstance(content, list):
        raise UserError(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {type(content).__name__}")
    for index, record in enumerate(content):
        if not isinstance(record, dict):
            raise UserError(f"{path}:record {index + 1}: expected a JSON object, got {type(record).__name__}")
    return [{**record, WHERE: f"{path}:record {index + 1}"} for index, record in enumerate(content)]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    import io

    records = []
    with io.StringIO(read_text_utf8(path), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:  # line_num is the row's last line (its only one, unless quoted newlines)
                records.append({**row, WHERE: f"{path}:{reader.line_num}"})
        except csv.Error as error:
            raise UserError(f"{path}:{reader.line_num}: invalid CSV ({error})") from None
    return records


def _with_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, WHERE: f"{path}:row {index + 1}"} for index, row in enumerate(rows)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({error})") from None
    return _with_rows(path, table.to_pylist())


def _read_dataset_dir(path: Path) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise UserError(f"{path}: DatasetDict has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    return _with_rows(path, dataset.to_list())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read .jsonl, .json, .parquet, .csv or a `save_to_disk` directory into records with `_where`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        records = _read_dataset_dir(path)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        records = _read_json(path)
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    elif path.suffix == ".csv":
        records = _read_csv(path)
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)} or a dataset dir)")
    if not records:
        raise UserError(f"{path} has no records")
    return records
