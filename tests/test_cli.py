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


@pytest.mark.parametrize(
    "args, match",
    [
        (["info", "/nonexistent/model"], "model directory not found"),
        (["recipe", "show", "/nonexistent.yaml"], "recipe not found"),
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
