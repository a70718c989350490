"""Worker of the FSDP2 loop test (`accelerate launch fsdp_sft_worker.py RECIPE.json`): the SFT loop
with the policy sharded by torch's `fully_shard` (per decoder layer, then the root) where
accelerate's FSDP2 plugin would shard it on GPUs; accelerate runs CPU workers with DDP only."""

import json
import sys
from pathlib import Path

from torch.distributed.fsdp import fully_shard

import bitnet_rl.train.loop as loop
from bitnet_rl.recipe import Recipe
from bitnet_rl.train.sft import run_sft

make_accelerator = loop.make_accelerator


def sharding_accelerator(recipe, out_dir):
    accelerator = make_accelerator(recipe, out_dir)

    def prepare(model, optimizer):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer.param_groups[0]["params"] = list(model.parameters())  # the shards (no optimizer state yet)
        return model, optimizer

    accelerator.prepare = prepare
    return accelerator


loop.make_accelerator = sharding_accelerator
recipe = Recipe.model_validate(json.loads(Path(sys.argv[1]).read_text()))
run_sft(recipe, resume=sys.argv[2] if len(sys.argv) > 2 else None)
