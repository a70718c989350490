"""Worker of the FSDP2 loop tests (`accelerate launch fsdp_worker.py sft:RECIPE.json ppo:RECIPE.json ...`): the SFT,
DPO or RM loop or the PPO trainer with the policy sharded by torch's `fully_shard` (per decoder layer, then
the root) where accelerate's FSDP2 plugin would shard it on GPUs (accelerate runs CPU workers with
DDP only). PPO samples row-seeded (row_seeded.py)."""

import json
import sys
from pathlib import Path

from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))

import row_seeded  # noqa: E402

import bitnet_rl.train.loop as loop  # noqa: E402
import bitnet_rl.train.run as run_module  # noqa: E402
import bitnet_rl.train.ppo as ppo  # noqa: E402
from bitnet_rl.recipe import Recipe  # noqa: E402
from bitnet_rl.train.dpo import run_dpo  # noqa: E402
from bitnet_rl.train.rm import run_rm  # noqa: E402
from bitnet_rl.train.sft import run_sft  # noqa: E402

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


run_module.make_accelerator = sharding_accelerator  # the run object builds every stage's accelerator
make_generator = ppo.make_generator
for job in sys.argv[1:]:  # sft:RECIPE.json or ppo:RECIPE.json, in turn
    stage, spec = job.split(":", 1)
    recipe = Recipe.model_validate(json.loads(Path(spec).read_text()))
    if stage in ("sft", "dpo", "rm"):
        {"sft": run_sft, "dpo": run_dpo, "rm": run_rm}[stage](recipe)
    else:
        ppo.make_generator = make_generator
        row_seeded.patch(recipe.ppo.samples_per_prompt)
        ppo.run_ppo(recipe)
