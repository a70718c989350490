"""Rewards written as Python functions: `python:reward_models/demo_task.py:reward` or `pkg.module:fn`.

The function's signature is `reward(prompts, completions, **meta) -> list[float]`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bitnet_rl.errors import UserError
from bitnet_rl.rewards.base import call_reward


def load_function(spec: str) -> Callable[..., Any]:
    """Resolve `[python:]path/to/file.py:fn` or `[python:]package.module:fn` to the function."""
    target = spec.removeprefix("python:")
    if ":" not in target:
        raise UserError(f"reward {spec!r}: expected python:FILE.py:FUNCTION or python:module.path:FUNCTION")
    location, name = target.rsplit(":", 1)
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise UserError(f"reward {spec!r}: file not found: {path}")
        module_name = f"bitnet_rl_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - user code
            raise UserError(f"reward {spec!r}: importing {path} raised {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as err:
            raise UserError(f"reward {spec!r}: cannot import {location} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {location} has no function {name!r}")
    try:
        signature = inspect.signature(fn)
        signature.bind(["prompt"], ["completion"])
    except TypeError:
        raise UserError(f"reward {spec!r}: {name}{signature} cannot be called as {name}(prompts, completions)") from None
    except ValueError:  # no signature to inspect (some builtins): the first call will tell
        pass
    return fn


class PythonReward:
    """A reward source backed by a user function."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        self.fn = load_function(spec)

    def score(self, prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> torch.Tensor:
        return call_reward(self.name, self.fn, prompts, completions, **meta)
