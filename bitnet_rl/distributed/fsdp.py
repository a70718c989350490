"""FSDP2 pieces that do not depend on who sharded the model (accelerate's plugin on GPUs, or
`torch.distributed.fsdp.fully_shard` directly): accelerator options, a dtype check per shard
group, full weights for the packed generator and health, full state dicts for checkpoints.

A checkpoint written under FSDP2 is the same Hugging Face directory as one written by one
process: the model's full state dict is gathered on the main process (`full_model_state`)
and the optimizer's full, name-keyed state (`full_optimizer_state`), so it resumes on any
number of processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from bitnet_rl.errors import UserError

DECODER_LAYERS = ("BitNetDecoderLayer", "LlamaDecoderLayer")  # the shard groups (transformers' _no_split_modules)


def accelerator_options(recipe) -> dict[str, Any]:
    """Extra `Accelerator(...)` arguments for the recipe's `distributed` section.

    CPU workers need `cpu=True` for accelerate to set up gloo (it otherwise treats each worker
    as a lone process); `strategy: fsdp2` passes accelerate's FSDP2 plugin (full state dicts,
    decoder layers as shard groups).
    """
    options: dict[str, Any] = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        options["cpu"] = True
    if recipe.distributed.strategy == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        options["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, state_dict_type="FULL_STATE_DICT", reshard_after_forward=True, cpu_ram_efficient_loading=False
        )
    return options


def check_uniform_dtypes(model: nn.Module, group_classes: tuple[str, ...] = DECODER_LAYERS) -> None:
    """FSDP2 all-gathers each shard group in one dtype: refuse a group whose parameters mix dtypes.

    The groups are the modules whose class name is in `group_classes`, plus the root with
    whatever is left (embeddings, final norm, heads). BitLinear keeps its master weights in the
    model dtype, so a plain model passes; a float32 head on a bf16 backbone does not.
    """
    groups: list[tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules() if type(m).__name__ in group_classes]
    inside = {id(p) for _, m in groups for p in m.parameters()}
    for name, module in groups:
        _check_group(name, list(module.parameters()))
    _check_group("the root (embeddings, norm, heads)", [p for p in model.parameters() if id(p) not in inside])


def _check_group(name: str, params: list[torch.Tensor]) -> None:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if len(dtypes) > 1:
        raise UserError(f"distributed.strategy=fsdp2: shard group {name} mixes parameter dtypes ({', '.join(dtypes)}); load the model in one dtype (model.dtype)")


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gathered_params(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every FSDP2 module of `model` holds its full (unsharded) parameters, so code that
    reads weights (generator sync, ternary health) sees the whole model. Collective: every rank
    must enter. A model that is not sharded is yielded as is."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield model
    finally:
        for module in sharded:
            module.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict on the main process ({} elsewhere) for a sharded model; None when the
    model is not sharded (its own `state_dict()` is already full). Collective when sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state: `optimizer.state_dict()` when not sharded; keyed by parameter
    names and gathered on the main process when sharded (collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state saved by `full_optimizer_state` (name-keyed when written under FSDP2, index-keyed
    otherwise) into a sharded or plain optimizer, on any number of processes."""
    name_keyed = any(isinstance(k, str) for k in state.get("state", {}))
    if not is_sharded(model):
        optimizer.load_state_dict(_indexed(model, optimizer, state) if name_keyed else state)
        return
    if not name_keyed:
        raise UserError("this checkpoint's optimizer state is index-keyed (written without FSDP2); resume it with distributed.strategy=ddp")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _indexed(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict as `Optimizer.load_state_dict` wants it: parameters numbered
    in the optimizer's own order, names matched without a DDP wrapper's `module.` prefix."""
    names = {id(p): name.removeprefix("module.") for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(ordered)}
    saved = {name for group in state["param_groups"] for name in group["params"]}
    if saved != set(ordered):
        different = sorted(saved ^ set(ordered))
        raise UserError(f"the checkpoint's optimizer state does not match the model's parameters (e.g. {different[0]})")
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load full weights into a plain or FSDP2-sharded model, non-strictly; (missing, unexpected) keys."""
    if not is_sharded(model):
        missing, unexpected = model.load_state_dict(state, strict=False)
        return list(missing), list(unexpected)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)
