import json

import pytest
import torch

from bitnet_rl.errors import UserError
from bitnet_rl.models.io import load_policy, load_tokenizer, save_checkpoint
from bitnet_rl.models.tiny import tiny_llama
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, set_lambda
from bitnet_rl.quant.pack import pack_hf, unpack_hf
from bitnet_rl.recipe import QuantConfig

pytestmark = pytest.mark.usefixtures("no_compile")
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _ids(n=2, t=9, vocab=100):
    torch.manual_seed(1)
    return torch.randint(5, vocab, (n, t))


def test_load_bf16_master_layout_swaps_projections(tiny_dir):
    model = load_policy(tiny_dir)
    names = {name.rsplit(".", 1)[-1] for name, _ in bitlinear_modules(model)}
    assert names == PROJ
    assert type(model.lm_head) is torch.nn.Linear and not isinstance(model.lm_head, BitLinear)
    assert len(bitlinear_modules(model)) == 7 * model.config.num_hidden_layers


def test_lambda_zero_policy_is_the_dense_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    policy = load_policy(tiny_dir, lam=0.0)
    ids = _ids()
    assert torch.equal(policy(ids).logits, dense(ids).logits)


def test_save_then_plain_transformers_load_gives_same_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    policy = load_policy(tiny_dir, lam=1.0).eval()
    out = save_checkpoint(policy, load_tokenizer(tiny_dir), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["quantization_mode"] == "online"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert any(isinstance(m, AutoBitLinear) for m in plain.modules())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)
    # and our loader reads the checkpoint back to the same function
    again = load_policy(out).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, policy(ids).logits)


def test_save_in_bf16_matches_within_bf16_tolerance(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = load_policy(tiny_dir, dtype=torch.bfloat16).eval()
    out = save_checkpoint(policy, None, tmp_path / "bf16")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits.float(), policy(ids).logits.float(), rtol=2e-2, atol=2e-2)


def test_save_is_atomic_and_replaces(tiny_dir, tmp_path):
    policy = load_policy(tiny_dir)
    target = tmp_path / "ckpt"
    save_checkpoint(policy, None, target)

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(policy, None, target, extra={"trainer_state": boom})
    assert (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dir left behind


def _write_offline_packed(policy, out, linear_class):
    """Write transformers' offline bitnet layout from our per-tensor codes (as `pack_weights` would)."""
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in policy.state_dict().items()}
    for name, module in bitlinear_modules(policy):
        codes, scale = module.ternary_codes()
        state[f"{name}.weight"] = pack_hf(codes)
        # offline BitLinear divides by weight_scale (= 1/mean|W|); AutoBitLinear multiplies (= mean|W|)
        state[f"{name}.weight_scale"] = (scale if linear_class == "bitlinear" else 1 / scale).reshape(1).float()
    policy.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"}
    (out / "config.json").write_text(json.dumps(config))
    save_file(state, str(out / "model.safetensors"))


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_load_offline_packed_gives_same_codes_and_logits(tiny_dir, tmp_path, linear_class):
    from transformers.integrations.bitnet import pack_weights

    policy = load_policy(tiny_dir).eval()
    codes = bitlinear_modules(policy)[0][1].ternary_codes()[0]
    assert torch.equal(pack_hf(codes), pack_weights(codes.clone()))  # our packing is transformers' layout
    assert torch.equal(unpack_hf(pack_hf(codes), codes.shape[0]), codes)
    out = tmp_path / linear_class
    out.mkdir()
    _write_offline_packed(policy, out, linear_class)
    loaded = load_policy(out).eval()
    for (name, a), (_, b) in zip(bitlinear_modules(policy), bitlinear_modules(loaded)):
        ca, sa = a.ternary_codes()
        cb, sb = b.ternary_codes()
        assert torch.equal(ca, cb), name
        torch.testing.assert_close(sa, sb)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-4)


def test_offline_packed_matches_transformers_bitlinear_forward(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = load_policy(tiny_dir).eval()
    out = tmp_path / "packed"
    out.mkdir()
    _write_offline_packed(policy, out, "bitlinear")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-4)


def test_convert_tiny_llama(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    tiny_llama(tmp_path / "llama", tokenizer=tokenizer)
    policy = load_policy(tmp_path / "llama", quant=QuantConfig(granularity="per_channel"), lam=0.0)
    assert {n.rsplit(".", 1)[-1] for n, _ in bitlinear_modules(policy)} == PROJ
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    ids = _ids()
    assert torch.equal(policy(ids).logits, dense(ids).logits)
    set_lambda(policy, 1.0)
    with pytest.warns(UserWarning, match="per_channel"):
        out = save_checkpoint(policy, tokenizer, tmp_path / "llama-158")
    again = load_policy(out)  # granularity comes back from config.json
    assert bitlinear_modules(again)[0][1].granularity == "per_channel"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, policy(ids).logits)


def test_per_tensor_llama_checkpoint_loads_in_plain_transformers(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    tiny_llama(tmp_path / "llama", tokenizer=tokenizer)
    policy = load_policy(tmp_path / "llama").eval()
    out = save_checkpoint(policy, tokenizer, tmp_path / "llama-158")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_policy(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(UserError, match="not a causal language model"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="cannot load weights"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="invalid JSON"):
        load_policy(tmp_path)
