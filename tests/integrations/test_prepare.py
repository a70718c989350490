"""`prepare`: projections become BitLinear (shared weights), settings validated, idempotent."""

from __future__ import annotations

import pytest
import torch

from bitnet_rl import BitLinear, UserError, prepare
from bitnet_rl.quant.bitlinear import bitlinear_modules, quantize_activation, quantize_weight
from bitnet_rl.recipe import TinyModelConfig

SHAPE = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture
def llama(tokenizer):
    from bitnet_rl.models.tiny import tiny_llama

    return tiny_llama(shape=SHAPE, tokenizer=tokenizer)[0]


def test_prepare_swaps_projections_and_keeps_weights(llama):
    q_weight = llama.model.layers[0].self_attn.q_proj.weight
    prepare(llama, quant={"granularity": "per_channel"}, lam=0.5)
    names = sorted(name.rsplit(".", 1)[-1] for name, _ in bitlinear_modules(llama))
    assert names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    q = llama.model.layers[0].self_attn.q_proj
    assert q.weight is q_weight and q.granularity == "per_channel" and q.lam == 0.5
    assert type(llama.lm_head) is torch.nn.Linear


def test_prepared_layer_computes_the_bitnet_function(llama):
    """At λ = 1: y = Q_int8(x) · Q_ternary(W)ᵀ, recomputed here with the quantizers spelled out."""
    prepare(llama)
    layer: BitLinear = llama.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    w = layer.weight.detach()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    wq = (w * scale).round().clamp(-1, 1) / scale
    xs = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (x * xs).round().clamp(-128, 127) / xs
    torch.testing.assert_close(layer(x), xq @ wq.T)
    torch.testing.assert_close(wq, quantize_weight(w))
    torch.testing.assert_close(xq, quantize_activation(x))


def test_prepare_twice_reconfigures(llama):
    prepare(llama)
    count = len(bitlinear_modules(llama))
    prepare(llama, quant={"activations": "none"}, lam=0.25)
    assert len(bitlinear_modules(llama)) == count
    assert all(not m.quantize_activations and m.lam == 0.25 for _, m in bitlinear_modules(llama))


def test_prepare_rejects_bad_settings(llama):
    with pytest.raises(UserError, match="unknown key"):
        prepare(llama, quant={"granularity": "per_tensor", "bits": 2})
    with pytest.raises(UserError, match="lambda"):
        prepare(llama, lam=1.5)
    with pytest.raises(UserError, match="no q/k/v/o"):
        prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)))
