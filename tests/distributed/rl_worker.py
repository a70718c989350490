"""Worker of the 2-process RL test (`accelerate launch rl_worker.py RECIPE.json ...`): each recipe's
PPO run in turn, with row-seeded sampling (row_seeded.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import row_seeded  # noqa: E402

import bitnet_rl.train.ppo as ppo  # noqa: E402
from bitnet_rl.recipe import Recipe  # noqa: E402

make_generator = ppo.make_generator
for spec in sys.argv[1:]:
    recipe = Recipe.model_validate(json.loads(Path(spec).read_text()))
    ppo.make_generator = make_generator
    row_seeded.patch(recipe.ppo.samples_per_prompt)
    ppo.run_ppo(recipe)
