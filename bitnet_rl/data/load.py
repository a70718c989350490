"""From a recipe's `data` section to tokenized examples: the bundled demo task or a local file."""

from __future__ import annotations

from typing import Any

from bitnet_rl.data.formats import detect_format, validate
from bitnet_rl.data.readers import read_records, where_of
from bitnet_rl.errors import UserError
from bitnet_rl.recipe import DataConfig

DEMO = "demo"


def load_records(data: DataConfig, path: str | None, demo_kind: str, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """(validated records, format). `path == "demo"` generates the demo task's `demo_kind` records."""
    if not path:
        raise UserError("data.path is not set (give a file, a datasets directory, or `demo`)")
    if path == DEMO:
        from bitnet_rl.data import demo

        makers = {"sft": demo.make_sft_records, "prefs": demo.make_pref_records}
        records, source = makers[demo_kind](data.demo_size, seed), "demo"
    else:
        records, source = read_records(path), path
    fmt = data.format if data.format != "auto" else detect_format(records[0], where_of(records[0], 0, source))
    return validate(records, fmt, source), fmt
