import pytest


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tokenizer):
    """A tiny BitNet checkpoint after a few SFT steps (peaked logits, so greedy decoding has no near-ties)."""
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.sft import run_sft

    out = tmp_path_factory.mktemp("export_sft")
    recipe = {
        "out": str(out),
        "model": {"tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}},
        "data": {"path": "demo", "demo_size": 400, "max_length": 32},
        "optimizer": {"lr": 3e-3},
        "train": {"max_steps": 30, "batch_size": 16},
        "logging": {"progress": False, "health_every": 0},
    }
    return run_sft(validate(Recipe, recipe, "test"))
