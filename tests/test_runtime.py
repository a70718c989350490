import os

import pytest
import torch
from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.runtime import configure_progress, default_threads, set_threads


def test_default_threads_is_half_the_cpus_capped():
    cpus = len(os.sched_getaffinity(0))
    assert default_threads() == max(1, min(8, cpus // 2))


def test_threads_option_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["--threads", "3", "recipe", "reference"])
        assert result.exit_code == 0 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 3  # an explicit OMP_NUM_THREADS is left to torch
    finally:
        torch.set_num_threads(before)


def test_no_progress_silences_transformers_bars():
    from transformers.utils import logging as hf_logging

    try:
        configure_progress(False)
        assert not hf_logging.is_progress_bar_enabled()
        configure_progress(True)
        assert hf_logging.is_progress_bar_enabled()
    finally:
        configure_progress(True)


@pytest.mark.parametrize("progress, shown", [("false", False), ("true", True)])
def test_training_command_honours_logging_progress(tmp_path, progress, shown):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  tiny:\n    hidden_size: 32\n    num_hidden_layers: 1\n    num_attention_heads: 2\n    num_key_value_heads: 1\n"
        "    intermediate_size: 64\ndata:\n  path: demo\n  demo_size: 32\n  max_length: 32\n  val_fraction: 0\n"
        f"train:\n  max_steps: 1\n  batch_size: 4\nlogging:\n  health_every: 0\n  progress: {progress}\n"
    )
    try:
        result = CliRunner().invoke(app, ["sft", str(recipe), "--out", str(tmp_path / "o")])
        assert result.exit_code == 0, result.output
        assert ("Writing model shards" in result.stderr) is shown
    finally:
        configure_progress(True)
