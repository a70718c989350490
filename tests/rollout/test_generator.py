"""PackedGenerator and PolicyGenerator on tiny CPU policies."""

import pytest
import torch
import transformers

from bitnet_rl.errors import UserError
from bitnet_rl.models.convert import to_bitlinear
from bitnet_rl.rollout import PackedGenerator, PolicyGenerator, RolloutOutput, make_generator
from bitnet_rl.rollout.sampling import filter_logits

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]


def tiny_bitnet(seed=0, **quant):
    torch.manual_seed(seed)
    config = transformers.BitNetConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.BitNetForCausalLM(config)
    to_bitlinear(model, **quant)
    return model.eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_bias=True,
    )
    model = transformers.LlamaForCausalLM(config)
    to_bitlinear(model)
    return model.eval()


@pytest.fixture(scope="module")
def bitnet():
    return tiny_bitnet()


@pytest.fixture(scope="module")
def generator(bitnet):
    return PackedGenerator.from_model(bitnet, max_batch_size=8, max_seq_len=64)


@pytest.mark.parametrize(
    "make", [lambda: tiny_bitnet(), lambda: tiny_bitnet(granularity="per_channel"), lambda: tiny_bitnet(granularity="per_group", group_size=32), tiny_llama],
    ids=["bitnet", "per_channel", "per_group", "llama"],
)
def test_logits_match_policy_forward(make):
    model = make()
    gen = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=32)
    ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(gen.logits(ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [tiny_bitnet, tiny_llama], ids=["bitnet", "llama"])
def test_greedy_equals_policy_generate(make):
    model = make()
    gen = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=48)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = gen.generate(ids, max_new_tokens=16, temperature=0, stop_token_ids=())
    assert isinstance(out, RolloutOutput)
    assert torch.equal(out.completion_ids, hf[:, 7:])
    assert out.finish_reasons == ["length", "length"] and out.lengths.tolist() == [16, 16]


def test_ragged_batch_equals_one_by_one(generator):
    batch = generator.generate(PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=())
    for i, prompt in enumerate(PROMPTS):
        single = generator.generate([prompt], max_new_tokens=12, temperature=0, stop_token_ids=())
        assert torch.equal(batch.completion_ids[i], single.completion_ids[0])
        torch.testing.assert_close(batch.logprobs_t1[i], single.logprobs_t1[0], rtol=1e-5, atol=1e-5)
    assert batch.prompt_lengths.tolist() == [len(p) for p in PROMPTS]
    assert batch.prompt_ids[1, :3].tolist() == PROMPTS[1] and bool((batch.prompt_ids[1, 3:] == 0).all())


def test_stop_tokens_end_rows(generator):
    free = generator.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=())
    stop = int(free.completion_ids[0, 3])
    out = generator.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=(stop,))
    for i in range(len(PROMPTS)):
        row = free.completion_ids[i].tolist()
        if stop in row:
            n = row.index(stop) + 1
            assert out.finish_reasons[i] == "stop" and int(out.lengths[i]) == n
            assert out.completion_ids[i, :n].tolist() == row[:n]
            assert bool((out.completion_ids[i, n:] == 0).all()) and bool((out.logprobs_t1[i, n:] == 0).all())
        else:
            assert out.finish_reasons[i] == "length" and int(out.lengths[i]) == 10
    assert out.finish_reasons[0] == "stop"
    assert out.completion_mask.sum().item() == out.lengths.sum().item()


def test_finished_rows_compacted_and_batch_larger_than_buffers(bitnet):
    """Many rows stopping at different steps (bucket shrinking) and more prompts than max_batch_size."""
    gen = PackedGenerator.from_model(bitnet, max_batch_size=4, max_seq_len=64)
    prompts = [[3 + (7 * i) % 50, 4 + i % 13] for i in range(7)]
    free = gen.generate(prompts, max_new_tokens=12, temperature=0, stop_token_ids=())
    stop = int(free.completion_ids[0, 1])
    out = gen.generate(prompts, max_new_tokens=12, temperature=0, stop_token_ids=(stop,))
    for i, p in enumerate(prompts):
        single = gen.generate([p], max_new_tokens=12, temperature=0, stop_token_ids=(stop,))
        n = int(single.lengths[0])
        assert int(out.lengths[i]) == n and out.finish_reasons[i] == single.finish_reasons[0]
        assert torch.equal(out.completion_ids[i, :n], single.completion_ids[0, :n])


def test_seeded_sampling_reproducible(generator):
    kw = dict(max_new_tokens=12, temperature=1.0, stop_token_ids=())
    a = generator.generate(PROMPTS, seed=123, **kw)
    b = generator.generate(PROMPTS, seed=123, **kw)
    c = generator.generate(PROMPTS, seed=124, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_sync_from_equals_fresh_and_keeps_buffers():
    model = tiny_bitnet(seed=3)
    gen = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=32)
    ptrs = [t.data_ptr() for t in gen.buffers()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen.sync_from(model)
    fresh = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=32)
    assert [t.data_ptr() for t in gen.buffers()] == ptrs
    for mine, theirs in zip(gen.buffers(), fresh.buffers()):
        assert torch.equal(mine, theirs)
    ids = [[5, 6, 7], [8, 9]]
    torch.testing.assert_close(gen.logits(ids), fresh.logits(ids), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(gen.logits([[5, 6, 7]]), model(torch.tensor([[5, 6, 7]])).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.9)])
def test_logprobs_match_policy_softmax(bitnet, generator, temperature, top_k, top_p):
    out = generator.generate(PROMPTS[:3], max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, seed=7, stop_token_ids=())
    for i in range(3):
        n_prompt, n = int(out.prompt_lengths[i]), int(out.lengths[i])
        seq = torch.cat([out.prompt_ids[i, :n_prompt], out.completion_ids[i, :n]])[None]
        with torch.no_grad():
            logits = bitnet(seq).logits[0, n_prompt - 1 : n_prompt - 1 + n].float()
        tokens = out.completion_ids[i, :n, None]
        t1 = logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
        sampled = filter_logits(logits, temperature, top_k, top_p).log_softmax(-1).gather(-1, tokens).squeeze(-1)
        torch.testing.assert_close(out.logprobs_t1[i, :n], t1, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.logprobs[i, :n], sampled, rtol=1e-4, atol=1e-4)
        assert bool(torch.isfinite(out.logprobs[i, :n]).all())


def test_greedy_logprobs(generator):
    out = generator.generate(PROMPTS, max_new_tokens=4, temperature=0, stop_token_ids=())
    assert bool((out.logprobs == 0).all()) and bool((out.logprobs_t1 < 0).all())


def test_policy_generator_matches_packed(bitnet, generator):
    policy_gen = make_generator(bitnet, "policy")
    assert isinstance(policy_gen, PolicyGenerator)
    a = policy_gen.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=())
    b = generator.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=())
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs_t1, b.logprobs_t1, rtol=1e-4, atol=1e-4)
    s1 = policy_gen.generate(PROMPTS, max_new_tokens=10, temperature=0.8, top_k=10, seed=5)
    s2 = policy_gen.generate(PROMPTS, max_new_tokens=10, temperature=0.8, top_k=10, seed=5)
    assert torch.equal(s1.completion_ids, s2.completion_ids)
    assert s1.completion_ids.shape == s1.logprobs.shape == s1.logprobs_t1.shape
    assert bool((s1.logprobs <= 0).all()) and len(s1.finish_reasons) == len(PROMPTS)


def test_make_generator_and_errors(bitnet):
    assert isinstance(make_generator(bitnet, "packed", max_batch_size=2, max_seq_len=16), PackedGenerator)
    with pytest.raises(UserError, match="rollout.backend"):
        make_generator(bitnet, "vllm-ish")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="rollout.backend: policy"):
        PackedGenerator.from_model(gpt2)
    dense = transformers.BitNetForCausalLM(bitnet.config)
    with pytest.raises(UserError, match="not BitLinear"):
        PackedGenerator.from_model(dense)
    gen = PackedGenerator.from_model(bitnet, max_batch_size=2, max_seq_len=16)
    with pytest.raises(UserError, match="max_seq_len"):
        gen.generate([[5] * 10], max_new_tokens=10)


def test_token_logprobs_match_policy(bitnet):
    """The packed prefill + chunked head equals log-softmax of the policy's logits (ragged, right-padded)."""
    gen = PackedGenerator.from_model(bitnet, max_batch_size=2, max_seq_len=32, prefill_tokens=24)
    ids = torch.randint(3, 64, (5, 12), generator=torch.Generator().manual_seed(2))
    got = gen.token_logprobs(ids, chunk_rows=7)
    with torch.no_grad():
        logits = bitnet(ids).logits[:, :-1]
    expected = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert got.shape == (5, 11)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
