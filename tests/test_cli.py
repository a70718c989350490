import json

import pytest
from typer.testing import CliRunner

from bitnet_rl.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "recipe"):
        assert command in result.output


def test_info_reports_counts_and_memory(tiny_dir):
    result = runner.invoke(app, ["info", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert "BitNetForCausalLM" in result.output
    assert "14 BitLinear layers" in result.output
    assert "2-bit packed" in result.output


def test_recipe_show_resolves_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  lr: 0.001\n")
    result = runner.invoke(app, ["recipe", "show", str(path), "train.max_steps=5"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.001" in result.output and "max_steps: 5" in result.output


def test_recipe_list_names_shipped_recipes_that_load():
    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0 and "recipes/tiny/grpo.yaml" in result.output.split()
    for name in result.output.split():
        assert runner.invoke(app, ["recipe", "show", name]).exit_code == 0, name


def test_recipe_show_prints_what_the_command_runs_with(tmp_path):
    """A DPO recipe shows DPO's own defaults (lr 1e-6, max_length 1024), not the schema's (1e-4, 512)."""
    import yaml

    path = tmp_path / "dpo.yaml"
    path.write_text("dpo:\n  beta: 0.2\n")
    result = runner.invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# what `bitnet-rl dpo` runs with")
    shown = yaml.safe_load(result.output)
    assert shown["optimizer"]["lr"] == 1e-6 and shown["data"]["max_length"] == 1024 and shown["dpo"]["beta"] == 0.2
    rm = yaml.safe_load(runner.invoke(app, ["recipe", "show", str(tmp_path / "dpo.yaml"), "--stage", "dpo"]).output)
    assert rm == shown
    path.write_text("train:\n  max_steps: 3\n")
    rm = yaml.safe_load(runner.invoke(app, ["recipe", "show", str(path), "--stage", "rm"]).output)
    assert rm["optimizer"]["lr"] == 1e-5 and rm["out"] == "runs/rm" and rm["train"]["max_steps"] == 3
    assert "dpo" not in rm and "ppo" not in rm and "rollout" not in rm and "dpo" in shown  # only what the command reads


@pytest.mark.parametrize(
    "args, match",
    [
        (["info", "/nonexistent/model"], "model directory not found"),
        (["recipe", "show", "/nonexistent.yaml"], "recipe not found"),
        (["recipe", "show", "recipes/tiny/sft.yaml", "--stage", "kto"], "--stage 'kto': use one of sft, dpo, rm, ppo"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in result.output


def test_bad_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a causal language model" in result.stderr


def test_generate_prompt_and_file(tiny_dir, tmp_path):
    result = runner.invoke(app, ["generate", str(tiny_dir), "--prompt", "sort: 3 1 2 =", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sort: 3 1 2 =")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort: 1 =" }\n{"prompt": "sort: 2 1 ="}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["generate", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["sort: 1 =", "sort: 2 1 ="]
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["tokens"] <= 3 for r in rows)


@pytest.mark.parametrize(
    "args, match",
    [
        (["generate", "/nonexistent", "--prompt", "x"], "model directory not found"),
        (["sft", "/nonexistent.yaml"], "recipe not found"),
        (["dpo", "--prefs", "demo"], "model.path is not set"),
        (["ppo", "--reward", "python:nope.py:f", "--model", "/nonexistent"], "model directory not found"),
        (["sft", "recipes/tiny/sft.yaml", "optimizer.learning_rate=1"], "unknown key optimizer.learning_rate"),
    ],
)
def test_training_commands_user_errors(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert match in result.stderr and "Traceback" not in result.output
