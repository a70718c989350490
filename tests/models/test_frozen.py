import pytest
import torch

from bitnet_rl.models.frozen import PackedTernaryLinear, frozen_ternary_copy
from bitnet_rl.models.io import load_policy
from bitnet_rl.quant.bitlinear import bitlinear_modules
from bitnet_rl.quant.kernels import triton_available
from bitnet_rl.quant.pack import kernel_padded_in
from bitnet_rl.recipe import QuantConfig


def test_frozen_copy_computes_the_policy_at_lambda_one(tiny_dir):
    for quant in (QuantConfig(), QuantConfig(granularity="per_group", group_size=32)):
        policy = load_policy(tiny_dir, quant=quant).eval()
        frozen = frozen_ternary_copy(policy)
        ids = torch.randint(5, 100, (2, 10))
        with torch.no_grad():
            torch.testing.assert_close(frozen(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)
        assert not bitlinear_modules(frozen)
        assert sum(isinstance(m, PackedTernaryLinear) for m in frozen.modules()) == len(bitlinear_modules(policy))
        assert all(not p.requires_grad for p in frozen.parameters())


def test_frozen_copy_is_independent_and_small(tiny_dir):
    policy = load_policy(tiny_dir)
    frozen = frozen_ternary_copy(policy)
    assert len(bitlinear_modules(policy)) == 14  # the policy keeps its BitLinear modules
    ids = torch.randint(5, 100, (1, 8))
    before = frozen(ids).logits.clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    assert torch.equal(frozen(ids).logits, before)
    packed_bytes = sum(m.packed.numel() for m in frozen.modules() if isinstance(m, PackedTernaryLinear))
    # 2 bits per weight, each row padded to a multiple of 128 inputs (the kernel layout)
    expected = sum(m.out_features * kernel_padded_in(m.in_features) // 4 for _, m in bitlinear_modules(policy))
    assert packed_bytes == expected


def test_frozen_reference_path_matches_bitlinear_per_layer():
    """Each packed projection equals its BitLinear at λ = 1 (codes, scales and bias survive packing)."""
    from bitnet_rl.quant.bitlinear import BitLinear

    torch.manual_seed(0)
    for kwargs in (dict(), dict(granularity="per_channel"), dict(granularity="per_group", group_size=32)):
        bit = BitLinear(96, 40, bias=True, **kwargs)
        packed = PackedTernaryLinear(bit)
        x = torch.randn(3, 7, 96)
        torch.testing.assert_close(packed(x), bit(x), rtol=1e-5, atol=1e-5)


def _tiny_cuda_bitnet(dtype):
    import transformers

    from bitnet_rl.models.convert import to_bitlinear

    torch.manual_seed(0)
    config = transformers.BitNetConfig(
        vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.BitNetForCausalLM(config)
    to_bitlinear(model)
    return model.to("cuda", dtype).eval()


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_frozen_kernels_match_reference_path_on_gpu():
    """The W2A8 kernel path against the torch reference path of the same frozen copy.

    One projection in float32: ≤ 1e-5 relative (exact int32 sums; only the scaling rounds
    differently). Whole models, relative on the logits: float32 ≤ 2e-2, bf16 ≤ 5e-2 (measured on
    an H200: 2.2e-3 and 2.8e-2). A last-bit difference can move a later int8 activation across a
    rounding boundary, and the bf16 reference path also rounds its fake-quantized activations
    and weights to bf16, which the kernel path does not.
    """
    from bitnet_rl.models.frozen import set_kernels
    from bitnet_rl.quant.bitlinear import BitLinear

    torch.manual_seed(0)
    bit = BitLinear(2560, 640, bias=True, granularity="per_channel").cuda()
    layer = PackedTernaryLinear(bit)
    x = torch.randn(300, 2560, device="cuda")
    with torch.no_grad():
        fast = layer(x)
        layer.use_kernels = False
        ref = layer(x)
    assert float((fast - ref).norm() / ref.norm()) <= 1e-5

    ids = torch.randint(3, 320, (4, 48), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    for dtype, tol in ((torch.float32, 2e-2), (torch.bfloat16, 5e-2)):
        frozen = frozen_ternary_copy(_tiny_cuda_bitnet(dtype))
        with torch.no_grad():
            fast = frozen(ids).logits.float()
            set_kernels(frozen, False)
            ref = frozen(ids).logits.float()
        assert frozen.kernel_tuner.configs  # tuned on the first kernel forward
        rel = float((fast - ref).norm() / ref.norm())
        assert rel <= tol, (dtype, rel)


def test_frozen_copy_accepts_group_sizes_the_kernels_cannot_run():
    """A per-group size that is not a multiple of 32 still freezes (torch path), as before the kernels."""
    from bitnet_rl.quant.bitlinear import BitLinear

    torch.manual_seed(0)
    bit = BitLinear(96, 40, granularity="per_group", group_size=16)
    packed = PackedTernaryLinear(bit)
    assert not packed.use_kernels
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(packed(x), bit(x), rtol=1e-5, atol=1e-5)
