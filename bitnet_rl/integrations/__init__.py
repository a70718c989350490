"""Use bitnet-rl's quantization inside other trainers (TRL, plain `transformers.Trainer`).

`prepare(model, quant=...)` swaps a causal LM's projections for BitLinear; `BitNetCallback`
applies the λ schedule every optimizer step and logs ternary health and flip rate.
"""

from bitnet_rl.integrations.callback import BitNetCallback
from bitnet_rl.integrations.prepare import prepare

__all__ = ["BitNetCallback", "prepare"]
