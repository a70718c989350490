import pytest

from bitnet_rl.recipe import Recipe, validate

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A tiny BitNet model after 30 SFT steps on the demo task (the start of DPO / RM tests)."""
    from bitnet_rl.train.sft import run_sft

    out = tmp_path_factory.mktemp("sft")
    recipe = {
        "out": str(out),
        "model": {"tiny": TINY},
        "data": {"path": "demo", "demo_size": 400, "max_length": 32},
        "optimizer": {"lr": 3e-3},
        "train": {"max_steps": 30, "batch_size": 16},
        "logging": {"progress": False, "health_every": 0},
    }
    return run_sft(validate(Recipe, recipe, "test"))
