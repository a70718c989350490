"""Per-command recipe classes: each command validates against its own class, which holds only the
sections it reads and its defaults; `recipe show` prints exactly what the command runs with."""

import json

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.errors import UserError
from bitnet_rl.recipe import STAGE_DEFAULTS, STAGE_RECIPES, DPORecipe, PPORecipe, Recipe, SFTRecipe, read_yaml, validate


def test_a_dpo_key_is_refused_by_the_sft_class_itself():
    with pytest.raises(ValidationError) as err:
        SFTRecipe.model_validate({"dpo": {"beta": 0.2}})
    assert err.value.errors()[0]["type"] == "extra_forbidden" and err.value.errors()[0]["loc"] == ("dpo",)
    assert "dpo" not in SFTRecipe.model_fields and not hasattr(SFTRecipe(), "ppo")
    with pytest.raises(UserError, match=r"^r.yaml: dpo.beta is a `bitnet-rl dpo` key, but this recipe runs `bitnet-rl sft`$"):
        validate(SFTRecipe, {"dpo": {"beta": 0.2}}, "r.yaml")
    with pytest.raises(UserError, match=r"^r.yaml: rollout.top_k is a `bitnet-rl ppo` key, but this recipe runs `bitnet-rl dpo`$"):
        validate(DPORecipe, {"rollout": {"top_k": 5}}, "r.yaml")
    with pytest.raises(UserError, match=r"^r.yaml: unknown key dpo.nonsense$"):  # a command's own section keeps its checks
        validate(DPORecipe, {"dpo": {"nonsense": 1}}, "r.yaml")


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "ppo"])
def test_each_class_holds_its_commands_defaults(stage):
    """The class's defaults are `STAGE_DEFAULTS[stage]` over the schema's, also under a partial section."""
    cls = STAGE_RECIPES[stage]
    expected = json.loads(Recipe().model_dump_json())
    for section, values in STAGE_DEFAULTS[stage].items():
        if isinstance(values, dict):
            expected[section].update(values)
        else:
            expected[section] = values
    resolved = json.loads(cls().model_dump_json())
    assert resolved == {k: v for k, v in expected.items() if k in cls.model_fields}
    partial = cls.model_validate({"optimizer": {"betas": [0.9, 0.99]}})
    assert partial.optimizer.lr == cls().optimizer.lr and partial.optimizer.betas == (0.9, 0.99)


def test_an_older_whole_recipe_dump_loads_into_each_command():
    """An older run's recipe.json holds every section; those of other commands at their defaults pass."""
    dump = json.loads(Recipe(train={"max_steps": 3}).model_dump_json())
    for cls in STAGE_RECIPES.values():
        assert cls.model_validate(dump).train.max_steps == 3


def test_the_run_identity_hash_is_that_of_the_whole_recipe():
    """A run started before the per-command classes (hashed as a whole Recipe) resumes without a warning."""
    from bitnet_rl.train.rundir import recipe_hash

    data = {"ppo": {"kl_coef": 0.2}, "train": {"seed": 3}}
    whole = validate(Recipe, {**STAGE_DEFAULTS["ppo"], **data}, "test")
    assert recipe_hash(PPORecipe.model_validate(data)) == recipe_hash(whole)


@pytest.mark.parametrize(
    "stage, text, command",
    [
        ("dpo", "dpo:\n  beta: 0.3\ndata:\n  max_length: 256\n", ["dpo", "--prefs", "demo"]),
        ("ppo", "ppo:\n  advantage: grpo\n  samples_per_prompt: 4\noptimizer:\n  lr: 3.0e-6\n", ["ppo"]),
        ("rm", "train:\n  max_steps: 7\n", ["rm", "--prefs", "demo"]),
    ],
)
def test_recipe_show_prints_exactly_what_the_command_runs_with(tmp_path, monkeypatch, stage, text, command):
    """`recipe show` against the class's resolved values and against the recipe the command hands to its stage."""
    import importlib

    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["recipe", "show", str(path), "train.seed=5", "--stage", stage])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    resolved = json.loads(STAGE_RECIPES[stage].model_validate({**read_yaml(path), "train": {**read_yaml(path).get("train", {}), "seed": 5}}).model_dump_json())
    assert shown == resolved
    assert list(shown) == list(STAGE_RECIPES[stage].model_fields)  # only the sections the command reads
    module = importlib.import_module(f"bitnet_rl.train.{stage}")
    received = {}

    def fake_run(recipe, **_):
        received["recipe"] = recipe
        return tmp_path / "final"

    monkeypatch.setattr(module, f"run_{stage}", fake_run)
    result = CliRunner().invoke(app, [*command, "--recipe", str(path), "train.seed=5"])
    assert result.exit_code == 0, result.output
    ran = received["recipe"]
    assert isinstance(ran, STAGE_RECIPES[stage])
    expected = shown | {"data": {**shown["data"], "path": "demo"}} if "--prefs" in command else shown  # --prefs is data.path
    assert json.loads(ran.model_dump_json()) == expected
