"""Programmatic dependent launch (quant/kernels/triton_gdc.py): where it is on, and what the
compiled decode kernels do before waiting on the previous kernel. The PTX checks compile for
sm_90 without a GPU (they need Triton, so they skip where it is not installed); exactness with
PDL on the GPU is tests/quant/test_kernels.py's."""

import pytest
import torch

from bitnet_rl.quant.kernels.backend import use_pdl


def test_pdl_is_off_on_cpu_and_when_not_wanted():
    from bitnet_rl.quant.kernels.tuner import KernelTuner

    assert KernelTuner().pdl  # wanted by default
    assert KernelTuner().pdl_for(1) and KernelTuner().pdl_for(64) and not KernelTuner().pdl_for(256)  # small grids only
    assert not KernelTuner(pdl=False).pdl_for(1)
    assert not use_pdl(torch.zeros(1), True)  # CPU tensors never launch Triton kernels
    if torch.cuda.is_available():
        cuda = torch.zeros(1, device="cuda")
        assert use_pdl(cuda, True) == (torch.cuda.get_device_capability()[0] >= 9)  # where the GPU supports it
        assert not use_pdl(cuda, False)


GEMV_SIGNATURE = {
    "x_ptr": "*i32", "xdq_ptr": "*fp32", "xsum_ptr": "*i32", "w_ptr": "*i32", "wdq_ptr": "*fp32", "bias_ptr": "*fp32",
    "y_ptr": "*fp32", "M": "i32", "N": "i32", "KW": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
}  # fmt: skip


def gemv_ptx(prefetch: bool, pdl: bool) -> list[str]:
    """The dp4a GEMV compiled for sm_90: its global loads and grid-dependency instructions, in order."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bitnet_rl.quant.kernels import triton_w2a8

    consts = dict(SCALE_MODE=0, HAS_BIAS=False, INT_OUT=False, BLOCK_N=64, BLOCK_M=1, BLOCK_KW=32, USE_ASM=True, PREFETCH=prefetch, PDL=pdl)
    signature = {**GEMV_SIGNATURE, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=triton_w2a8._w2a8_gemv_kernel, signature=signature, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": pdl}).asm["ptx"]
    return [line.strip().split()[0 if "griddep" in line else 1] for line in ptx.splitlines() if "ld.global" in line or "griddepcontrol" in line]


def test_gemv_loads_weights_before_waiting_and_nothing_else():
    """With PDL the first weight tile (64 rows × 32 words over 128 threads: 16 loads per thread)
    is loaded before `griddepcontrol.wait`, every activation load after it; without PDL there is
    no grid-dependency instruction at all."""
    ops = gemv_ptx(prefetch=True, pdl=True)
    wait = ops.index("griddepcontrol.wait;")
    assert ops[wait + 1] == "griddepcontrol.launch_dependents;"
    assert wait == 16 and all(op.startswith("ld.global") for op in ops[:wait])
    plain = gemv_ptx(prefetch=False, pdl=True)
    assert plain[:2] == ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"]  # nothing loaded before the wait
    assert not any("griddep" in op for op in gemv_ptx(prefetch=False, pdl=False))
