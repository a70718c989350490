"""Triton W2A8 kernels and the packed generator on CUDA (skipped without CUDA + Triton)."""

import pytest
import torch

from bitnet_rl.quant.bitlinear import ternary_codes
from bitnet_rl.quant.kernels import PackedWeight, quantize_rows_ref, triton_available, w2a8_matmul_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton"),
]

# (K, N): the BitNet b1.58 2B4T projections (fused qkv, o, fused gate|up, down) and odd shapes.
SHAPES_2B4T = [(2560, 3840), (2560, 2560), (2560, 640), (2560, 13824), (6912, 2560)]
ODD_SHAPES = [(64, 48), (200, 40), (384, 130)]
ROWS = [1, 16, 64, 300]
# kernel launches (quant/kernels/triton_gdc.py): one after another, or with programmatic dependent
# launch (the default on Hopper; the dp4a GEMV then prefetches its weight tiles)
PDL = pytest.mark.parametrize("pdl", [False, True], ids=["launch", "pdl"])


def packed(n, k, granularity="per_tensor", group=128, bias=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g)
    codes, scale = ternary_codes(w, granularity, group)
    b = torch.randn(n, device="cuda", generator=g) if bias else None
    return PackedWeight.from_codes(codes, scale, group if granularity == "per_group" else 0, b)


def int8_rows(m, k, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * 2
    return quantize_rows_ref(x)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES_2B4T + ODD_SHAPES)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_int32_exact(m, k, n, granularity):
    from bitnet_rl.quant.kernels import triton_w2a8

    pw = packed(n, k, granularity)
    q, dq, s = int8_rows(m, k)
    expected = w2a8_matmul_ref(q, dq, pw, int_only=True)
    got = triton_w2a8.w2a8_matmul(q, dq, s, pw, int_only=True)
    assert torch.equal(got, expected)


@PDL
@pytest.mark.parametrize("k,n", [(2560, 640), (6912, 2560)])
def test_every_candidate_config_exact(k, n, pdl):
    """Every tile and split-K factor `tune` may pick is exact: with unit scales the float32
    output is the integer sum itself."""
    from bitnet_rl.quant.kernels import triton_w2a8, w2a8_tiles

    pw = packed(n, k, "per_channel")
    pw.dequant.fill_(1.0)
    for m in (1, 16, 64, 300):
        q, dq, s = int8_rows(m, k, seed=m)
        expected = w2a8_matmul_ref(q, dq, pw, int_only=True).float()
        out = torch.empty((m, n), device="cuda")
        for config in w2a8_tiles.candidates(m, n, pw.packed.shape[1], False):
            triton_w2a8.launch(q, torch.ones_like(dq), s, pw, out, config, pdl=pdl)
            assert torch.equal(out, expected), config


def test_split_k_is_bit_equal_to_one_slice_and_resets_its_counters():
    """Split-K sums exact int32 partials and scales once (the last slice per tile), so with real
    scales and a bias every split factor `tune` may pick gives the same bits as the same tile
    unsplit (float32, as the generator's buffers), call after call; the tile counters are back
    at zero after. Shape: the 2B4T down projection, where the tuner picks split-K."""
    import dataclasses

    from bitnet_rl.quant.kernels import triton_w2a8, w2a8_tiles
    from bitnet_rl.quant.kernels.tuner import SplitScratch

    k, n = 6912, 2560
    pw = packed(n, k, "per_channel", bias=True)
    scratch = SplitScratch()
    tried = 0
    for m in (16, 64, 256):
        q, dq, s = int8_rows(m, k, seed=m)
        for config in w2a8_tiles.candidates(m, n, pw.packed.shape[1], False):
            if config.split_k == 1:
                continue
            one = torch.empty((m, n), device="cuda")
            triton_w2a8.launch(q, dq, s, pw, one, dataclasses.replace(config, split_k=1))
            for _ in range(2):
                out = torch.full_like(one, float("nan"))
                triton_w2a8.launch(q, dq, s, pw, out, config, scratch=scratch)
                assert torch.equal(out, one), (m, config)
            tried += 1
    assert tried >= 6
    assert scratch.buffers and all(not counters.any() for held in scratch.buffers.values() for _, counters in held)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n,group", [(2560, 640, 128), (6912, 2560, 128), (256, 96, 32), (384, 130, 64)])
def test_per_group_exact_with_unit_scales(m, k, n, group):
    """Per-group scales are applied inside the K loop: with unit scales the sum stays an exact integer."""
    from bitnet_rl.quant.kernels import triton_w2a8

    pw = packed(n, k, "per_group", group)
    pw.dequant.fill_(1.0)
    q, dq, s = int8_rows(m, k)
    ones = torch.ones_like(dq)
    expected = (q.double() @ pw.codes().double().T).float()
    assert torch.equal(triton_w2a8.w2a8_matmul(q, ones, s, pw), expected)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("granularity,group", [("per_tensor", 128), ("per_channel", 128), ("per_group", 128), ("per_group", 32)])
def test_scaled_output_matches_reference(m, granularity, group):
    from bitnet_rl.quant.kernels import triton_w2a8

    pw = packed(640, 2560, granularity, group, bias=True)
    q, dq, s = int8_rows(m, 2560)
    expected = w2a8_matmul_ref(q, dq, pw)
    for dtype in (torch.float32, torch.bfloat16):
        got = triton_w2a8.w2a8_matmul(q, dq, s, pw, out_dtype=dtype)
        torch.testing.assert_close(got.float(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_w2a8_linear_and_quantize_rows():
    from bitnet_rl.quant.kernels import quantize_rows, w2a8_linear

    pw = packed(384, 2560, "per_channel", bias=True)
    x = torch.randn(3, 5, 2560, device="cuda", dtype=torch.bfloat16)
    q, dq, s = quantize_rows(x.view(-1, 2560))
    q_ref, dq_ref, s_ref = quantize_rows_ref(x.view(-1, 2560))
    assert torch.equal(q, q_ref) and torch.equal(dq, dq_ref) and torch.equal(s, s_ref)
    y = w2a8_linear(x, pw)
    assert y.shape == (3, 5, 384) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), w2a8_matmul_ref(q_ref, dq_ref, pw).view(3, 5, 384), rtol=1e-2, atol=1e-2)


def test_norm_quant_matches_torch():
    from bitnet_rl.rollout import layers

    torch.manual_seed(0)
    d, inter = 256, 384
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(dtype=dtype, eps=1e-6)
        res = torch.randn(7, d, device="cuda", dtype=dtype)
        inp = torch.randn(7, 2 * inter, device="cuda")
        w = torch.rand(inter, device="cuda", dtype=dtype) + 0.5
        outs = []
        for use_triton in (True, False):
            q = torch.empty(7, inter, dtype=torch.int8, device="cuda")
            dq = torch.empty(7, device="cuda")
            s = torch.empty(7, dtype=torch.int32, device="cuda")
            layers.norm_quant(inp, q, dq, s, gated=True, act="relu2", norm_weight=w, triton=use_triton, **kw)
            r = res.clone()
            q2 = torch.empty(7, d, dtype=torch.int8, device="cuda")
            layers.norm_quant(inp[:, :d], q2, dq.clone(), s.clone(), residual=r, norm_weight=w[:d], triton=use_triton, **kw)
            outs.append((q, dq, r, q2))
        (qa, dqa, ra, q2a), (qb, dqb, rb, q2b) = outs
        assert (qa.int() - qb.int()).abs().max() <= 1 and (q2a.int() - q2b.int()).abs().max() <= 1
        torch.testing.assert_close(dqa, dqb, rtol=1e-5, atol=0)
        torch.testing.assert_close(ra, rb, rtol=0, atol=0)


def tiny_bitnet():
    import transformers

    from bitnet_rl.models.convert import to_bitlinear

    torch.manual_seed(0)
    config = transformers.BitNetConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.BitNetForCausalLM(config)
    to_bitlinear(model)
    return model.eval()


@PDL
def test_generator_gpu_greedy_equals_cpu_reference(pdl):
    from bitnet_rl.rollout import PackedGenerator

    model = tiny_bitnet()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]
    cpu = PackedGenerator.from_model(model, max_batch_size=8, max_seq_len=64)
    expected = cpu.generate(prompts, max_new_tokens=24, temperature=0, stop_token_ids=())
    gpu = PackedGenerator.from_model(model, max_batch_size=8, max_seq_len=64, device="cuda", dtype=torch.float32, pdl=pdl)
    got = gpu.generate(prompts, max_new_tokens=24, temperature=0, stop_token_ids=())
    assert torch.equal(got.completion_ids.cpu(), expected.completion_ids)
    torch.testing.assert_close(got.logprobs_t1.cpu(), expected.logprobs_t1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.logits(prompts).cpu(), cpu.logits(prompts), rtol=1e-4, atol=1e-4)
    # ragged batch vs one by one, through the CUDA graphs of several buckets
    for i, p in enumerate(prompts):
        single = gpu.generate([p], max_new_tokens=24, temperature=0, stop_token_ids=())
        assert torch.equal(single.completion_ids[0], got.completion_ids[i])


def test_generator_gpu_bf16_graphs_match_eager():
    from bitnet_rl.rollout import PackedGenerator

    model = tiny_bitnet().cuda().to(torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40]]
    # same (untuned) tiles in both, so the two runs do the same arithmetic
    graphs = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=64, autotune=False)
    eager = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=64, cuda_graphs=False, autotune=False)
    a = graphs.generate(prompts, max_new_tokens=20, temperature=0, stop_token_ids=())
    b = eager.generate(prompts, max_new_tokens=20, temperature=0, stop_token_ids=())
    assert torch.equal(a.completion_ids, b.completion_ids)
    s1 = graphs.generate(prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=(7,))
    s2 = graphs.generate(prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=(7,))
    assert torch.equal(s1.completion_ids, s2.completion_ids)
    ptrs = [t.data_ptr() for t in graphs.buffers()]
    graphs.sync_from(model)
    assert [t.data_ptr() for t in graphs.buffers()] == ptrs
    with torch.no_grad():
        expected = model(torch.tensor([prompts[0]], device="cuda")).logits.float()
    torch.testing.assert_close(graphs.logits([prompts[0]]), expected, rtol=0.05, atol=0.05)


def test_generator_token_logprobs_gpu_equal_cpu_reference():
    """The old-policy / frozen pass on the W2A8 prefill path against the CPU torch reference (float32: 1e-4)."""
    from bitnet_rl.rollout import PackedGenerator

    model = tiny_bitnet()
    ids = torch.randint(3, 64, (6, 20), generator=torch.Generator().manual_seed(4))
    cpu = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=64)
    gpu = PackedGenerator.from_model(model, max_batch_size=4, max_seq_len=64, device="cuda", dtype=torch.float32)
    torch.testing.assert_close(gpu.token_logprobs(ids).cpu(), cpu.token_logprobs(ids), rtol=1e-4, atol=1e-4)


@PDL
def test_generator_greedy_in_graph_equals_eager_with_stops(pdl):
    """Greedy decoding captured with its argmax and bookkeeping (`rollout/loop.py`) equals the
    eager loop, also when rows stop at different steps and the batch compacts into smaller buckets."""
    from bitnet_rl.rollout import PackedGenerator

    model = tiny_bitnet().cuda()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40], [3, 4], [7, 7, 7], [9]]
    kw = dict(max_batch_size=8, max_seq_len=64, dtype=torch.float32, autotune=False, pdl=pdl)
    graphs = PackedGenerator.from_model(model, **kw)
    eager = PackedGenerator.from_model(model, cuda_graphs=False, **kw)
    free = eager.generate(prompts, max_new_tokens=30, temperature=0, stop_token_ids=())
    stops = sorted({int(t) for t in free.completion_ids[:, 3:12].flatten()})[:3]  # tokens that end rows mid-way
    for stop in (stops, (), stops):  # the second greedy call with stops replays the graphs captured by the first
        a = graphs.generate(prompts, max_new_tokens=30, temperature=0, stop_token_ids=stop)
        b = eager.generate(prompts, max_new_tokens=30, temperature=0, stop_token_ids=stop)
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)
        assert a.finish_reasons == b.finish_reasons
        # bucket 8 runs split-K tiles whose float32 atomics add in any order: logprobs to 1e-5
        torch.testing.assert_close(a.logprobs_t1, b.logprobs_t1, rtol=1e-5, atol=1e-5)
        if stop:
            assert "stop" in a.finish_reasons and len(set(a.lengths.tolist())) > 1  # rows did end at different steps
    graphs.reset_graphs()  # captured again, into a new pool (benchmarks/decode_pdl.py switches PDL this way)
    again = graphs.generate(prompts, max_new_tokens=30, temperature=0, stop_token_ids=stops)
    assert torch.equal(again.completion_ids, b.completion_ids) and graphs.greedy_graphs
