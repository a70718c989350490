"""Kernel packing layout and the torch W2A8 reference (CPU)."""

import pytest
import torch

from bitnet_rl.quant.bitlinear import BitLinear, quantize_activation
from bitnet_rl.quant.kernels import PackedWeight, concat_packed, quantize_rows_ref, w2a8_linear, w2a8_matmul_ref
from bitnet_rl.quant.pack import (
    KERNEL_CHUNK,
    kernel_from_hf,
    kernel_padded_in,
    kernel_to_hf,
    pack_hf,
    pack_kernel,
    unpack_hf,
    unpack_kernel,
)

SHAPES = [(1, 1), (3, 5), (7, 130), (16, 128), (5, 2560), (13, 300)]


def random_codes(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_round_trip(n, k):
    codes = random_codes(n, k)
    packed = pack_kernel(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, kernel_padded_in(k) // 4)
    assert torch.equal(unpack_kernel(packed, k), codes)


@pytest.mark.parametrize("n,k", SHAPES)
def test_hf_conversions_both_ways(n, k):
    codes = random_codes(n, k, seed=1)
    hf = pack_hf(codes)
    kernel = kernel_from_hf(hf, n)
    assert torch.equal(kernel, pack_kernel(codes))
    assert torch.equal(kernel_to_hf(kernel, k), hf)
    assert torch.equal(unpack_hf(kernel_to_hf(kernel, k), n), codes)


def test_kernel_layout_bit_positions():
    """Byte l of chunk c holds k = 128c + 32s + l at bits 2s, 2s+1, stored as code + 1."""
    codes = random_codes(4, 2 * KERNEL_CHUNK + 7, seed=2)
    packed = pack_kernel(codes)
    for k in range(codes.shape[1]):
        chunk, rest = divmod(k, KERNEL_CHUNK)
        plane, lane = divmod(rest, 32)
        stored = (packed[:, 32 * chunk + lane] >> (2 * plane)) & 3
        assert torch.equal(stored.to(torch.int16) - 1, codes[:, k].to(torch.int16))
    # padding beyond K is stored as 0
    tail = unpack_kernel(packed, kernel_padded_in(codes.shape[1]))[:, codes.shape[1] :]
    assert bool((tail == -1).all())


def test_pack_into_preallocated_buffer():
    codes = random_codes(6, 200)
    out = torch.zeros((6, kernel_padded_in(200) // 4), dtype=torch.uint8)
    ptr = out.data_ptr()
    pack_kernel(codes, out=out)
    assert out.data_ptr() == ptr and torch.equal(unpack_kernel(out, 200), codes)
    with pytest.raises(ValueError):
        pack_kernel(codes, out=torch.zeros((6, 10), dtype=torch.uint8))


def test_quantize_rows_matches_bitlinear():
    x = torch.randn(9, 70) * 3
    x[2] = 0.0
    q, dq, s = quantize_rows_ref(x)
    assert q.dtype == torch.int8 and torch.equal(s, q.int().sum(-1))
    torch.testing.assert_close(q.float() * dq[:, None], quantize_activation(x), rtol=1e-6, atol=1e-7)


GRANULARITIES = [("per_tensor", 128), ("per_channel", 128), ("per_group", 32), ("per_group", 128)]


@pytest.mark.parametrize("granularity,group", GRANULARITIES)
@pytest.mark.parametrize("n,k", [(24, 256), (10, 384)])
def test_packed_weight_matches_bitlinear(granularity, group, n, k):
    torch.manual_seed(0)
    layer = BitLinear(k, n, bias=True, granularity=granularity, group_size=group)
    pw = PackedWeight.from_bitlinear(layer)
    assert pw.granularity == granularity
    codes, scale = layer.ternary_codes()
    assert torch.equal(pw.codes(), codes)
    from bitnet_rl.quant.bitlinear import dequantize_codes

    torch.testing.assert_close(pw.dense(), dequantize_codes(codes, scale, group), rtol=1e-6, atol=0)
    x = torch.randn(5, k)
    q, dq, _ = quantize_rows_ref(x)
    exact = (q.long() @ codes.long().T).to(torch.int32)
    assert torch.equal(w2a8_matmul_ref(q, dq, pw, int_only=True), exact)
    with torch.no_grad():
        torch.testing.assert_close(w2a8_linear(x, pw), layer(x), rtol=1e-5, atol=1e-5)


def test_concat_packed_makes_per_channel():
    torch.manual_seed(0)
    layers = [BitLinear(128, n) for n in (8, 4, 4)]
    fused = concat_packed([PackedWeight.from_bitlinear(m) for m in layers])
    assert fused.granularity == "per_channel" and fused.out_features == 16
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(w2a8_linear(x, fused), torch.cat([m(x) for m in layers], -1), rtol=1e-5, atol=1e-5)
