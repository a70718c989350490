"""Put LoRA adapters on a BitNet policy with peft, switch them off, and merge them into ternary weights.

`apply_lora` injects peft LoRA layers in place (`peft.inject_adapter_in_model`, so the model keeps
its class and every stage's code runs unchanged): `pre_quant` registers `PreQuantLoraLinear` for
BitLinear through `LoraConfig._register_custom_module`; `post_quant` uses peft's own `Linear`
(BitLinear is an `nn.Linear`), which adds `s·B·A·x` after the ternary product. Only A and B (and
a reward/value head, if any) train.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer

from bitnet_rl.errors import UserError
from bitnet_rl.lora.layer import PreQuantLoraLinear
from bitnet_rl.quant.bitlinear import BitLinear

POST_QUANT_WARNING = (
    "lora.mode=post_quant adds B·A after the ternary product: a merged model is no longer ternary "
    "(re-quantizing it rounds most of the update away); use lora.mode=pre_quant to ship a ternary model"
)
HEADS = ("score", "v_head")  # scalar heads of reward models / critics stay trainable


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def peft_config(settings) -> LoraConfig:
    """peft's `LoraConfig` from the recipe's `lora` section (with our BitLinear layer registered for pre_quant)."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    if settings.mode == "pre_quant":
        config._register_custom_module({BitLinear: PreQuantLoraLinear})
    return config


def apply_lora(model: nn.Module, settings, seed: int = 0) -> nn.Module:
    """Inject adapters into `model` in place (A drawn from `seed`, B = 0); freeze everything else. Returns `model`."""
    if settings.mode == "post_quant":
        warnings.warn(POST_QUANT_WARNING, stacklevel=2)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        raise UserError(f"lora.target_modules: the model has no module named {missing[0]!r}")
    with torch.random.fork_rng(devices=[]):  # the same adapters whatever ran before
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(settings), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.split(".", 1)[0] in HEADS)
    return model


def _set_adapters(model: nn.Module, enabled: bool) -> None:
    for _, layer in lora_layers(model):
        layer.enable_adapters(enabled)
        if not enabled and isinstance(layer, PreQuantLoraLinear):
            layer.get_base_layer().clear_weight_cache()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base (adapters off) inside the block; the reference of DPO/PPO with LoRA."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    _set_adapters(model, False)
    try:
        yield model
    finally:
        _set_adapters(model, True)
        for n, p in model.named_parameters():  # peft's enable_adapters(True) marks adapters trainable; restore exactly
            p.requires_grad_(trainable[n])


class DisabledAdapterView:
    """The base model as a callable reference: `view(**inputs)` runs `model` with adapters off.

    Holds no weights of its own (no second copy); `.to()` / `.eval()` are no-ops for the loops
    that move a separate reference around.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def to(self, *args, **kwargs) -> "DisabledAdapterView":
        return self

    def eval(self) -> "DisabledAdapterView":
        return self


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the base layer back (peft's merge-and-unload).

    pre_quant: the BitLinear's master weight becomes `W + s·B·A`, so the model is ternary and computes
    exactly what the adapted model computed. post_quant: warns (the merged product is re-quantized).
    """
    layers = lora_layers(model)
    if any(not isinstance(layer, PreQuantLoraLinear) for _, layer in layers):
        warnings.warn(POST_QUANT_WARNING, stacklevel=2)
    for name, layer in layers:
        layer.merge()
        base = layer.get_base_layer()
        base.clear_weight_cache() if isinstance(base, BitLinear) else None
        model.set_submodule(name, base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def unload_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the adapters without merging; returns their weights (peft's key names, adapter name dropped)."""
    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if "lora_" in name}
    for name, layer in lora_layers(model):
        model.set_submodule(name, layer.get_base_layer())
    return {k.replace(".default.", "."): v for k, v in state.items()}


def adapter_writer(state: dict[str, torch.Tensor], settings) -> Callable[[Path], None]:
    """A `save_checkpoint` extra that writes `adapter/` (adapter_model.safetensors + adapter_config.json, peft's layout)."""
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        path.mkdir()
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
        config = peft_config(settings).to_dict()
        config.pop("_custom_modules", None)
        config["bitnet_rl_mode"] = settings.mode
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))

    return write


def finish_lora(model: nn.Module, settings) -> dict[str, Callable[[Path], None]]:
    """Make `model` a plain (adapter-free) model for `final/`: merged if `lora.merge`, else the base plus `adapter/`."""
    if not has_lora(model):
        return {}
    if settings.merge:
        merge_lora(model)
        return {}
    return {"adapter": adapter_writer(unload_lora(model), settings)}


class _AdaptedProjection(BitLinear):
    """A BitLinear sharing the base layer's tensors whose `ternary_codes()` are those of `Q(W + s·B·A)`."""

    def ternary_codes(self):
        return self.__dict__["_lora"].ternary_codes()


@contextmanager
def merged_view(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each pre_quant-adapted projection is a BitLinear whose codes are `Q(W + s·B·A)`.

    For the packed generator, which reads `ternary_codes()`: it re-packs exactly the ternary model
    being trained. Nothing is copied up front; `W + s·B·A` exists for one projection at a time.
    """
    swapped = []
    for name, layer in lora_layers(model):
        if not isinstance(layer, PreQuantLoraLinear):
            raise UserError("rollout.backend=packed with lora.mode=post_quant samples a non-ternary model; use rollout.backend=policy")
        base = layer.get_base_layer()
        view = _AdaptedProjection.from_linear(base, granularity=base.granularity, group_size=base.group_size, quantize_activations=base.quantize_activations, lam=base.lam)
        view.__dict__["_lora"] = layer  # not a submodule
        model.set_submodule(name, view)
        swapped.append((name, layer))
    try:
        yield model
    finally:
        for name, layer in swapped:
            model.set_submodule(name, layer)


class LoraSyncedGenerator:
    """Wraps a packed rollout generator so `sync_from(policy)` re-packs the adapted (pre_quant) weights.

    The first sync copies everything; later ones re-pack only the fused projection groups that hold
    an adapter (with LoRA nothing else changes: base weights, norms and embeddings are frozen).
    """

    def __init__(self, generator) -> None:
        self.generator = generator
        self.full_sync_done = False

    def sync_from(self, policy: nn.Module) -> None:
        with merged_view(policy):
            packed = getattr(self.generator, "model", None)
            if self.full_sync_done and hasattr(packed, "layers"):
                sync_adapted(packed, policy)
            else:
                self.generator.sync_from(policy)
                self.full_sync_done = True

    def __getattr__(self, name):
        return getattr(self.generator, name)


@torch.no_grad()
def sync_adapted(packed, policy: nn.Module) -> int:
    """Re-pack the fused groups (qkv, o, gate_up, down) that contain an adapted projection; returns how many."""
    from bitnet_rl.rollout.arch import projection
    from bitnet_rl.rollout.weights import FUSED

    count = 0
    for layer, weights in zip(policy.model.layers, packed.layers):
        for key, names in FUSED.items():
            modules = [projection(layer, n) for n in names]
            if any(isinstance(m, _AdaptedProjection) for m in modules):
                getattr(weights, key).pack_all_(modules)
                count += 1
    return count
