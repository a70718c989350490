"""`export --format packed`: plain transformers, `load_policy` and `PackedGenerator` all read it back."""

from __future__ import annotations

import json

import pytest
import torch

from bitnet_rl import UserError, export_checkpoint, load_policy
from bitnet_rl.quant.bitlinear import bitlinear_modules

PROMPTS = ["sort: 3 1 2 =", "sort: 9 0 4 7 =", "sort: 5 5 1 8 2 ="]


@pytest.fixture(scope="module")
def packed_dir(trained_dir, tmp_path_factory):
    return export_checkpoint(trained_dir, "packed", tmp_path_factory.mktemp("exp") / "packed").path


def test_layout_is_transformers_offline(packed_dir, trained_dir):
    from safetensors import safe_open

    config = json.loads((packed_dir / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "offline"
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    with safe_open(str(packed_dir / "model.safetensors"), framework="pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    policy = load_policy(trained_dir)
    module = dict(bitlinear_modules(policy))["model.layers.0.mlp.down_proj"]
    w = module.weight.detach().float()
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0] // 4, w.shape[1])
    # transformers' own unpacker recovers round(W / mean|W|) clipped to ±1; the scale is mean|W|
    from transformers.integrations.bitnet import unpack_weights

    with torch.compiler.set_stance("force_eager"):
        codes = unpack_weights(packed, torch.float32)
    torch.testing.assert_close(codes, (w / w.abs().mean()).round().clamp(-1, 1))
    torch.testing.assert_close(scale, w.abs().mean().reshape(1))
    weights = (packed_dir / "model.safetensors").stat().st_size
    assert weights < 0.5 * sum(f.stat().st_size for f in trained_dir.glob("*.safetensors"))


def test_plain_transformers_logits_match_ours_within_bf16(packed_dir, trained_dir, tokenizer, no_compile):
    from transformers import AutoModelForCausalLM

    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True).input_ids
    mask = ids != tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_pretrained(packed_dir).eval()  # offline AutoBitLinear, bf16
    ours = load_policy(trained_dir).eval()  # master weights, float32, λ = 1
    ours_bf16 = load_policy(trained_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = ours(ids).logits[mask]
        got = plain(ids).logits.float()[mask]
        bf16 = ours_bf16(ids).logits.float()[mask]
    gap, bf16_gap = (got - ref).abs().max().item(), (bf16 - ref).abs().max().item()
    print(f"packed in transformers (bf16) vs ours (fp32): max |Δlogit| {gap:.4f}; ours bf16 vs fp32 {bf16_gap:.4f}; "
          f"argmax agreement {(got.argmax(-1) == ref.argmax(-1)).float().mean():.3f}")  # fmt: skip
    assert gap <= 2 * bf16_gap + 1e-3  # no worse than running our own model in bf16
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_load_policy_and_generator_read_packed(packed_dir, trained_dir, tokenizer):
    from bitnet_rl import PackedGenerator

    original = load_policy(trained_dir).eval()
    back = load_policy(packed_dir).eval()
    for (name, a), (_, b) in zip(bitlinear_modules(original), bitlinear_modules(back)):
        codes_a, scale_a = a.ternary_codes()
        codes_b, scale_b = b.ternary_codes()
        assert torch.equal(codes_a, codes_b), name
        torch.testing.assert_close(scale_a, scale_b, rtol=1e-6, atol=0)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    generator = PackedGenerator.from_model(back, max_batch_size=4, max_seq_len=32)
    out = generator.generate(prompts, max_new_tokens=6, temperature=0.0, stop_token_ids=[tokenizer.eos_token_id])
    for row, prompt in enumerate(prompts):
        expected = back.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = expected[0, len(prompt) :].tolist()
        n = int(out.lengths[row])
        assert out.completion_ids[row, :n].tolist() == expected[:n]


def test_packed_refuses_per_channel(tmp_path, tokenizer):
    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.io import save_checkpoint
    from bitnet_rl.models.tiny import tiny_bitnet

    model, _ = tiny_bitnet(tokenizer=tokenizer)
    with pytest.warns(UserWarning):
        save_checkpoint(to_bitlinear(model, granularity="per_channel"), tokenizer, tmp_path / "ckpt")
    with pytest.raises(UserError, match="one scale per tensor"):
        export_checkpoint(tmp_path / "ckpt", "packed", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_llama_converted_model_exports_packed(tmp_path, tokenizer, no_compile):
    """A dense Llama brought to 1.58 bits: transformers builds AutoBitLinear for the same layers."""
    from transformers import AutoModelForCausalLM

    from bitnet_rl.models.tiny import tiny_llama

    tiny_llama(tmp_path / "dense", tokenizer=tokenizer)
    result = export_checkpoint(tmp_path / "dense", "packed", tmp_path / "packed")
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True).input_ids
    mask = ids != tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_pretrained(result.path).eval()
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    assert type(plain.lm_head).__name__ == "Linear"
    with torch.no_grad():
        ref = load_policy(tmp_path / "dense").eval()(ids).logits[mask]
        bf16 = load_policy(tmp_path / "dense", dtype=torch.bfloat16).eval()(ids).logits.float()[mask]
        got = plain(ids).logits.float()[mask]
    assert (got - ref).abs().max() <= 2 * (bf16 - ref).abs().max() + 1e-3
