"""The README's generated blocks (recipe keys, per-command defaults, command options) are current."""

import re
from pathlib import Path

from bitnet_rl.reference import command_defaults_markdown, generated_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_generated_blocks_are_current():
    text = README.read_text()
    for name, body in generated_blocks().items():
        block = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
        assert block is not None, f"README has no {name} block"
        assert block.group(1) == body, f"README {name} block is stale: run `python -m bitnet_rl.reference README.md`"
    assert "PydanticUndefined" not in text


def test_command_defaults_are_the_commands_own():
    """Checked against the recipe each command actually resolves without a recipe file."""
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.dpo import DPO_DEFAULTS
    from bitnet_rl.train.ppo import PPO_DEFAULTS

    table = command_defaults_markdown()
    dpo, ppo = load_recipe(None, base=DPO_DEFAULTS), load_recipe(None, base=PPO_DEFAULTS)
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())}
    key, base, on_dpo, on_rm, on_ppo = rows["`optimizer.lr`"]
    assert (on_dpo, on_ppo) == (f"`{dpo.optimizer.lr}`", f"`{ppo.optimizer.lr}`")
    assert rows["`scheduler.kind`"][4] == f"`{ppo.scheduler.kind}`" == "`constant`"
