"""`export --format gguf`: TQ2_0/TQ1_0 tensors hold our ternary weights; llama.cpp runs the file.

The llama.cpp tests need `llama-cpp-python` (it builds llama.cpp from source) and skip without it.
llama.cpp's bitnet graph applies SiLU and ties the output layer to the embeddings, so the
model exported here has `hidden_act="silu"` and tied embeddings (see bitnet_rl/export/gguf.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("gguf")

from bitnet_rl import UserError, export_checkpoint, load_policy  # noqa: E402
from bitnet_rl.quant.bitlinear import bitlinear_modules  # noqa: E402

PROMPTS = ["sort: 3 1 2 =", "sort: 9 0 4 7 =", "sort: 5 5 1 8 2 ="]


def llama_cpp_shape(tokenizer, **overrides):
    from transformers import BitNetConfig

    values = dict(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256, tie_word_embeddings=True, hidden_act="silu",
    )  # fmt: skip
    values.update(overrides)
    return BitNetConfig(**values)


def sft(root, init_dir, name):
    """40 SFT steps on the demo task: peaked logits, so greedy decoding has no near-ties."""
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.sft import run_sft

    recipe = {
        "out": str(root / name),
        "model": {"path": str(init_dir)},
        "data": {"path": "demo", "demo_size": 400, "max_length": 32},
        "optimizer": {"lr": 3e-3},
        "train": {"max_steps": 40, "batch_size": 16},
        "logging": {"progress": False, "health_every": 0},
    }
    return run_sft(validate(Recipe, recipe, "test"))


@pytest.fixture(scope="module")
def gguf_ckpts(tmp_path_factory, tokenizer):
    """Trained checkpoints: a tied SiLU BitNet and a Llama converted to BitLinear (hidden 256)."""
    from transformers import BitNetForCausalLM

    from bitnet_rl.models.tiny import tiny_llama
    from bitnet_rl.recipe import TinyModelConfig

    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    BitNetForCausalLM(llama_cpp_shape(tokenizer)).save_pretrained(root / "bitnet-init")
    tokenizer.save_pretrained(root / "bitnet-init")
    shape = TinyModelConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    tiny_llama(root / "llama-init", shape=shape, tokenizer=tokenizer)
    return {"bitnet": sft(root, root / "bitnet-init", "bitnet"), "llama": sft(root, root / "llama-init", "llama")}


@pytest.fixture(scope="module", params=[("bitnet", "TQ2_0"), ("bitnet", "TQ1_0"), ("llama", "TQ2_0")], ids=lambda p: "-".join(p))
def exported(request, gguf_ckpts, tmp_path_factory):
    """(GGUF file, checkpoint it came from, model type)."""
    model_type, qtype = request.param
    out = tmp_path_factory.mktemp("gguf_out") / f"{model_type}-{qtype}"
    (path,) = export_checkpoint(gguf_ckpts[model_type], "gguf", out, ternary_type=qtype).path.glob("*.gguf")
    return path, gguf_ckpts[model_type], model_type


def test_ternary_tensors_hold_our_weights(exported):
    """Dequantizing each TQ tensor with the gguf package gives back codes / s (scale in fp16)."""
    import gguf

    from bitnet_rl.export.gguf import rope_permute

    gguf_file, ckpt, model_type = exported
    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    policy = load_policy(ckpt)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    heads = {"q_proj": policy.config.num_attention_heads, "k_proj": policy.config.num_key_value_heads}
    for name, module in bitlinear_modules(policy):
        parts = name.split(".")  # model.layers.<i>.<block>.<proj>
        layer, proj = parts[2], parts[-1]
        tensor = tensors[f"blk.{layer}.{names[proj]}.weight"]
        assert tensor.tensor_type.name == gguf_file.stem.split("-")[1].upper()
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(module.out_features, module.in_features).copy())
        codes, inv_scale = module.ternary_codes()
        expected = codes.float() / inv_scale
        if model_type == "llama" and proj in heads:
            expected = torch.from_numpy(rope_permute(expected.numpy(), heads[proj]))
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=0)  # fp16 block scale
    assert ("output.weight" in tensors) == (model_type == "llama")  # bitnet: tied, llama.cpp reuses token_embd
    activation = reader.fields[f"{reader.fields['general.architecture'].contents()}.hidden_activation"].contents()
    assert activation == "silu"


def test_rope_permute_turns_half_rotation_into_adjacent_pairs():
    """RoPE on halves (transformers) of W·x equals RoPE on adjacent pairs (llama.cpp) of W_perm·x."""
    from transformers.models.llama.modeling_llama import rotate_half

    from bitnet_rl.export.gguf import rope_permute

    heads, head_dim, hidden, position = 3, 8, 16, 5.0
    weight, x = torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim) * position  # (head_dim / 2,)
    cos, sin = torch.cat([freqs, freqs]).cos(), torch.cat([freqs, freqs]).sin()
    q = (weight @ x).view(heads, head_dim)
    halves = q * cos + rotate_half(q) * sin
    p = (torch.from_numpy(rope_permute(weight.numpy(), heads)) @ x).view(heads, head_dim // 2, 2)
    c, s_ = freqs.cos(), freqs.sin()
    adjacent = torch.stack([p[..., 0] * c - p[..., 1] * s_, p[..., 0] * s_ + p[..., 1] * c], dim=-1)
    torch.testing.assert_close(torch.from_numpy(rope_permute(halves.reshape(-1, 1).numpy(), heads)).view(heads, head_dim // 2, 2), adjacent)


def test_refusals(tmp_path, tokenizer):
    from transformers import BitNetForCausalLM

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint

    cases = {
        "untied": (llama_cpp_shape(tokenizer, tie_word_embeddings=False), {}, "own lm_head"),
        "bias": (llama_cpp_shape(tokenizer, attention_bias=True), {}, "biases"),
        "narrow": (llama_cpp_shape(tokenizer, hidden_size=64, intermediate_size=128), {}, "not a multiple of 256"),
        "group128": (llama_cpp_shape(tokenizer), {"granularity": "per_group", "group_size": 128}, "groups of 128"),
        "no_act": (llama_cpp_shape(tokenizer), {"quantize_activations": False}, "without activation quantization"),
    }
    for name, (config, quant, message) in cases.items():
        model = to_bitlinear(BitNetForCausalLM(config), **quant)
        with pytest.warns(UserWarning) if quant else contextlib.nullcontext():
            save_checkpoint(model, tokenizer, tmp_path / name)
        with pytest.raises(UserError, match=message):
            export_checkpoint(tmp_path / name, "gguf", tmp_path / f"{name}-out")
        assert not (tmp_path / f"{name}-out").exists()


def test_non_silu_activation_is_exported_with_a_warning(tmp_path, tokenizer):
    """llama.cpp's graph applies SiLU: a relu² model (BitNet 2B4T's activation) exports, says so, and records its activation."""
    import gguf
    from transformers import BitNetForCausalLM

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint

    save_checkpoint(to_bitlinear(BitNetForCausalLM(llama_cpp_shape(tokenizer, hidden_act="relu2"))), tokenizer, tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="uses relu2; llama.cpp's bitnet graph"):
        (path,) = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "out").path.glob("*.gguf")
    assert gguf.GGUFReader(str(path)).fields["bitnet.hidden_activation"].contents() == "relu2"


def test_per_channel_scales_are_kept(tmp_path, tokenizer):
    import gguf
    from transformers import BitNetForCausalLM

    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint

    model = to_bitlinear(BitNetForCausalLM(llama_cpp_shape(tokenizer)), granularity="per_channel")
    with pytest.warns(UserWarning):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    (path,) = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "out").path.glob("*.gguf")
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight")
    got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    module = load_policy(tmp_path / "ckpt").model.layers[0].mlp.up_proj
    codes, inv_scale = module.ternary_codes()
    assert inv_scale.shape == (512, 1)
    torch.testing.assert_close(got, codes.float() / inv_scale, rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------- llama.cpp
def greedy_ours(policy, prompt_ids, steps):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = policy.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
        logits = policy(out[:, :-1]).logits[0, len(prompt_ids) - 1 :]
    return out[0, len(prompt_ids) :].tolist(), logits


def test_llama_cpp_runs_the_export(exported, tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    gguf_file, ckpt, model_type = exported
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False)
    policy = load_policy(ckpt).eval()
    steps, agree, total, gaps = 8, 0, 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids  # same tokenizer
        ours, our_logits = greedy_ours(policy, ids, steps)
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(steps):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(token)
            llm.eval([token])
        their_logits = torch.from_numpy(np.array(llm.scores[len(ids) - 1 : len(ids) - 1 + steps]))
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), steps)
        agree += prefix
        total += steps
        n = min(prefix + 1, steps)  # logits are comparable up to the first divergence
        gaps.append((their_logits[:n] - our_logits[:n]).abs().max().item())
        print(f"{model_type} {gguf_file.stem} {prompt!r}: ours {tokenizer.decode(ours)!r} llama.cpp {tokenizer.decode(theirs)!r} "
              f"agree {prefix}/{steps} max|Δlogit| {gaps[-1]:.3f} (logit range {our_logits.abs().max():.1f})")  # fmt: skip
    llm.close()
    assert agree / total >= 0.9
    assert max(gaps) < 0.2  # measured: <= 0.052 over a logit range of ~8
