"""2-bit packing of ternary codes.

`pack_hf` / `unpack_hf` use the layout of transformers' offline bitnet format: uint8, four
values per byte along dim 0 in blocks. With R = ceil(out / 4), packed row i holds rows
i, i + R, i + 2R, i + 3R at bit shifts 0, 2, 4, 6, each stored as code + 1.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4


def pack_hf(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in {-1, 0, 1} of shape `(out, ...)` into uint8 `(ceil(out / 4), ...)`."""
    out = codes.shape[0]
    rows = -(-out // VALUES_PER_BYTE)
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((rows, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        block = stored[i * rows : (i + 1) * rows]
        packed[: block.shape[0]] |= block << (2 * i)
    return packed


def unpack_hf(packed: torch.Tensor, out_features: int | None = None, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_hf`: codes in {-1, 0, 1} of shape `(out_features, ...)`.

    `out_features` defaults to `4 * packed.shape[0]` (what transformers assumes).
    """
    rows = packed.shape[0]
    blocks = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(blocks, dim=0).to(torch.int16) - 1
    if out_features is not None:
        codes = codes[:out_features]
    return codes.to(dtype)
