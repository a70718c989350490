"""Rollout generation: the packed 2-bit generator and the policy's own `generate`."""

from __future__ import annotations

import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.rollout.output import RolloutOutput
from bitnet_rl.rollout.packed import PackedGenerator
from bitnet_rl.rollout.policy import PolicyGenerator

BACKENDS = ("packed", "policy")


def make_generator(policy: nn.Module, backend: str = "packed", **kwargs) -> PackedGenerator | PolicyGenerator:
    """The rollout generator of `backend` for `policy`.

    "packed": `PackedGenerator.from_model(policy, **kwargs)` (max_batch_size, max_seq_len, device, …);
    "policy": `PolicyGenerator(policy)` (kwargs are ignored).
    """
    if backend == "packed":
        return PackedGenerator.from_model(policy, **kwargs)
    if backend == "policy":
        return PolicyGenerator(policy)
    raise UserError(f"rollout.backend: unknown value {backend!r} (expected one of {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "PackedGenerator", "PolicyGenerator", "RolloutOutput", "make_generator"]
