
import pytest
import torch

from bitnet_rl.errors import UserError
from bitnet_rl.rewards import RewardError, WeightedReward, load_reward, load_rewards


def test_python_reward_by_file_and_module():
    by_file = load_reward("python:reward_models/demo_task.py:reward")
    by_module = load_reward("reward_models.demo_task:reward")
    prompts, completions = ["sort: 3 1 2 =", "sort: 3 1 2 ="], [" 1 2 3", " 2 1 3"]
    expected = torch.tensor([1.0, 0.85])
    torch.testing.assert_close(by_file.score(prompts, completions), expected)
    torch.testing.assert_close(by_module.score(prompts, completions), expected)


def test_weighted_sum_by_hand():
    combined = load_rewards([(2.0, "reward_models.demo_task:reward"), (-1.0, "python:reward_models/demo_task.py:reward")])
    assert isinstance(combined, WeightedReward)
    torch.testing.assert_close(combined.score(["sort: 3 1 2 ="], [" 2 1 3"]), torch.tensor([0.85]))


def _write(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return f"python:{path}:reward"


@pytest.mark.parametrize(
    "body, match",
    [
        ("def reward(p, c, **m):\n    raise KeyError('boom')\n", r"my_reward.py:reward raised KeyError"),
        ("def reward(p, c, **m):\n    return [1.0]\n", r"returned 1 scores for 2"),
        ("def reward(p, c, **m):\n    return [1.0, float('nan')]\n", r"non-finite score nan at index 1"),
        ("def reward(p, c, **m):\n    return 'abc'\n", r"my_reward.py:reward"),
    ],
)
def test_bad_rewards_name_the_source(tmp_path, body, match):
    source = load_reward(_write(tmp_path, body))
    with pytest.raises(RewardError, match=match):
        source.score(["a", "b"], ["x", "y"])


def test_bad_specs(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_reward("python:nope.py:reward")
    with pytest.raises(UserError, match="has no function"):
        load_reward("python:reward_models/demo_task.py:nothing")
    with pytest.raises(UserError, match=r"reward\(x\) cannot be called as reward\(prompts, completions\)"):
        load_reward(_write(tmp_path, "def reward(x):\n    return [0.0]\n"))
    with pytest.raises(UserError, match="not a reward-model directory"):
        load_reward(str(tmp_path / "missing"))
