"""pre_quant LoRA on BitLinear: merge is exact, only A and B learn, adapters-off is the base model."""

import copy

import pytest
import torch

from bitnet_rl.lora.apply import DisabledAdapterView, adapters_disabled, apply_lora, merge_lora
from bitnet_rl.models.build import build_policy
from bitnet_rl.models.forward import token_logprobs
from bitnet_rl.quant.bitlinear import quantize_weight
from bitnet_rl.quant.health import code_snapshot, ternary_health
from bitnet_rl.recipe import LoraSettings, Recipe, validate

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def tiny_policy(granularity="per_tensor", lam=1.0):
    recipe = validate(Recipe, {"model": {"tiny": TINY}, "quant": {"granularity": granularity, "group_size": 16}}, "test")
    model, _ = build_policy(recipe.model, recipe.quant, lam=lam, texts=["the cat sat on the mat"] * 40)
    return model


def randomize_adapters(model, std=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_pre_quant_merge_gives_the_adapted_codes_and_logits(granularity):
    model = tiny_policy(granularity)
    apply_lora(model, LoraSettings(enabled=True, r=4))
    randomize_adapters(model)
    with torch.no_grad():
        with adapters_disabled(model):
            model(IDS)  # fills BitLinear's Q(W) cache with the base weights: merge must not serve it
        adapted = model(IDS).logits
        codes = code_snapshot(model)
        # the adapted layer computes with Q(W + s·B·A): check one projection by hand
        layer = model.model.layers[0].self_attn.q_proj
        s = layer.scaling["default"]
        w_a = layer.base_layer.weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        x = torch.randn(3, 32)
        from bitnet_rl.quant.bitlinear import quantize_activation

        manual = quantize_activation(x) @ quantize_weight(w_a, granularity, 16).T
        torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    with torch.no_grad():
        merged = model(IDS).logits
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert torch.equal(merged, adapted)
    after = code_snapshot(model)
    assert after.keys() == codes.keys()
    assert all(torch.equal(after[k], codes[k]) for k in codes)
    # the adapter really moved the ternary model (so the equalities above are not trivial)
    base = tiny_policy(granularity)
    assert sum(int((code_snapshot(base)[k] != codes[k]).sum()) for k in codes) > 0


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_weights_under_autocast_merge_to_the_same_codes(adapter_dtype):
    model = tiny_policy().to(torch.bfloat16)
    apply_lora(model, LoraSettings(enabled=True, r=4))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype)
    randomize_adapters(model, std=0.2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(IDS).logits
        codes = code_snapshot(model)
    merge_lora(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        merged = model(IDS).logits
    after = code_snapshot(model)
    assert all(torch.equal(after[k], codes[k]) for k in codes)
    assert torch.equal(merged, adapted)


def test_gradients_reach_only_a_and_b():
    model = tiny_policy(lam=1.0)
    apply_lora(model, LoraSettings(enabled=True, r=4))
    randomize_adapters(model, std=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    token_logprobs(model, IDS, torch.ones_like(IDS)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in trainable)


def test_disabled_adapters_give_the_base_models_logprobs():
    model = tiny_policy(lam=0.5)
    base = copy.deepcopy(model)
    apply_lora(model, LoraSettings(enabled=True, r=4))
    randomize_adapters(model)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        expected = token_logprobs(base, IDS, mask)
        reference = token_logprobs(DisabledAdapterView(model), IDS, mask)
        adapted = token_logprobs(model, IDS, mask)
    assert torch.equal(reference, expected)
    assert (adapted - expected).abs().max() > 1e-3
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # trainability restored


def test_health_reports_codes_of_the_adapted_weights():
    model = tiny_policy()
    apply_lora(model, LoraSettings(enabled=True, r=4))
    before = code_snapshot(model)
    randomize_adapters(model)
    report = ternary_health(model, previous=before)
    assert report.flip_rate > 0  # the adapter moved Q(W + s·B·A) although W is frozen
    layer = model.model.layers[0].mlp.down_proj
    codes = report.codes["model.layers.0.mlp.down_proj"]
    w_a = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = (w_a / w_a.abs().mean()).round().clamp(-1, 1)
    assert torch.equal(codes.float(), expected)


def test_post_quant_warns_and_pre_quant_rejects_dropout():
    from bitnet_rl.errors import UserError

    with pytest.warns(UserWarning, match="no longer ternary"):
        apply_lora(tiny_policy(), LoraSettings(enabled=True, mode="post_quant", r=4))
    with pytest.raises(UserError, match="dropout"):
        apply_lora(tiny_policy(), LoraSettings(enabled=True, r=4, dropout=0.1))
    with pytest.raises(UserError, match="no module named"):
        apply_lora(tiny_policy(), LoraSettings(enabled=True, target_modules=["qkv"]))


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"]])
def test_packed_generator_samples_the_adapted_ternary_model(targets):
    from bitnet_rl.lora.rl import lora_generator
    from bitnet_rl.rollout import make_generator

    model = tiny_policy().eval()
    apply_lora(model, LoraSettings(enabled=True, r=4, **({"target_modules": targets} if targets else {})))
    generator = lora_generator(lambda: make_generator(model, "packed", max_batch_size=2, max_seq_len=32), model)
    generator.sync_from(model)  # the first sync copies everything, later ones only the adapted groups
    randomize_adapters(model)  # after the generator exists: only a sync can bring these in
    generator.sync_from(model)
    assert any(isinstance(m, type(model.model.layers[0].self_attn.q_proj)) for m in model.modules())  # wrappers restored
    prompts = IDS[:, :5].tolist()
    got = generator.generate(prompts, max_new_tokens=8, temperature=0.0)
    merged = merge_lora(copy.deepcopy(model))
    want = make_generator(merged, "packed", max_batch_size=2, max_seq_len=32).generate(prompts, max_new_tokens=8, temperature=0.0)
    stale = make_generator(tiny_policy().eval(), "packed", max_batch_size=2, max_seq_len=32).generate(prompts, max_new_tokens=8, temperature=0.0)
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.logprobs_t1, want.logprobs_t1, rtol=0, atol=0)
    assert not torch.equal(got.logprobs_t1, stale.logprobs_t1)
