"""The one place that decides whether a tensor's W2A8 work runs on Triton kernels.

Triton runs only for CUDA tensors when Triton imports; everything else takes the plain-torch
reference path. `TRITON_INTERPRET=1` (Triton's CPU interpreter) is honoured by the kernels
themselves, not here. Tests that compare the two paths on the GPU pass `triton=False`
explicitly to the functions that take it, rather than patching this module.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (probed once per process)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor, allowed: bool = True) -> bool:
    """Whether work on `t` runs on Triton: a CUDA tensor, Triton importable, and `allowed`."""
    return allowed and t.is_cuda and triton_available()
