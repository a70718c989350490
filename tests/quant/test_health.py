import torch
import torch.nn as nn

from bitnet_rl.quant.bitlinear import BitLinear
from bitnet_rl.quant.health import code_snapshot, ternary_health


def test_fractions_scale_std_and_flip_rate_by_hand():
    layer = BitLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.1, 0.0], [1.0, 1.0, -1.0, 0.1]]))
    model = nn.Sequential(layer)
    before = code_snapshot(model)
    report = ternary_health(model)
    # mean|W| = 5.2 / 8 = 0.65 → codes [[1,-1,0,0],[1,1,-1,0]]
    overall = report.overall()
    assert overall["frac_pos"] == 3 / 8 and overall["frac_neg"] == 2 / 8 and overall["frac_zero"] == 3 / 8
    assert abs(overall["mean_scale"] - 1 / 0.65) < 1e-5
    assert abs(overall["weight_std"] - layer.weight.std().item()) < 1e-7
    assert report.collapsed == []
    with torch.no_grad():
        layer.weight[0, 2] = 1.0  # mean|W| = 6.1/8 ≈ 0.76: this code flips 0 → 1, the others stay
    after = ternary_health(model, previous=before)
    assert after.flip_rate == 1 / 8


def test_collapse_warning():
    layer = BitLinear(8, 8)
    with torch.no_grad():
        layer.weight.fill_(1e-5)
    assert ternary_health(nn.Sequential(layer)).collapsed == ["0"]
