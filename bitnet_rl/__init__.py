"""bitnet-rl: fine-tune and align BitNet b1.58 models (ternary weights, int8 activations).

The public API is importable from the top level::

    from bitnet_rl import load_policy, prepare, BitLinear, set_lambda, lambda_at, PackedGenerator

Names are resolved lazily (PEP 562 module `__getattr__`): `import bitnet_rl` imports neither
torch nor transformers, so the command line starts fast; each name imports its module on
first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_policy": "bitnet_rl.models.io",
    "load_tokenizer": "bitnet_rl.models.io",
    "save_checkpoint": "bitnet_rl.models.io",
    "prepare": "bitnet_rl.integrations.prepare",
    "BitNetCallback": "bitnet_rl.integrations.callback",
    "BitLinear": "bitnet_rl.quant.bitlinear",
    "set_lambda": "bitnet_rl.quant.bitlinear",
    "lambda_at": "bitnet_rl.quant.schedule",
    "ternary_health": "bitnet_rl.quant.health",
    "PackedGenerator": "bitnet_rl.rollout",
    "QuantConfig": "bitnet_rl.recipe",
    "load_recipe": "bitnet_rl.recipe",
    "run_sft": "bitnet_rl.train.sft",
    "run_dpo": "bitnet_rl.train.dpo",
    "run_rm": "bitnet_rl.train.rm",
    "run_ppo": "bitnet_rl.train.ppo",
    "export_checkpoint": "bitnet_rl.export",
    "UserError": "bitnet_rl.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitnet_rl' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from bitnet_rl.errors import UserError
    from bitnet_rl.export import export_checkpoint
    from bitnet_rl.integrations.callback import BitNetCallback
    from bitnet_rl.integrations.prepare import prepare
    from bitnet_rl.models.io import load_policy, load_tokenizer, save_checkpoint
    from bitnet_rl.quant.bitlinear import BitLinear, set_lambda
    from bitnet_rl.quant.health import ternary_health
    from bitnet_rl.quant.schedule import lambda_at
    from bitnet_rl.recipe import QuantConfig, load_recipe
    from bitnet_rl.rollout import PackedGenerator
    from bitnet_rl.train.dpo import run_dpo
    from bitnet_rl.train.ppo import run_ppo
    from bitnet_rl.train.rm import run_rm
    from bitnet_rl.train.sft import run_sft
