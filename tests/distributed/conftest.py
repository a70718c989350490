from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def rl_policy(tmp_path_factory) -> Path:
    """A tiny SFT policy (40 steps) that earns some reward, so GRPO groups have spread."""
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.sft import run_sft

    out = tmp_path_factory.mktemp("rl_policy")
    overrides = ["train.max_steps=40", "data.demo_size=1000", "quant.schedule.warmup_steps=20", "logging.progress=false", "checkpoint.every=0", f"out={out}"]
    return run_sft(load_recipe("recipes/tiny/sft.yaml", overrides, stage="sft"))
