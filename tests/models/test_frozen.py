import torch

from bitnet_rl.models.frozen import PackedTernaryLinear, frozen_ternary_copy
from bitnet_rl.models.io import load_policy
from bitnet_rl.quant.bitlinear import bitlinear_modules
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
    master_bytes = sum(m.weight.numel() * 2 for _, m in bitlinear_modules(policy))  # as bf16
    assert packed_bytes * 8 == master_bytes  # 2 bits vs 16 bits per weight
