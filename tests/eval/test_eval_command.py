"""`bitnet-rl eval` end to end on tiny models: report files, plots, defaults from a run, bad inputs."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from bitnet_rl.cli import app

runner = CliRunner()
REWARD = "python:reward_models/demo_task.py:reward"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    """A fake PPO run: OUT/final (a perturbed tiny model), OUT/recipe.json naming the reward, the
    prompts and the starting model, and OUT/metrics.jsonl."""
    from bitnet_rl.models.io import load_policy, load_tokenizer, save_checkpoint

    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    model = load_policy(tiny_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
    save_checkpoint(model, load_tokenizer(tiny_dir), out / "final")
    recipe = {"model": {"path": str(tiny_dir)}, "ppo": {"rewards": [{"source": REWARD, "weight": 1.0}], "prompts": "demo"}}
    (out / "recipe.json").write_text(json.dumps(recipe))
    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "loss": 1.0 / s, "lambda": 1.0, "flip_rate": 0.001} for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args), "--no-progress"])


def test_report_with_reference_rewards_kl_perplexity_and_plots(tiny_dir, run_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "sort: 3 1 2 =", "completion": " 1 2 3"}\n{"prompt": "sort: 2 1 =", "completion": " 1 2"}\n')
    out = tmp_path / "report"
    result = _eval(run_dir / "final", "--ref", tiny_dir, "--reward", REWARD, "--prompts", "demo", "--num-prompts", 12, "--n-samples", 2, "--max-new-tokens", 5, "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    assert "| win rate vs reference (95% CI) |" in result.output and "| pass@2 |" in result.output
    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("## Samples") < report.index("## Plots")
    assert "KL per token" in report and "perplexity on --data" in report and "ternary codes" in report
    assert report.split("## Samples")[1].count("| sort:") == 10  # 10 prompts side by side
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(run_dir / "final") and results["reference_path"] == str(tiny_dir)
    assert results["command"][0] == "bitnet-rl"  # the real command line (sys.argv; pytest's under CliRunner)
    assert results["settings"]["seed"] == 0 and results["settings"]["n_samples"] == 2
    assert results["policy"]["reward"]["total"]["n"] == 24 and results["reference"]["reward"]["total"]["n"] == 24
    win = results["comparison"]["win_rate"]
    assert win["wins"] + win["ties"] + win["losses"] == 24 and win["ci_low"] <= win["win_rate"] <= win["ci_high"]
    assert results["comparison"]["kl"]["k3_token"] > 0  # a perturbed copy is not the reference
    assert set(results["policy"]["pass"]) == {"pass@1", "pass@2", "mean@2"}  # is_correct sits beside the reward
    assert results["policy"]["perplexity"]["tokens"] == 7  # completion tokens + EOS only: 3+1 and 2+1
    for name in ("rewards.png", "lengths.png", "training.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    import matplotlib.image

    assert matplotlib.image.imread(out / "training.png").shape[2] in (3, 4)


def test_defaults_come_from_the_run(run_dir, tiny_dir):
    result = _eval(run_dir, "--num-prompts", 4, "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["reference_path"] == str(tiny_dir)  # the run's starting model
    assert list(results["policy"]["reward"]) == [REWARD, "total"]  # the run's reward source
    assert (run_dir / "eval" / "training.png").is_file()


def test_without_reference_on_the_policy_backend(run_dir, tmp_path):
    result = _eval(run_dir, "--ref", "none", "--num-prompts", 4, "--max-new-tokens", 3, "--backend", "policy", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["reference_path"] is None and "comparison" not in results
    assert results["policy"]["reward"]["total"]["n"] == 4 and results["settings"]["backend"] == "policy"


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, tiny_dir):
    from bitnet_rl.data.tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("bad")
    rm = root / "rm"
    shutil.copytree(tiny_dir, rm)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["BitNetForSequenceClassification"]}))
    other = root / "other_tokenizer"
    shutil.copytree(tiny_dir, other)
    train_tiny_tokenizer(["completely different words here " * 3, "zebra quartz"], vocab_size=300).save_pretrained(other)
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"question": "sort: 1 2 ="}\n')
    typed = root / "typed.jsonl"
    typed.write_text('{"prompt": 42}\n')
    return {"rm": rm, "other": other, "prompts": prompts, "typed": typed}


@pytest.mark.parametrize(
    "case, match",
    [
        ("rm_as_ckpt", "is a reward model"),
        ("other_tokenizer", "tokenizer differs"),
        ("prompts_format", "missing field 'prompt'"),
        ("prompt_type", "prompt must be a non-empty string or a list of"),
        ("k_zero", "--n-samples must be at least 1"),
        ("nothing", "nothing to evaluate"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(case, match, tiny_dir, bad_dirs):
    args = {
        "rm_as_ckpt": [bad_dirs["rm"], "--prompts", "demo", "--reward", REWARD],
        "other_tokenizer": [tiny_dir, "--ref", bad_dirs["other"], "--prompts", "demo", "--reward", REWARD],
        "prompts_format": [tiny_dir, "--prompts", bad_dirs["prompts"], "--reward", REWARD],
        "prompt_type": [tiny_dir, "--prompts", bad_dirs["typed"], "--reward", REWARD],
        "k_zero": [tiny_dir, "--prompts", "demo", "--reward", REWARD, "--n-samples", 0],
        "nothing": [tiny_dir],
    }[case]
    result = _eval(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in result.output


def test_checkpoint_saved_during_lambda_warmup_is_evaluated_at_its_lambda(tiny_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "final")
    (run / "final" / "trainer_state").mkdir()
    (run / "final" / "trainer_state" / "state.json").write_text(json.dumps({"step": 30}))
    (run / "recipe.json").write_text(json.dumps({"quant": {"schedule": {"kind": "linear", "warmup_steps": 100}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss": 1.0}) + "\n")
    result = _eval(run, "--prompts", "demo", "--num-prompts", 2, "--max-new-tokens", 2, "--backend", "policy", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["lambda"]["policy"] == pytest.approx(0.3)  # linear schedule at step 30 of 100
    assert any("λ = 0.300" in note for note in results["notes"])


def test_chat_trained_policy_gets_string_prompts_through_its_template(tiny_dir):
    """A checkpoint recorded as chat-trained is sampled with the chat template, as training rendered it."""
    from bitnet_rl.data.prompts import encode_prompt
    from bitnet_rl.eval import core
    from bitnet_rl.models.io import set_prompt_format

    model = core.load_model("policy", tiny_dir, "policy", "cpu", 2, 64)
    prompts = ["sort: 3 1 2 =", "sort: 2 1 ="]
    plain = core.draw(model, prompts, 1, 0.0, 2, 0, 2)
    assert plain.prompt_ids == [encode_prompt(model.tokenizer, p, False) for p in prompts]
    set_prompt_format(model.module, "chat")
    chat = core.draw(model, prompts, 1, 0.0, 2, 0, 2)
    assert chat.prompt_ids == [encode_prompt(model.tokenizer, p, True) for p in prompts]
    assert chat.prompt_ids != plain.prompt_ids
