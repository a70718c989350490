"""BitLinear training fast paths: the quantized-weight cache (CPU) and the Triton fake-quant kernel (GPU)."""

import pytest
import torch

from bitnet_rl.quant.bitlinear import BitLinear, quantize_activation, quantize_weight
from bitnet_rl.quant.kernels import triton_available


def test_weight_cache_follows_optimizer_steps():
    torch.manual_seed(0)
    layer = BitLinear(32, 16)
    reference = BitLinear(32, 16)
    reference.cache_quantized_weight = False
    reference.weight = layer.weight
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    x = torch.randn(4, 32)
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first  # no recompute without a weight update
    for _ in range(3):
        out = layer(x)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(layer.quantized_weight(), quantize_weight(layer.weight))
    assert not torch.equal(layer.quantized_weight(), first)
    with torch.no_grad():
        layer.weight.mul_(-1)  # any in-place update through autograd-visible ops invalidates
    assert torch.equal(layer.quantized_weight(), quantize_weight(layer.weight))


def test_weight_cache_cannot_see_a_refill_in_place_so_the_trainer_clears_it():
    """FSDP2 refills the unsharded weight a forward reads in place, at the same address, without a
    version bump (here: through `.data`): the cache's key misses it, `clear_quantized_weights`
    (called by the trainer after every optimizer step) does not."""
    from bitnet_rl.quant.bitlinear import clear_quantized_weights

    torch.manual_seed(2)
    model = torch.nn.Sequential(BitLinear(32, 16), BitLinear(16, 8))
    stale = [m.quantized_weight() for m in model]
    for module in model:
        module.weight.data.copy_(-module.weight.detach())
    assert all(m.quantized_weight() is s for m, s in zip(model, stale))  # the key cannot tell
    clear_quantized_weights(model)
    for module in model:
        assert torch.equal(module.quantized_weight(), quantize_weight(module.weight))


def test_weight_cache_keeps_the_straight_through_gradient():
    torch.manual_seed(1)
    layer = BitLinear(24, 8, lam=0.5)
    x = torch.randn(5, 24)
    layer(x).sum().backward()
    cached = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.cache_quantized_weight = False
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, cached, rtol=0, atol=0)


def test_weight_cache_made_in_inference_mode_is_not_used_for_backward():
    """A rollout under `inference_mode` (weights unchanged since) must not hand its Q(W) to a training forward."""
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        rollout = layer(x)
    out = layer(x)
    out.sum().backward()
    assert torch.equal(out.detach(), rollout) and layer.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_fake_quant_kernel_is_bit_exact():
    from bitnet_rl.quant.kernels.train import fake_quantize_activation

    for dtype in (torch.float32, torch.bfloat16):
        for d in (64, 2560, 6912, 100):
            x = torch.randn(37, d, device="cuda", dtype=dtype) * torch.rand(37, 1, device="cuda", dtype=dtype) * 4
            x[3] = 0  # an all-zero row keeps a finite scale
            assert torch.equal(fake_quantize_activation(x), quantize_activation(x)), (dtype, d)
            assert torch.equal(fake_quantize_activation(x, triton=False), quantize_activation(x))
    x = torch.randn(2, 9, 2560, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q = fake_quantize_activation(x)
    assert q.dtype == torch.bfloat16 and torch.equal(q, quantize_activation(x).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_bitlinear_gpu_fast_paths_match_reference_step():
    """Forward and gradients with the kernel + cache equal the plain torch BitLinear (fp32 master, bf16 autocast)."""
    import torch.nn.functional as F

    from bitnet_rl.quant.bitlinear import ste_blend

    torch.manual_seed(0)
    layer = BitLinear(2560, 640, device="cuda")
    x = torch.randn(4, 128, 2560, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = layer(x)
        slow = F.linear(ste_blend(x, quantize_activation(x), 1.0), ste_blend(layer.weight, quantize_weight(layer.weight), 1.0))
    assert torch.equal(fast, slow)
    g = torch.randn_like(fast)
    gx_fast, gw_fast = torch.autograd.grad(fast, (x, layer.weight), g)
    gx_slow, gw_slow = torch.autograd.grad(slow, (x, layer.weight), g)
    assert torch.equal(gx_fast, gx_slow) and torch.equal(gw_fast, gw_slow)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_fake_quantize_weight_matches_quantize_weight_on_cpu(granularity):
    """The dispatch (torch off CUDA) gives `quantize_weight` cast to the requested dtype, and BitLinear's cached Q(W) uses it."""
    from bitnet_rl.quant.kernels.train import fake_quantize_weight

    torch.manual_seed(0)
    w = torch.randn(12, 64)
    for dtype in (None, torch.bfloat16):
        expected = quantize_weight(w, granularity, 32).to(dtype or w.dtype)
        assert torch.equal(fake_quantize_weight(w, granularity, 32, dtype), expected)
    layer = BitLinear(64, 12, granularity=granularity, group_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = layer.quantized_weight()
    assert q.dtype == torch.bfloat16 and torch.equal(q, quantize_weight(layer.weight, granularity, 32).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_weight_quant_kernel_is_bit_exact():
    """Triton Q(W) equals the torch reference bit for bit: every granularity, fp32/bf16 masters, fp32/bf16 outputs, ties."""
    from bitnet_rl.quant.kernels.train import fake_quantize_weight
    from bitnet_rl.quant.kernels.triton_train import ternary_dequant

    torch.manual_seed(0)
    for granularity in ("per_tensor", "per_channel", "per_group"):
        for wdtype in (torch.float32, torch.bfloat16):
            for shape in ((640, 2560), (37, 384), (6912, 2560)):
                w = (torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, device="cuda")).to(wdtype)
                w[1] = 0  # an all-zero row (per channel: the clamped scale)
                for out in (None, torch.bfloat16):
                    fast = fake_quantize_weight(w, granularity, 128, out)
                    ref = quantize_weight(w, granularity, 128).to(out or wdtype)
                    assert fast.dtype == ref.dtype and torch.equal(fast, ref), (granularity, wdtype, shape, out)
    assert torch.equal(fake_quantize_weight(w, "per_tensor", triton=False), quantize_weight(w))
    # exact ties W·s = ±0.5, ±1.5 (round half to even: 0, ±2 → ±1) against the torch formula with the same scale
    w = torch.tensor([0.125, -0.125, 0.375, -0.375, 0.0, 0.1249, 0.1251, 3.0], device="cuda").repeat(3, 1)
    scale = torch.tensor(4.0, device="cuda")
    expected = (w * scale).round().clamp(-1, 1) / scale
    assert torch.equal(ternary_dequant(w, scale, w.numel()), expected)
    assert expected[0, :5].tolist() == [0.0, 0.0, 0.25, -0.25, 0.0]
