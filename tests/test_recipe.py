import pytest

from bitnet_rl.errors import UserError
from bitnet_rl.recipe import Recipe, load_recipe
from bitnet_rl.reference import reference_markdown


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  lr: 0.001\nquant:\n  schedule:\n    kind: linear\n    warmup_steps: 100\n")
    recipe = load_recipe(path, ["optimizer.lr=3e-4", "quant.granularity=per_group", "train.max_steps=7"])
    assert recipe.optimizer.lr == 3e-4
    assert recipe.optimizer.betas == (0.9, 0.95) and recipe.optimizer.weight_decay == 0.0
    assert recipe.quant.schedule.kind == "linear" and recipe.quant.schedule.warmup_steps == 100
    assert recipe.quant.granularity == "per_group" and recipe.train.max_steps == 7
    assert load_recipe(None).model_dump() == Recipe().model_dump()


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("optimizer:\n  learning_rate: 1\n", [], r"r.yaml: unknown key optimizer.learning_rate"),
        ("train:\n  max_steps: many\n", [], r"r.yaml: train.max_steps: .*integer"),
        ("quant:\n  granularity: per_row\n", [], r"quant.granularity"),
        ("", ["quant.schedule.value=1.5"], r"quant.schedule.value"),
        ("", ["nonsense"], r"expected key.sub=value$"),
        ("", ["recipes/tiny/dpo.yaml"], r"expected key.sub=value \(a recipe file is passed with --recipe FILE\)"),
        ("optimizer: [1, 2\n", [], r"r.yaml:\d+: invalid YAML"),
        ("- a\n- b\n", [], r"must be a mapping"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, overrides, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_recipe(path, overrides)


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_reference_lists_every_leaf_key():
    table = reference_markdown()
    for key in ("optimizer.lr", "quant.schedule.warmup_steps", "train.loss_aggregation", "logging.report_to"):
        assert f"`{key}`" in table


def test_shipped_recipes_validate():
    from pathlib import Path

    from bitnet_rl.recipe import read_yaml, validate

    root = Path(__file__).resolve().parents[1] / "bitnet_rl" / "recipes"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for file in files:
        validate(Recipe, read_yaml(file), str(file))


def test_shipped_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    """`recipes/tiny/grpo.yaml` (the README's spelling) and `tiny/grpo.yaml` name the packaged file
    from any working directory; a local file of that name wins."""
    from bitnet_rl.recipe import SHIPPED_RECIPES, resolve_recipe_path, shipped_recipes

    monkeypatch.chdir(tmp_path)
    shipped = SHIPPED_RECIPES / "tiny" / "grpo.yaml"
    assert resolve_recipe_path("recipes/tiny/grpo.yaml") == shipped == resolve_recipe_path("tiny/grpo.yaml")
    assert load_recipe("recipes/tiny/grpo.yaml", stage="ppo").ppo.advantage == "grpo"
    assert "recipes/tiny/grpo.yaml" in shipped_recipes() and "recipes/bitnet-2b4t/sft.yaml" in shipped_recipes()
    (tmp_path / "recipes" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes" / "tiny" / "grpo.yaml").write_text("optimizer:\n  lr: 0.5\n")
    assert load_recipe("recipes/tiny/grpo.yaml").optimizer.lr == 0.5
    with pytest.raises(UserError, match=r"recipe not found: tiny/nope.yaml \(shipped recipes: recipes/bitnet-2b4t/dpo.yaml"):
        load_recipe("tiny/nope.yaml")


def test_readme_recipe_reference_is_current():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- recipe-reference:start -->\n(.*)\n<!-- recipe-reference:end -->", readme, re.S)
    assert block is not None
    assert block.group(1) == reference_markdown(), "README recipe reference is stale: paste `bitnet-rl recipe reference`"


def test_overrides_never_change_the_base_defaults():
    base = {"train": {"max_steps": 500}}
    assert load_recipe(None, ["train.max_steps=3"], base=base).train.max_steps == 3
    assert base == {"train": {"max_steps": 500}}


@pytest.mark.parametrize(
    "stage, text, overrides, match",
    [
        ("sft", "dpo:\n  beta: 0.2\n", [], r"r.yaml: dpo.beta is a `bitnet-rl dpo` key, but this recipe runs `bitnet-rl sft`"),
        ("sft", "", ["ppo.kl_coef=0.1"], r"ppo.kl_coef is a `bitnet-rl ppo` key, but this recipe runs `bitnet-rl sft`"),
        ("dpo", "rollout:\n  temperature: 0.7\n", [], r"rollout.temperature is a `bitnet-rl ppo` key"),
        ("rm", "dpo:\n  beta: 0.2\n", [], r"dpo.beta is a `bitnet-rl dpo` key, but this recipe runs `bitnet-rl rm`"),
        ("ppo", "dpo: 3\n", [], r"r.yaml: dpo is a `bitnet-rl dpo` key, but this recipe runs `bitnet-rl ppo`"),
        ("sft", "dpo:\n  beta: 0.1\n  loss_type: ipo\n", [], r"dpo.loss_type is a `bitnet-rl dpo` key"),
    ],
)
def test_a_key_of_another_command_is_an_error(tmp_path, stage, text, overrides, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_recipe(path, overrides, stage=stage)


def test_a_full_dump_with_other_sections_at_their_defaults_loads(tmp_path):
    """`recipe show`/`model_dump` of a whole recipe carries every section at its defaults: harmless."""
    import json

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(json.loads(Recipe(train={"max_steps": 3}).model_dump_json())))
    assert load_recipe(path, stage="sft").train.max_steps == 3


def test_stage_defaults_apply_under_the_file_and_overrides(tmp_path):
    from bitnet_rl.recipe import STAGE_DEFAULTS

    path = tmp_path / "r.yaml"
    path.write_text("dpo:\n  beta: 0.2\ntrain:\n  batch_size: 4\n")
    recipe = load_recipe(path, ["data.max_length=256"], stage="dpo")
    expected = STAGE_DEFAULTS["dpo"]
    assert recipe.optimizer.lr == expected["optimizer"]["lr"] != Recipe().optimizer.lr  # the command's default, not the schema's
    assert recipe.train.max_steps == expected["train"]["max_steps"] and recipe.train.batch_size == 4  # the file wins
    assert recipe.data.max_length == 256 and recipe.data.max_prompt_length == expected["data"]["max_prompt_length"]
    assert recipe.dpo.beta == 0.2
    assert STAGE_DEFAULTS["dpo"]["data"]["max_length"] == 1024  # loading never edits the defaults


@pytest.mark.parametrize("sections, stage", [({}, "sft"), ({"dpo": {}}, "dpo"), ({"ppo": {"kl_coef": 0.1}}, "ppo"), ({"rollout": {}}, "ppo")])
def test_infer_stage(sections, stage):
    from bitnet_rl.recipe import infer_stage

    assert infer_stage({"optimizer": {"lr": 1e-3}, **sections}) == stage
