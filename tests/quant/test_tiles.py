"""W2A8 tile choice (quant/kernels/w2a8_tiles.py) and the split-K scratch (tuner.SplitScratch):
plain Python and torch, so they run on CPU. That split-K tiles compute the same bits as one slice
is tests/quant/test_kernels.py's (GPU)."""

import torch

from bitnet_rl.quant.kernels.tuner import SplitScratch
from bitnet_rl.quant.kernels.w2a8_tiles import DP4A_MAX_M, SPLIT_SCRATCH, candidates, m_class, select_config

CPU = torch.device("cpu")
# (N, packed bytes per row) of the 2B4T projections: qkv, o, gate|up, down
SHAPES = [(3840, 640), (2560, 640), (13824, 640), (2560, 1728)]


def test_row_classes():
    assert [m_class(m) for m in (1, 4, 5, 16, 17, 64, 65, 256, 257, 4096)] == [4, 4, 16, 16, 64, 64, 256, 256, 0, 0]


def test_split_k_candidates_divide_k_and_fit_the_scratch():
    """Every split factor divides the K steps of its tile, and its slabs (split × rows of the class
    × N int32) fit SPLIT_SCRATCH; the decode classes do get split-K tiles, prefill none."""
    for n, kb in SHAPES:
        for m in (16, 64, 256):
            configs = candidates(m, n, kb, False)
            assert any(c.split_k > 1 for c in configs)
            for c in configs:
                assert (kb // c.block_kb) % c.split_k == 0
                assert c.split_k == 1 or c.split_k * m_class(m) * n <= SPLIT_SCRATCH
        assert all(c.split_k == 1 for c in candidates(4096, n, kb, False))
    # gate|up at 256 rows (3.5M sums per slab): 5 divides its 10 steps of 64 bytes, but 5 slabs exceed the scratch
    assert {c.split_k for c in candidates(256, 13824, 640, False)} == {1, 2}


def test_per_group_scales_never_split():
    """Per-group partial sums are float, so no tile splits K for them (heuristic or tuned)."""
    for m in (1, 16, 64, 256):
        assert all(c.split_k == 1 for c in candidates(m, 2560, 640, True))
        assert select_config(m, 2560, 640, True, CPU).split_k == 1


def test_heuristic_tiles_per_class():
    assert select_config(1, 2560, 640, False, CPU).kind == "dp4a"
    assert select_config(DP4A_MAX_M + 1, 2560, 640, False, CPU).kind == "mma"
    prefill = select_config(4096, 2560, 640, False, CPU)
    assert (prefill.block_m, prefill.block_n, prefill.split_k) == (128, 128, 1)  # the prefill tile, not the 16-row one
    small = select_config(16, 2560, 640, False, CPU)  # 80 programs on a CPU's nominal 8 "SMs" already fill 2 waves
    assert (small.block_m, small.block_n, small.split_k) == (16, 32, 1)


def test_split_scratch_grows_keeps_old_buffers_and_starts_with_zero_counters():
    scratch = SplitScratch()
    slabs, counters = scratch.take(CPU, 100, 8)
    assert slabs.numel() == 100 and counters.numel() == 8 and not counters.any()
    again, counters_again = scratch.take(CPU, 50, 4)  # fits: the same memory
    assert again.data_ptr() == slabs.data_ptr() and counters_again.data_ptr() == counters.data_ptr()
    bigger, bigger_counters = scratch.take(CPU, 400, 2)  # grows: new buffers, at least as large as before in both parts
    assert bigger.numel() == 400 and bigger_counters.numel() == 2 and not bigger_counters.any()
    held = scratch.buffers[CPU]
    assert len(held) == 2 and held[0][0].data_ptr() == slabs.data_ptr()  # kept alive for graphs that captured it
    assert held[1][1].numel() == 8
