import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.errors import UserError
from bitnet_rl.quant.bitlinear import BitLinear, get_lambda, quantize_activation, quantize_weight, set_lambda, ternary_codes


pytestmark = pytest.mark.usefixtures("no_compile")


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    linear = nn.Linear(32, 16, bias=False)
    bit = BitLinear.from_linear(linear, **kw)
    return linear, bit


def test_lambda_zero_is_nn_linear():
    linear, bit = _pair(lam=0.0)
    x = torch.randn(3, 5, 32)
    assert torch.equal(bit(x), linear(x))


def test_lambda_one_equals_transformers_autobitlinear():
    from transformers.integrations.bitnet import AutoBitLinear

    _, bit = _pair(lam=1.0)
    ref = AutoBitLinear(32, 16, bias=False, online_quant=True)
    ref.weight.data.copy_(bit.weight.data)
    x = torch.randn(4, 7, 32) * 3
    assert torch.equal(bit(x), ref(x))


def test_lambda_one_equals_autobitlinear_in_bf16():
    from transformers.integrations.bitnet import AutoBitLinear

    _, bit = _pair(lam=1.0)
    bit = bit.to(torch.bfloat16)
    ref = AutoBitLinear(32, 16, bias=False, online_quant=True, dtype=torch.bfloat16)
    ref.weight.data.copy_(bit.weight.data)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert torch.equal(bit(x), ref(x))


def test_lambda_blends_weights_and_activations():
    linear, bit = _pair(lam=0.3)
    x = torch.randn(6, 32)
    w, xq = linear.weight, quantize_activation(x)
    w_eff = w + 0.3 * (quantize_weight(w) - w)
    x_eff = x + 0.3 * (xq - x)
    torch.testing.assert_close(bit(x), F.linear(x_eff, w_eff), rtol=1e-6, atol=1e-6)


def test_ste_gradient_is_dense_gradient_at_quantized_weights():
    _, bit = _pair(lam=1.0)
    x = torch.randn(5, 32, requires_grad=True)
    bit(x).pow(2).sum().backward()
    wq = quantize_weight(bit.weight).detach().requires_grad_(True)
    xq = quantize_activation(x.detach()).requires_grad_(True)
    F.linear(xq, wq).pow(2).sum().backward()
    torch.testing.assert_close(bit.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, xq.grad)


def test_per_tensor_codes_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [-1.0, 0.2, 0.3, -0.2]])
    codes, s = ternary_codes(w, "per_tensor")
    mean = (0.5 + 0.1 + 0 + 2.0 + 1.0 + 0.2 + 0.3 + 0.2) / 8  # 0.5375
    assert s.item() == pytest.approx(1 / mean)
    # w / mean = [0.93, -0.19, 0, 3.72], [-1.86, 0.37, 0.56, -0.37]
    assert codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, 0]]


def test_per_channel_codes_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [-1.0, 0.2, 0.3, -0.2]])
    codes, s = ternary_codes(w, "per_channel")
    # row means: 0.65 and 0.425 → w/mean rows: [0.77, -0.15, 0, 3.08], [-2.35, 0.47, 0.71, -0.47]
    torch.testing.assert_close(s.flatten(), torch.tensor([1 / 0.65, 1 / 0.425]))
    assert codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, 0]]
    deq = quantize_weight(w, "per_channel")
    torch.testing.assert_close(deq, torch.tensor([[0.65, 0, 0, 0.65], [-0.425, 0, 0.425, 0]]))


def test_per_group_codes_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [-1.0, 0.2, 0.3, -0.2]])
    codes, s = ternary_codes(w, "per_group", group_size=2)
    # group means: row0 (0.3, 1.0), row1 (0.6, 0.25)
    torch.testing.assert_close(s.flatten(), torch.tensor([1 / 0.3, 1.0, 1 / 0.6, 4.0]))
    # row0: [1.67, -0.33 | 0, 2] → [1, 0, 0, 1]; row1: [-1.67, 0.33 | 1.2, -0.8] → [-1, 0, 1, -1]
    assert codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, -1]]
    deq = quantize_weight(w, "per_group", group_size=2)
    torch.testing.assert_close(deq, torch.tensor([[0.3, 0, 0, 1.0], [-0.6, 0, 0.25, -0.25]]))


def test_activation_quant_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    # s = 127 / 1 → round(127, -63.5→-64, 31.75→32, 0) / 127
    expected = torch.tensor([[127, -64, 32, 0]]) / 127.0
    torch.testing.assert_close(quantize_activation(x), expected)


def test_activations_off_keeps_inputs():
    linear, bit = _pair(quantize_activations=False)
    x = torch.randn(3, 32)
    torch.testing.assert_close(bit(x), F.linear(x, quantize_weight(linear.weight)))


def test_set_lambda_and_errors():
    model = nn.Sequential(BitLinear(8, 8), nn.ReLU(), BitLinear(8, 4))
    set_lambda(model, 0.25)
    assert get_lambda(model) == 0.25
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="lambda"):
            set_lambda(model, bad)
    with pytest.raises(UserError, match="group_size"):
        BitLinear(10, 4, granularity="per_group", group_size=4)
    with pytest.raises(UserError, match="granularity"):
        BitLinear(8, 4, granularity="per_row")


def test_peft_lora_wraps_bitlinear():
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential()
    model.add_module("q_proj", BitLinear(16, 16))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.q_proj
    assert isinstance(layer.base_layer, BitLinear)
    peft_model(torch.randn(2, 16)).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
