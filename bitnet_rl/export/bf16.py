"""`bf16` export: master weights in bfloat16 with the online quantization config.

Exactly what `save_checkpoint` writes (atomically; no `trainer_state/`): plain transformers
loads it as an online-quantized BitNet model (AutoBitLinear), `load_policy` restores our
settings from the `bitnet_rl` key, and training can continue from it. Any scale granularity is
kept (plain transformers applies per-tensor scales; `save_checkpoint` warns about that).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from bitnet_rl.models.io import save_checkpoint


def write_bf16(policy: nn.Module, tokenizer, out: Path) -> Path:
    return save_checkpoint(policy.to(torch.bfloat16), tokenizer, out)
