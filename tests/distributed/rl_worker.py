"""Worker of the 2-process RL test (`accelerate launch rl_worker.py RECIPE.json ...`): each recipe's
PPO run in turn, with row-seeded sampling (row_seeded.py). A run whose reward fails is expected to
stop with a RewardError on every rank: the rank writes `OUT/stopped-RANK` with the message."""

import os

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import row_seeded  # noqa: E402

import bitnet_rl.train.ppo as ppo  # noqa: E402
from bitnet_rl.recipe import Recipe  # noqa: E402
from bitnet_rl.rewards import RewardError  # noqa: E402
from bitnet_rl.train.prompt_skip import PromptSkipper  # noqa: E402

make_generator = ppo.make_generator
record = PromptSkipper.record
for spec in sys.argv[1:]:
    recipe = Recipe.model_validate(json.loads(Path(spec).read_text()))
    flags = Path(recipe.out) / f"skip-flags-{os.environ['RANK']}.jsonl"  # each rank's prompt-skip updates, compared by the test

    def logged(self, picked, dropped, flags=flags):
        record(self, picked, dropped)
        with flags.open("a") as f:
            f.write(json.dumps([picked, dropped.int().tolist()]) + "\n")

    PromptSkipper.record = logged
    ppo.make_generator = make_generator
    row_seeded.patch(recipe.ppo.samples_per_prompt)
    try:
        ppo.run_ppo(recipe)
    except RewardError as err:
        (Path(recipe.out) / f"stopped-{os.environ['RANK']}").write_text(str(err))
