"""BitLinear: an `nn.Linear` that quantizes on the fly (BitNet b1.58).

Weights: absmean ternary, `s = 1 / mean(|W|).clamp(min=1e-5)`, `Wq = clamp(round(W·s), -1, 1) / s`,
with the mean taken per tensor (the BitNet recipe), per output row, or per group of input columns.
Activations: per-token absmax int8, `s = 127 / max(|x|).clamp(min=1e-5)`,
`xq = clamp(round(x·s), -128, 127) / s`.

λ blends full precision and quantized values, `W_eff = W + λ·(Q(W) − W)`, with the
straight-through estimator: the gradient passes to `W` unchanged. λ = 0 is exactly
`nn.Linear`; λ = 1 with per-tensor scales is exactly transformers' `AutoBitLinear` (online).
The eps follows transformers (`clamp(min=1e-5)` on the mean/max), not the seed notebook's
`+ 1e-8`: both agree except on all-zero rows, where clamping keeps the scale finite.

Subclassing `nn.Linear` keeps `peft` (LoRA wraps it as a base layer) and `transformers`
(weight init, tying, saving) working unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.errors import UserError

Granularity = Literal["per_tensor", "per_channel", "per_group"]
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
EPS = 1e-5


def weight_scale(weight: torch.Tensor, granularity: Granularity = "per_tensor", group_size: int = 128) -> torch.Tensor:
    """Inverse absmean scale `s = 1 / mean(|W|).clamp(min=1e-5)`, in float32.

    Shape: `()` per tensor, `(out, 1)` per channel, `(out, in // group_size, 1)` per group
    (so it broadcasts against `weight.view(out, -1, group_size)`).
    """
    w = weight.detach().float().abs()
    if granularity == "per_tensor":
        mean = w.mean()
    elif granularity == "per_channel":
        mean = w.mean(dim=-1, keepdim=True)
    elif granularity == "per_group":
        mean = w.reshape(w.shape[0], -1, group_size).mean(dim=-1, keepdim=True)
    else:
        raise UserError(f"quant.granularity: unknown value {granularity!r} (expected one of {', '.join(GRANULARITIES)})")
    return 1.0 / mean.clamp(min=EPS)


def ternary_codes(weight: torch.Tensor, granularity: Granularity = "per_tensor", group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} (int8, shape of `weight`) and the inverse scale `s` (float32).

    `codes / s` (with `s` broadcast per granularity) is the dequantized weight.
    """
    scale = weight_scale(weight, granularity, group_size)
    w = weight.detach().float()
    if granularity == "per_group":
        w = w.reshape(w.shape[0], -1, group_size)
    codes = (w * scale).round().clamp(-1, 1).to(torch.int8).view(weight.shape)
    return codes, scale


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Float32 weight `codes / s`, for any of the three scale shapes of `weight_scale`."""
    c = codes.float()
    if scale.dim() == 3:
        return (c.reshape(c.shape[0], -1, group_size) / scale).view(codes.shape)
    return c / scale


def quantize_weight(weight: torch.Tensor, granularity: Granularity = "per_tensor", group_size: int = 128) -> torch.Tensor:
    """Absmean ternary fake-quantization `Q(W)`, computed in float32 and cast back (as transformers does)."""
    codes, scale = ternary_codes(weight, granularity, group_size)
    return dequantize_codes(codes, scale, group_size).to(weight.dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token inverse absmax scale `127 / max(|x|).clamp(min=1e-5)`, float32, shape `(..., 1)`."""
    return 127.0 / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake-quantization, computed in float32 and cast back."""
    scale = activation_scale(x)
    return ((x.detach().float() * scale).round().clamp(-128, 127) / scale).to(x.dtype)


class _BlendSTE(torch.autograd.Function):
    """Forward `x + λ·(q − x)` (exactly `q` at λ = 1); backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
        if lam >= 1.0:
            return q
        return x + lam * (q - x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def ste_blend(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """`x + λ·(q − x).detach()`: the quantized value forward, the full-precision gradient backward."""
    return _BlendSTE.apply(x, q, lam)


class BitLinear(nn.Linear):
    """`nn.Linear` with ternary weights and int8 activations, blended in by `lam`.

    The module holds the full-precision master weight; quantization happens in `forward`, so
    the optimizer updates master weights and the straight-through estimator carries gradients.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        granularity: Granularity = "per_tensor",
        group_size: int = 128,
        quantize_activations: bool = True,
        lam: float = 1.0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if granularity not in GRANULARITIES:
            raise UserError(f"quant.granularity: unknown value {granularity!r} (expected one of {', '.join(GRANULARITIES)})")
        if granularity == "per_group" and (group_size <= 0 or in_features % group_size):
            raise UserError(f"quant.group_size: {group_size} does not divide in_features={in_features}")
        self.granularity = granularity
        self.group_size = group_size
        self.quantize_activations = quantize_activations
        self.lam = check_lambda(lam)
        # Q(W) once per weight update, not per forward (see quant/kernels/train.py); False to recompute.
        self.cache_quantized_weight = True
        self._weight_cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "BitLinear":
        """A BitLinear holding `linear`'s weights (shared, not copied)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes and float32 inverse scale this layer computes with at λ = 1."""
        return ternary_codes(self.weight, self.granularity, self.group_size)

    def quantized_weight(self) -> torch.Tensor:
        """`Q(W)` (no gradient), in the autocast dtype under autocast; cached until the weight changes."""
        from bitnet_rl.quant.kernels import train as kernels

        if not self.cache_quantized_weight or torch.compiler.is_compiling():
            return quantize_weight(self.weight, self.granularity, self.group_size)
        dtype = kernels._autocast_dtype(self.weight)

        def compute(w: torch.Tensor) -> torch.Tensor:  # one Triton pass on CUDA, written in the autocast dtype
            return kernels.fake_quantize_weight(w, self.granularity, self.group_size, dtype)

        if self._weight_cache is None:
            self._weight_cache = kernels.QuantizedWeightCache()
        return self._weight_cache.get(self.weight, compute, dtype=dtype)

    def clear_weight_cache(self) -> None:
        """Forget the cached Q(W); the next forward quantizes the weight again."""
        cache = getattr(self, "_weight_cache", None)
        if cache is not None:
            cache.clear()

    def effective_weight(self) -> torch.Tensor:
        if self.lam == 0.0:
            return self.weight
        return ste_blend(self.weight, self.quantized_weight(), self.lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lam == 0.0:
            return F.linear(x, self.weight, self.bias)
        if self.quantize_activations:
            from bitnet_rl.quant.kernels.train import fake_quantize_activation

            x = ste_blend(x, fake_quantize_activation(x), self.lam)
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "per_group" else ""
        return f"{super().extra_repr()}, granularity={self.granularity}{group}, act_int8={self.quantize_activations}, lam={self.lam:g}"


def check_lambda(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or value != value:
        raise UserError(f"lambda must be in [0, 1], got {value}")
    return value


def bitlinear_modules(model: nn.Module) -> list[tuple[str, BitLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def clear_quantized_weights(model: nn.Module) -> None:
    """Drop the cached Q(W) of every BitLinear in `model` (the trainer does after each optimizer step).

    The cache's key (storage address, version counter) sees in-place updates of a plain weight, but
    not FSDP2's: its forward reads an unsharded weight that the all-gather refills in storage that
    may sit at the same address with an unchanged version counter. Without this, sharded runs
    computed with the Q(W) of an earlier step whenever the allocator handed back the same block
    (a 2-process reward model: step-2 loss 0.6718 against 0.6671 in one process).
    """
    for _, module in bitlinear_modules(model):
        module.clear_weight_cache()


def set_lambda(model: nn.Module, value: float) -> None:
    """Set λ on every BitLinear of `model` (a `UserError` outside [0, 1])."""
    value = check_lambda(value)
    for _, module in bitlinear_modules(model):
        module.lam = value


def get_lambda(model: nn.Module) -> float | None:
    """The λ shared by the model's BitLinear modules (None if it has none)."""
    values = {m.lam for _, m in bitlinear_modules(model)}
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"BitLinear modules disagree on lambda: {sorted(values)}")
    return values.pop()
