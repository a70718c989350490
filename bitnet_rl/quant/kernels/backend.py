"""The one place that decides whether a tensor's W2A8 work runs on Triton kernels.

Triton runs only for CUDA tensors when Triton imports; everything else takes the plain-torch
reference path. `TRITON_INTERPRET=1` (Triton's CPU interpreter) is read once here (`INTERPRET`)
and honoured by the kernels themselves. Tests that compare the two paths on the GPU pass `triton=False`
explicitly to the functions that take it, rather than patching this module.
"""

from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter runs the kernels


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


@functools.cache
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch: a Hopper-or-newer GPU and a Triton with grid dependency
    control (`tl.extra.cuda.gdc_wait`, Triton ≥ 3.4) that is not the CPU interpreter."""
    if INTERPRET or torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def use_pdl(t: torch.Tensor, wanted: bool) -> bool:
    """Whether the Triton kernels working on `t` launch with programmatic dependent launch (PDL):
    `wanted` (the owning `KernelTuner`'s `pdl`, on by default) and a GPU and Triton that support it.

    With PDL a kernel may start while the one before it in the stream is still finishing: it
    runs what does not depend on that kernel (a GEMV's first weight tile) and then waits
    (`griddepcontrol.wait`) until the earlier kernel's writes are visible, so the results are
    the same and launch gaps inside the decode graph shrink (batch-1 decode 1.07x on an H200).
    """
    return wanted and t.is_cuda and pdl_supported(t.device.index or 0)
