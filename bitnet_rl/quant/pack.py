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
    blocks = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(blocks, dim=0).to(torch.int16) - 1
    if out_features is not None:
        codes = codes[:out_features]
    return codes.to(dtype)


# --- Kernel layout -------------------------------------------------------------------------
#
# The W2A8 kernels read a layout packed along the input dimension K, so that one row of bytes
# holds one output channel. K is split into chunks of `KERNEL_CHUNK` = 128 values; a chunk is
# 32 bytes, and byte `l` of chunk `c` holds the codes of k = 128·c + 32·s + l at bit shift 2·s
# (s = 0..3), each stored as code + 1 in {0, 1, 2}. Unpacking one bit plane of a 32-byte run
# therefore yields 32 *contiguous* k values, which the kernels feed straight to an int8 dot.
# K is padded up to a multiple of 128 with stored value 0; the kernels multiply those
# positions by zero activations, so the padding never contributes.

KERNEL_CHUNK = 128  # k values per 32-byte chunk
KERNEL_PLANE = 32  # k values per bit plane of a chunk (= bytes per chunk)


def kernel_padded_in(in_features: int) -> int:
    """`in_features` rounded up to a multiple of `KERNEL_CHUNK`."""
    return -(-in_features // KERNEL_CHUNK) * KERNEL_CHUNK


def pack_kernel(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack int codes in {-1, 0, 1} of shape `(N, K)` into uint8 `(N, kernel_padded_in(K) // 4)`.

    With `out`, the bytes are written into that preallocated tensor (same device, right shape).
    """
    rows, in_features = codes.shape
    padded = kernel_padded_in(in_features)
    stored = torch.zeros((rows, padded), dtype=torch.uint8, device=codes.device)
    stored[:, :in_features] = (codes.to(torch.int16) + 1).to(torch.uint8)
    planes = stored.view(rows, padded // KERNEL_CHUNK, VALUES_PER_BYTE, KERNEL_PLANE)
    packed = planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)
    packed = packed.reshape(rows, padded // VALUES_PER_BYTE)
    if out is None:
        return packed
    if out.shape != packed.shape or out.dtype != torch.uint8:
        raise ValueError(f"pack_kernel: out has shape {tuple(out.shape)} {out.dtype}, expected {tuple(packed.shape)} uint8")
    out.copy_(packed)
    return out


def unpack_kernel(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_kernel`: codes in {-1, 0, 1} of shape `(N, in_features)`."""
    rows, nbytes = packed.shape
    if nbytes * VALUES_PER_BYTE != kernel_padded_in(in_features):
        raise ValueError(f"unpack_kernel: {nbytes} bytes per row do not hold in_features={in_features}")
    chunks = packed.view(rows, nbytes // KERNEL_PLANE, 1, KERNEL_PLANE)
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device).view(1, 1, -1, 1)
    stored = (chunks >> shifts) & 3
    codes = stored.reshape(rows, nbytes * VALUES_PER_BYTE)[:, :in_features].to(torch.int16) - 1
    return codes.to(dtype)


def kernel_from_hf(hf_packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Transformers' offline layout `(ceil(out / 4), in)` → kernel layout `(out, padded_in // 4)`."""
    return pack_kernel(unpack_hf(hf_packed, out_features))


def kernel_to_hf(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Kernel layout `(out, padded_in // 4)` → transformers' offline layout `(ceil(out / 4), in)`."""
    return pack_hf(unpack_kernel(packed, in_features))
