"""Worker of the 2-process GRPO test (`accelerate launch grpo_worker.py RECIPE.json`): the
recipe's PPO run with row-seeded sampling (row_seeded.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from row_seeded import patch  # noqa: E402

from bitnet_rl.recipe import Recipe  # noqa: E402
from bitnet_rl.train.ppo import run_ppo  # noqa: E402

recipe = Recipe.model_validate(json.loads(Path(sys.argv[1]).read_text()))
patch(recipe.ppo.samples_per_prompt)
run_ppo(recipe)
