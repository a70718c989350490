"""A ternary weight in the W2A8 kernel layout, and the one path that packs BitLinear weights.

Every packed weight, in tests, in the generator's fused buffers (q|k|v, gate|up) and in frozen
models, is written by `PackedWeight.pack_rows_`: BitLinear's λ = 1 codes and inverse scale
(`quant.bitlinear.ternary_codes`) → 2-bit kernel layout (`quant.pack.pack_kernel`) and
dequantization scales `1 / s`, into preallocated rows (so CUDA graphs that read the buffers
stay valid across syncs). `from_codes` / `from_bitlinear` allocate and then use that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.quant.pack import kernel_padded_in, pack_kernel, unpack_kernel

KERNEL_GROUP = 32  # per-group sizes the CUDA W2A8 kernels accept are multiples of this


@dataclass
class PackedWeight:
    """A ternary weight in the kernel layout of `quant/pack.py` plus its dequantization scales.

    The dequantized weight is `codes · dequant` with `dequant = 1 / s` broadcast per granularity.
    """

    packed: torch.Tensor  # uint8 (N, kernel_padded_in(K) // 4)
    dequant: torch.Tensor  # float32 () | (N,) | (N, K // group_size)
    in_features: int
    out_features: int
    group_size: int = 0  # > 0 only for per-group scales
    bias: torch.Tensor | None = None  # float32 (N,)

    @property
    def granularity(self) -> str:
        return ("per_tensor", "per_channel", "per_group")[self.dequant.dim()]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    # ---------------------------------------------------------------- allocation and packing
    @classmethod
    def empty(
        cls, out_features: int, in_features: int, *, group_size: int = 0, bias: bool = False, device=None, per_tensor: bool = False
    ) -> "PackedWeight":
        """Zeroed buffers for `(out_features, in_features)`, filled by `pack_rows_`.

        Scales are per channel `(N,)` (a per-tensor scale is broadcast to every row, so fused
        projections with different scales fit), per group `(N, K // g)` with `group_size`, or
        a single `()` with `per_tensor`.
        """
        if per_tensor:
            dequant_shape: tuple[int, ...] = ()
        elif group_size:
            dequant_shape = (out_features, in_features // group_size)
        else:
            dequant_shape = (out_features,)
        return cls(
            packed=torch.zeros((out_features, kernel_padded_in(in_features) // 4), dtype=torch.uint8, device=device),
            dequant=torch.zeros(dequant_shape, dtype=torch.float32, device=device),
            in_features=in_features,
            out_features=out_features,
            group_size=group_size,
            bias=torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None,
        )

    def write_codes_(self, row: int, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> int:
        """Write int codes `(n, K)` with BitLinear inverse scale `s` (`()`, `(n, 1)` or `(n, K // g, 1)`)
        into rows `row … row + n`, in place. Returns `row + n`."""
        n = codes.shape[0]
        if codes.shape[1] != self.in_features or row + n > self.out_features:
            raise ValueError(f"write_codes_: codes {tuple(codes.shape)} do not fit rows {row}… of {self.out_features}×{self.in_features}")
        pack_kernel(codes.to(self.device), out=self.packed[row : row + n])
        dequant = (1.0 / scale.float()).to(self.device)
        if self.dequant.dim() == 0:
            if row or n != self.out_features or scale.numel() != 1:
                raise ValueError("write_codes_: a per-tensor buffer takes one whole weight with a per-tensor scale")
            self.dequant.copy_(dequant.reshape(()))
        elif self.dequant.dim() == 2:
            self.dequant[row : row + n].copy_(dequant.reshape(n, -1))
        else:
            self.dequant[row : row + n].copy_(dequant.reshape(-1).expand(n) if dequant.numel() == 1 else dequant.reshape(n))
        if self.bias is not None:
            if bias is None:
                self.bias[row : row + n].zero_()
            else:
                self.bias[row : row + n].copy_(bias.detach().float())
        return row + n

    def pack_rows_(self, row: int, module: nn.Module) -> int:
        """Re-pack a BitLinear's λ = 1 codes and scale into rows `row …`, in place. Returns the next row.

        A module that is already packed (a frozen `PackedTernaryLinear`, which has `packed_weight()`)
        has its codes and scales copied as they are (bit for bit, no re-quantization)."""
        group = module.group_size if module.granularity == "per_group" else 0
        if group != self.group_size or module.in_features != self.in_features:
            raise UserError("packing: the model's quantization settings changed; build a new generator / frozen copy")
        if hasattr(module, "packed_weight"):
            return self.copy_rows_(row, module.packed_weight())
        codes, scale = module.ternary_codes()
        return self.write_codes_(row, codes, scale, module.bias)

    def copy_rows_(self, row: int, other: "PackedWeight") -> int:
        """Copy `other`'s packed codes, scales and bias into rows `row …` (same K and group). Returns the next row."""
        n = other.out_features
        if other.packed.shape[1] != self.packed.shape[1] or other.group_size != self.group_size or row + n > self.out_features:
            raise ValueError(f"copy_rows_: a {n}×{other.in_features} weight does not fit rows {row}… of {self.out_features}×{self.in_features}")
        self.packed[row : row + n].copy_(other.packed)
        if self.dequant.dim() == 0:
            if row or n != self.out_features or other.dequant.dim() != 0:
                raise ValueError("copy_rows_: a per-tensor buffer takes one whole weight with a per-tensor scale")
            self.dequant.copy_(other.dequant)
        else:
            source = other.dequant.expand(n) if other.dequant.dim() == 0 and self.dequant.dim() == 1 else other.dequant
            self.dequant[row : row + n].copy_(source)
        if self.bias is not None:
            if other.bias is None:
                self.bias[row : row + n].zero_()
            else:
                self.bias[row : row + n].copy_(other.bias)
        return row + n

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, group_size: int = 0, bias: torch.Tensor | None = None) -> "PackedWeight":
        """From int codes `(N, K)` and the BitLinear inverse scale `s` (`()`, `(N, 1)` or `(N, K // g, 1)`)."""
        out_features, in_features = codes.shape
        weight = cls.empty(
            out_features, in_features, group_size=group_size if scale.dim() == 3 else 0, bias=bias is not None,
            device=codes.device, per_tensor=scale.dim() == 0,
        )
        weight.write_codes_(0, codes, scale, bias)
        return weight

    @classmethod
    def from_bitlinear(cls, module: nn.Module, *, for_kernels: bool = True) -> "PackedWeight":
        """Pack a `BitLinear`'s λ = 1 weight (per-tensor scales stay a single scalar)."""
        return cls.fused([module], per_tensor=module.granularity == "per_tensor", device=module.weight.device, pack=True, for_kernels=for_kernels)

    @classmethod
    def fused(
        cls, modules: Sequence[nn.Module], *, device=None, per_tensor: bool = False, pack: bool = False, for_kernels: bool = True
    ) -> "PackedWeight":
        """Buffers for the row-stacked BitLinear `modules` (fused q|k|v, gate|up); packed if `pack`.

        `for_kernels` rejects per-group sizes the CUDA kernels cannot run (not a multiple of 32).
        """
        in_features = modules[0].in_features
        groups = {m.group_size if m.granularity == "per_group" else 0 for m in modules}
        if len(groups) > 1 or any(m.in_features != in_features for m in modules):
            raise UserError("packing: fused projections (q/k/v, gate/up) must share in_features and quant.group_size")
        group = groups.pop()
        device = torch.device(device) if device is not None else modules[0].weight.device
        if for_kernels and group and device.type == "cuda" and group % KERNEL_GROUP:
            raise UserError(f"the W2A8 kernels on CUDA need quant.group_size divisible by 32, got {group}")
        weight = cls.empty(
            sum(m.out_features for m in modules), in_features, group_size=group,
            bias=any(m.bias is not None for m in modules), device=device, per_tensor=per_tensor and len(modules) == 1,
        )
        if pack:
            weight.pack_all_(modules)
        return weight

    @torch.no_grad()
    def pack_all_(self, modules: Sequence[nn.Module]) -> None:
        """Re-pack the row-stacked `modules` into this weight, in place."""
        row = 0
        for module in modules:
            row = self.pack_rows_(row, module)

    # ---------------------------------------------------------------- views
    def codes(self) -> torch.Tensor:
        """The int8 codes `(N, K)`."""
        return unpack_kernel(self.packed, self.in_features)

    def dense(self) -> torch.Tensor:
        """The float32 dequantized weight `(N, K)`."""
        codes = self.codes().float()
        if self.dequant.dim() == 2:
            return (codes.view(self.out_features, -1, self.group_size) * self.dequant[..., None]).view_as(codes)
        return codes * (self.dequant[:, None] if self.dequant.dim() == 1 else self.dequant)

    def nbytes(self) -> int:
        """Bytes of codes and scales (what one pass over the weight reads)."""
        return self.packed.numel() + 4 * self.dequant.numel()

    def to(self, device) -> "PackedWeight":
        return PackedWeight(
            self.packed.to(device), self.dequant.to(device), self.in_features, self.out_features, self.group_size,
            None if self.bias is None else self.bias.to(device),
        )

    def clone(self) -> "PackedWeight":
        return PackedWeight(
            self.packed.clone(), self.dequant.clone(), self.in_features, self.out_features, self.group_size,
            None if self.bias is None else self.bias.clone(),
        )


def concat_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Stack weights along N (fused q|k|v or gate|up). Per-tensor scales become per-channel."""
    in_features = weights[0].in_features
    group = weights[0].group_size
    if any(w.in_features != in_features or w.group_size != group for w in weights):
        raise ValueError("concat_packed: weights differ in in_features or group size")
    if group:
        dequant = torch.cat([w.dequant for w in weights])
    else:
        dequant = torch.cat([w.dequant.expand(w.out_features) if w.dequant.dim() == 0 else w.dequant for w in weights])
    biases = [w.bias for w in weights]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(w.out_features, device=w.device) for b, w in zip(biases, weights)])
    return PackedWeight(
        packed=torch.cat([w.packed for w in weights]),
        dequant=dequant.contiguous(),
        in_features=in_features,
        out_features=sum(w.out_features for w in weights),
        group_size=group,
        bias=bias,
    )
