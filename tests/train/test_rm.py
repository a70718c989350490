import json

import pytest
import torch

from bitnet_rl.data.demo import format_completion, make_prompts
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.rewards import load_reward
from bitnet_rl.train.rm import RM_DEFAULTS, bradley_terry_loss, run_rm

def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    import math

    expected = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(1 / (1 + math.exp(0.5)))]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, sft_dir):
    root = tmp_path_factory.mktemp("rm")
    sft = sft_dir
    recipe = validate(
        Recipe,
        {
            **RM_DEFAULTS,
            "out": str(root / "rm"),
            "model": {"path": str(sft)},
            "data": {"path": "demo", "format": "prefs", "demo_size": 600, "max_length": 32, "max_prompt_length": 16, "val_fraction": 0.1},
            "optimizer": {"lr": 1e-2},
            "train": {"max_steps": 80, "batch_size": 16},
            "logging": {"progress": False, "health_every": 0, "every": 10},
        },
        "test",
    )
    return run_rm(recipe), root / "rm"


def test_rm_learns_heldout_preferences(rm_dir):
    final, out = rm_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_accuracy"] > 0.75
    assert rows[0]["step"] == 0 and rows[-1]["val_loss"] < rows[0]["val_loss"]  # validation before the first step
    assert rows[-1]["loss"] < rows[1]["loss"]
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["count"] == 2 * 540


def test_learned_reward_is_packed_normalized_and_ranks(rm_dir):
    from bitnet_rl.models.frozen import PackedTernaryLinear
    from reward_models.demo_task import parse_prompt

    final, _ = rm_dir
    reward = load_reward(str(final))
    assert any(isinstance(m, PackedTernaryLinear) for m in reward.model.modules())
    prompts = make_prompts(64, seed=3)
    right = [format_completion(sorted(parse_prompt(p))) for p in prompts]
    wrong = [format_completion(sorted(parse_prompt(p))[::-1][:-1]) for p in prompts]  # reversed, one dropped
    good, bad = reward.score(prompts, right), reward.score(prompts, wrong)
    assert (good > bad).float().mean() > 0.8
    raw = reward.raw_scores(prompts, right)
    torch.testing.assert_close(good, (raw - reward.mean) / reward.std)


def test_bad_prefs_stop_before_the_model_loads(tmp_path, monkeypatch):
    """Unreadable preference data: one error naming the file and line, before any model is loaded."""
    import bitnet_rl.train.rm as rm_module
    from bitnet_rl.errors import UserError
    from bitnet_rl.models.tiny import tiny_bitnet

    model_dir = tmp_path / "tiny"
    tiny_bitnet(model_dir)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("not json\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the preference data was read")

    monkeypatch.setattr(rm_module, "load_scalar_model", no_model)
    data = {**RM_DEFAULTS["data"], "path": str(prefs)}
    recipe = validate(Recipe, {**RM_DEFAULTS, "out": str(tmp_path / "run"), "model": {"path": str(model_dir)}, "data": data}, "test")
    with pytest.raises(UserError, match=r"prefs.jsonl:1: invalid JSON"):
        run_rm(recipe)
