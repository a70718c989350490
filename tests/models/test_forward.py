import pytest
import torch
import torch.nn.functional as F

from bitnet_rl.models.forward import causal_lm_logprobs, chunked_head_logprobs, token_logprobs
from bitnet_rl.rl.losses import entropy_from_logits, logprobs_from_logits


@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_matches_full_logits_and_gradients(chunk_rows, with_bias):
    g = torch.Generator().manual_seed(chunk_rows)
    hidden = torch.randn(3, 13, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    bias = torch.randn(50, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, 50, (3, 13), generator=g)
    up_lp, up_ent = torch.randn(3, 13, generator=g, dtype=torch.float64), torch.randn(3, 13, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
        lp, ent = fn(*leaves)
        ((lp.double() * up_lp).sum() + (ent.double() * up_ent).sum()).backward()
        return lp.detach(), ent.detach(), [t.grad for t in leaves]

    def plain(h, w, b=None):
        logits = F.linear(h, w, b)
        return logprobs_from_logits(logits, labels), entropy_from_logits(logits)

    def chunked(h, w, b=None):
        return chunked_head_logprobs(h, w, labels, b, chunk_rows=chunk_rows, with_entropy=True, compute_dtype=torch.float64)

    lp_a, ent_a, grads_a = grads(plain)
    lp_b, ent_b, grads_b = grads(chunked)
    # both take the softmax in float32: agreement to float32 rounding of logits of size ~10
    torch.testing.assert_close(lp_b, lp_a.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent_b, ent_a.float(), rtol=1e-5, atol=2e-5)
    for a, b in zip(grads_a, grads_b):  # float32 softmax in both: relative error of the whole gradient
        assert float((b - a).norm() / a.norm()) < 1e-5


def test_causal_lm_logprobs_equals_token_logprobs(tiny_dir):
    from bitnet_rl.models.io import load_policy

    policy = load_policy(tiny_dir).eval()
    ids = torch.randint(5, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected = token_logprobs(policy, ids, mask)
        got, entropy = causal_lm_logprobs(policy, ids, mask, with_entropy=True, chunk_rows=5)
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits), rtol=1e-5, atol=1e-5)


def test_compile_decoder_layers_finds_layers_through_wrappers_and_keeps_outputs(tiny_dir):
    """`train.compile`'s one place: every decoder layer compiled (causal LM, scalar head, peft), same outputs."""
    import peft

    from bitnet_rl.errors import UserError
    from bitnet_rl.models.forward import compile_decoder_layers, decoder_layers
    from bitnet_rl.models.io import load_policy
    from bitnet_rl.models.value import load_scalar_model

    policy = load_policy(tiny_dir).eval()
    critic = load_scalar_model(tiny_dir, head="normal")
    wrapped = peft.get_peft_model(load_policy(tiny_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model, layers in ((policy, policy.model.layers), (critic, critic.model.layers), (wrapped, wrapped.get_base_model().model.layers)):
        assert decoder_layers(model) is layers
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        before = policy(ids).logits
        compile_decoder_layers(policy, backend="eager")  # dynamo traces; the eager backend needs no compiler here
        after = policy(ids).logits
    assert all(layer._compiled_call_impl is not None for layer in policy.model.layers)
    torch.testing.assert_close(after, before)
    from bitnet_rl.models.forward import COMPILED_HEAD

    assert getattr(policy.get_output_embeddings(), COMPILED_HEAD)  # the chunked head's softmax math compiles too (on CUDA)
    with pytest.raises(UserError, match="no decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_chunk_math_matches_eager_on_cuda():
    """The `torch.compile`d softmax math of the chunked head (train.compile) against the eager one, bf16 logits:
    log-probs and entropies to 1e-4 (float32 sums in another order), gradients to 1% of their largest entry
    (the float32 ∂z rounds to bf16 before the matmuls, so single entries may differ by one bf16 step)."""
    from bitnet_rl.models.forward import chunked_head_logprobs

    torch.manual_seed(0)
    h = torch.randn(1500, 256, device="cuda", requires_grad=True)
    w = (torch.randn(32000, 256, device="cuda") * 0.1).requires_grad_()
    labels = torch.randint(0, 32000, (1500,), device="cuda")
    results = []
    for compiled in (False, True):
        lp, ent = chunked_head_logprobs(h, w, labels, chunk_rows=512, with_entropy=True, compute_dtype=torch.bfloat16, compiled=compiled)
        gh, gw = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), (h, w))
        results.append((lp, ent, gh, gw))
    (lp0, ent0, gh0, gw0), (lp1, ent1, gh1, gw1) = results
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-4)
    for fast, ref in ((gh1, gh0), (gw1, gw0)):
        assert (fast - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_training_and_scoring_forwards_build_no_kv_cache(tiny_dir, monkeypatch):
    """transformers builds a `DynamicCache` on every forward unless told not to: in training that is a copy of every
    layer's keys and values, and under `train.compile` a recompile per layer (the cache's per-layer state is guarded
    on, so past 8 layers dynamo gave up and ran them eagerly). Our forwards pass `use_cache=False`."""
    import transformers.cache_utils

    from bitnet_rl.models.forward import causal_lm_logprobs, token_logprobs
    from bitnet_rl.models.io import load_policy
    from bitnet_rl.models.value import load_scalar_model, sequence_scores, token_values

    policy = load_policy(tiny_dir).train()
    critic = load_scalar_model(tiny_dir, head="normal")
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    assert type(policy.base_model(input_ids=ids, attention_mask=mask).past_key_values).__name__ == "DynamicCache"  # the default

    def refuse(self, *args, **kwargs):
        raise AssertionError("a KV cache was built")

    monkeypatch.setattr(transformers.cache_utils.DynamicCache, "__init__", refuse)
    logps, _ = causal_lm_logprobs(policy, ids, mask, with_entropy=True)
    logps.sum().backward()
    token_logprobs(policy, ids, mask)
    token_values(critic, ids, mask).sum().backward()
    sequence_scores(critic, ids, mask)


def test_compiled_layers_share_one_graph(monkeypatch):
    """Regional compilation compiles one graph for all decoder layers of a training forward (no recompile per layer;
    with transformers' KV cache it recompiled per layer and ran layers eagerly past dynamo's recompile limit)."""
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.forward import causal_lm_logprobs, compile_decoder_layers

    torch._dynamo.reset()
    config = BitNetConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                          vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    policy = to_bitlinear(BitNetForCausalLM(config)).train()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_decoder_layers(policy, backend=counting_backend)
    ids = torch.randint(3, 50, (2, 7))
    logps, _ = causal_lm_logprobs(policy, ids, torch.ones_like(ids))
    logps.sum().backward()
    assert 1 <= len(graphs) <= 2, len(graphs)  # 6 layers, one graph (a second at most for a specialization)
    torch._dynamo.reset()
