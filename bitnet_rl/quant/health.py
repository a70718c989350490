"""Ternary health: is STE training moving the ternary model, and are the master weights collapsing?

Per BitLinear layer and overall: fractions of −1/0/+1 codes, mean inverse scale, master-weight std
(the seed notebook warns of collapse when std < 1e-3), and the flip rate between two snapshots
(share of codes that changed). A flip rate of 0 for many steps means the optimizer never crosses
a rounding boundary: the learning rate is too small for a ternary model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bitnet_rl.quant.bitlinear import bitlinear_modules

COLLAPSE_STD = 1e-3


@dataclass
class LayerHealth:
    name: str
    numel: int
    frac_neg: float
    frac_zero: float
    frac_pos: float
    mean_scale: float  # mean of 1 / mean|W| over the layer's scale groups
    weight_std: float

    @property
    def collapsed(self) -> bool:
        return self.weight_std < COLLAPSE_STD


@dataclass
class HealthReport:
    layers: list[LayerHealth]
    flip_rate: float | None = None
    layer_flip_rates: dict[str, float] = field(default_factory=dict)
    codes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # this snapshot, for the next flip rate

    def overall(self) -> dict[str, float]:
        total = sum(layer.numel for layer in self.layers) or 1
        out = {
            key: sum(getattr(layer, key) * layer.numel for layer in self.layers) / total
            for key in ("frac_neg", "frac_zero", "frac_pos", "weight_std")
        }
        out["mean_scale"] = sum(layer.mean_scale for layer in self.layers) / max(len(self.layers), 1)
        if self.flip_rate is not None:
            out["flip_rate"] = self.flip_rate
        return out

    @property
    def collapsed(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.collapsed]


def ternary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BitLinear, except that a pre_quant LoRA layer stands in for its base BitLinear: its
    `ternary_codes()` are those of `Q(W + s·B·A)`, the weights the model actually computes with."""
    wrappers = [(name, m) for name, m in model.named_modules() if hasattr(m, "adapted_weight")]
    hidden = {f"{name}.base_layer" for name, _ in wrappers}
    plain = [(name, m) for name, m in bitlinear_modules(model) if name not in hidden]
    return sorted(plain + wrappers, key=lambda item: item[0])


def _master_weight(module: nn.Module) -> torch.Tensor:
    return module.adapted_weight() if hasattr(module, "adapted_weight") else module.weight


def code_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Ternary codes of every BitLinear (int8, on the module's device), for flip rates later."""
    return {name: module.ternary_codes()[0] for name, module in ternary_layers(model)}


def flip_rates(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Share of codes that changed, overall and per layer."""
    changed = total = 0
    per_layer = {}
    for name, codes in after.items():
        diff = int((codes != before[name]).sum())
        per_layer[name] = diff / codes.numel()
        changed += diff
        total += codes.numel()
    return (changed / total if total else 0.0), per_layer


@torch.no_grad()
def ternary_health(model: nn.Module, previous: dict[str, torch.Tensor] | None = None) -> HealthReport:
    """Code fractions, scales and std for every BitLinear; flip rate against `previous` if given."""
    layers = []
    current = {}
    for name, module in ternary_layers(model):
        codes, scale = module.ternary_codes()
        current[name] = codes
        n = codes.numel()
        layers.append(
            LayerHealth(
                name=name,
                numel=n,
                frac_neg=int((codes == -1).sum()) / n,
                frac_zero=int((codes == 0).sum()) / n,
                frac_pos=int((codes == 1).sum()) / n,
                mean_scale=float(scale.mean()),
                weight_std=float(_master_weight(module).float().std()),
            )
        )
    report = HealthReport(layers, codes=current)
    if previous is not None:
        report.flip_rate, report.layer_flip_rates = flip_rates(previous, current)
    return report
