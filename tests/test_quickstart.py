from pathlib import Path

from bitnet_rl.quickstart import DPO_RECIPE, PPO_RECIPE, RM_RECIPE, SFT_RECIPE, TINY_SHAPE, format_table
from bitnet_rl.recipe import read_yaml

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


def _without(data, *keys):
    return {k: v for k, v in data.items() if k not in keys}


def test_shipped_tiny_recipes_are_the_quickstart_stages():
    sft = read_yaml(ROOT / "sft.yaml")
    assert sft["model"]["tiny"] == TINY_SHAPE
    assert _without(sft, "out", "model") == SFT_RECIPE
    assert _without(read_yaml(ROOT / "dpo.yaml"), "out", "model") == DPO_RECIPE
    assert _without(read_yaml(ROOT / "rm.yaml"), "out", "model") == RM_RECIPE
    ppo = read_yaml(ROOT / "ppo.yaml")
    assert _without(ppo, "out", "model") == {**PPO_RECIPE, "ppo": {**PPO_RECIPE["ppo"], "rewards": ppo["ppo"]["rewards"]}}


def test_table_formatting():
    row = {"stage": "ppo", "accuracy": 0.5, "reward": 0.25, "sampled_reward": 0.125, "heldout_loss": 1.5, "kl": 0.75, "seconds": 3.2}
    assert "| ppo | 50.0% | 0.250 | 0.125 | — | 1.500 | 0.750 | 3 s |" in format_table([row])
    assert "| ppo | 50.0% | 0.250 | 0.125 | 62.5% | 1.500 | 0.750 | 3 s |" in format_table([{**row, "win_rate": 0.625}])


def test_shipped_grpo_recipe_is_the_quickstart_grpo_stage():
    from bitnet_rl.quickstart import GRPO_RECIPE

    grpo = read_yaml(ROOT / "grpo.yaml")
    assert _without(grpo, "out", "model") == {**GRPO_RECIPE, "ppo": {**GRPO_RECIPE["ppo"], "rewards": grpo["ppo"]["rewards"]}}
