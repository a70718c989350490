"""Programmatic dependent launch (PDL) for the decode kernels: the device half and the launch half.

A kernel launched with `launch_pdl=True` may start before the previous kernel in the stream has
finished. Before it touches anything that kernel may write (activations, scratch buffers, the
residual stream, the KV cache), it calls `gdc_wait`, which returns once the previous kernel has
completed and its writes are visible; then `gdc_launch_dependents` lets the next kernel start
early in turn. Weights are never written during decoding, so a kernel may load them before the
wait (`_w2a8_gemv_kernel` with PREFETCH). Without the launch attribute both instructions are
no-ops. Hopper or newer (`backend.use_pdl` decides, from the owning `KernelTuner`'s `pdl`);
CUDA graphs keep the dependency as a programmatic edge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet_rl.quant.kernels.backend import use_pdl


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_options(t: torch.Tensor, wanted: bool) -> dict:
    """The `PDL` constexpr and launch option for a kernel working on `t` (no launch option
    without PDL, so Triton versions without `launch_pdl` never see the keyword)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(t, wanted) else {"PDL": False}
