"""Frozen models on the packed prefill path (`rollout.prefill`, `models.frozen.packed_prefill`).

CPU tests run the torch reference ops of the packed forward (`force=True`) against the frozen
copy's own Hugging Face forward; the GPU test compares the Triton path with that reference.
"""

import pytest
import torch
import transformers

from bitnet_rl.models.convert import to_bitlinear
from bitnet_rl.models.forward import token_logprobs
from bitnet_rl.models.frozen import frozen_ternary_copy, packed_prefill, set_kernels
from bitnet_rl.models.value import BitNetForSequenceClassification, sequence_scores, token_values
from bitnet_rl.quant.kernels import triton_available
from bitnet_rl.rollout.prefill import PackedPrefill
from bitnet_rl.rollout.weights import PackedModel


def _config(cls, **extra):
    return cls(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def causal(kind="bitnet", seed=0, **quant):
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(_config(transformers.LlamaConfig, attention_bias=True))
    else:
        model = transformers.BitNetForCausalLM(_config(transformers.BitNetConfig))
    return to_bitlinear(model, **quant).eval()


def reward_model(seed=0):
    torch.manual_seed(seed)
    model = BitNetForSequenceClassification(_config(transformers.BitNetConfig, num_labels=1))
    torch.nn.init.normal_(model.score.weight, std=0.2)
    return to_bitlinear(model).eval()


def ragged(batch=5, length=13, seed=1):
    """Right-padded ids (padding = arbitrary tokens, as the forward never reads them) and lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids, mask, lengths


@pytest.mark.parametrize(
    "make", [lambda: causal(), lambda: causal(granularity="per_channel"), lambda: causal(granularity="per_group", group_size=32), lambda: causal("llama")],
    ids=["bitnet", "per_channel", "per_group", "llama"],
)
def test_reference_logprobs_match_frozen_forward(make):
    frozen = frozen_ternary_copy(make())
    fast = packed_prefill(frozen, force=True)
    assert isinstance(fast, PackedPrefill)
    ids, mask, lengths = ragged()
    with torch.no_grad():
        expected = token_logprobs(frozen, ids, mask)
    fast.prefill_tokens = 20  # several prefill passes (chunks of rows)
    got = fast.token_logprobs(ids, chunk_rows=7)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


def test_reward_scores_match_frozen_forward():
    frozen = frozen_ternary_copy(reward_model())
    fast = packed_prefill(frozen, force=True)
    ids, mask, lengths = ragged(seed=3)
    with torch.no_grad():
        expected = sequence_scores(frozen, ids, mask)
        values = token_values(frozen, ids, mask)
    torch.testing.assert_close(fast.sequence_scores(ids, lengths), expected, rtol=1e-4, atol=1e-4)
    got_values = fast.token_values(ids)
    torch.testing.assert_close(got_values[mask.bool()], values[mask.bool()], rtol=1e-4, atol=1e-4)
    assert expected.std() > 1e-3  # the rows differ, so a wrong last-token index would show


def test_packing_a_frozen_copy_copies_its_codes_bit_for_bit():
    """Packing the frozen copy (codes copied) gives the same buffers as packing the BitLinear policy."""
    from bitnet_rl.rollout.arch import inspect_policy

    for quant in ({}, dict(granularity="per_channel"), dict(granularity="per_group", group_size=32)):
        policy = causal(seed=4, **quant)
        frozen = frozen_ternary_copy(policy)
        built = []
        for model in (policy, frozen):
            packed = PackedModel(inspect_policy(model), model, device=torch.device("cpu"), dtype=torch.float32, max_seq_len=16)
            packed.sync_from(model)
            built.append(packed.buffers())
        assert len(built[0]) == len(built[1])
        for a, b in zip(*built):
            assert torch.equal(a, b)


def test_hook_switches():
    frozen = frozen_ternary_copy(causal())
    assert packed_prefill(frozen) is None  # CPU: the frozen copy's own forward runs
    assert packed_prefill(frozen, force=True) is packed_prefill(frozen, force=True)  # built once
    set_kernels(frozen, False)
    assert packed_prefill(frozen, force=True) is None
    assert packed_prefill(causal(), force=True) is None  # a trained BitLinear model never takes it
    float_acts = frozen_ternary_copy(to_bitlinear(transformers.BitNetForCausalLM(_config(transformers.BitNetConfig)), quantize_activations=False))
    assert packed_prefill(float_acts, force=True) is None  # unsupported (no int8 activations): own forward


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_packed_prefill_kernels_match_reference_on_gpu():
    """Triton prefill path vs the frozen copy's torch reference forward, on CUDA.

    float32 activations: relative error of the log-probs ≤ 2e-3, of the scores ≤ 2e-2; bf16
    activations against the float32 reference ≤ 2e-2 and 5e-2 (the frozen kernel test's whole-model
    tolerances; a last-bit difference can move a later int8 activation across a rounding boundary).
    """
    torch.manual_seed(0)
    config = dict(vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    lm = frozen_ternary_copy(to_bitlinear(transformers.BitNetForCausalLM(transformers.BitNetConfig(**config))).cuda().eval())
    rm_model = BitNetForSequenceClassification(transformers.BitNetConfig(num_labels=1, **config))
    torch.nn.init.normal_(rm_model.score.weight, std=0.2)
    rm = frozen_ternary_copy(to_bitlinear(rm_model).cuda().eval())
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(3, 320, (6, 80), device="cuda", generator=g)
    lengths = torch.tensor([80, 77, 50, 64, 9, 33], device="cuda")
    mask = (torch.arange(80, device="cuda")[None] < lengths[:, None]).long()
    with torch.no_grad():
        set_kernels(lm, False)
        set_kernels(rm, False)
        ref_lp = token_logprobs(lm, ids, mask)[mask[:, 1:].bool()]
        ref_scores = sequence_scores(rm, ids, mask)
        set_kernels(lm, True)
        set_kernels(rm, True)
    assert packed_prefill(lm) is not None and packed_prefill(rm) is not None  # on by default on CUDA
    for dtype, tol_lp, tol_score in ((torch.float32, 2e-3, 2e-2), (torch.bfloat16, 2e-2, 5e-2)):
        fast_lm, fast_rm = PackedPrefill.from_model(lm, dtype=dtype), PackedPrefill.from_model(rm, dtype=dtype)
        lp = fast_lm.token_logprobs(ids)[mask[:, 1:].bool()]
        scores = fast_rm.sequence_scores(ids, lengths)
        rel_lp = float((lp - ref_lp).norm() / ref_lp.norm())
        rel_score = float((scores - ref_scores).norm() / ref_scores.norm())
        assert rel_lp <= tol_lp and rel_score <= tol_score, (dtype, rel_lp, rel_score)
        assert fast_lm.tuner.kernels.configs  # tiles tuned on first use


def test_sequences_past_the_position_tables_are_refused_and_hooks_fall_back(monkeypatch):
    """Longer than `max_position_embeddings`: `PackedPrefill` refuses in one line; the PPO hook runs the model's own forward."""
    from bitnet_rl.errors import UserError
    from bitnet_rl.train import experience

    frozen = frozen_ternary_copy(causal())
    fast = packed_prefill(frozen, force=True)
    too_long = torch.randint(3, 96, (1, fast.max_positions + 6))
    with pytest.raises(UserError, match="positions"):
        fast.token_logprobs(too_long)
    calls = []
    spy = lambda ids: calls.append(ids.shape[1]) or fast.token_logprobs(ids)  # noqa: E731
    monkeypatch.setattr(experience, "packed_prefill", lambda model: type("Spy", (), {"max_positions": fast.max_positions, "token_logprobs": staticmethod(spy)})())
    for length in (40, fast.max_positions + 6):  # the packed path, then the fallback
        ids = too_long[:, :length]
        zeros = torch.zeros(1, 10)
        exp = experience.Experience(
            ids, torch.ones_like(ids), torch.tensor([length - 10]), torch.ones(1, 10), zeros, zeros, zeros, zeros,
            scores=torch.zeros(1), advantages=zeros, returns=zeros, is_weights=torch.ones(1, 10), loss_mask=torch.ones(1, 10),
        )
        with torch.no_grad():
            hooked = experience.policy_forward(frozen, exp)[0]
            expected = experience.completion_columns(token_logprobs(frozen, ids, torch.ones_like(ids)), exp.prompt_lens, 10)
        # float32 on both paths; a last-bit difference can flip one int8 activation (seen: 1.1e-3 on one token)
        torch.testing.assert_close(hooked, expected, rtol=1e-4, atol=5e-3, msg=f"length {length}")
    assert calls == [40]
