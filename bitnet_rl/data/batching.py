"""Right-padding of token rows, the one batching rule every forward pass here uses."""

from __future__ import annotations

import torch


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both `(B, L)` long, rows right-padded with `pad_id`.

    Right padding keeps every real token at its true position, so causal models need no
    position bookkeeping.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask
