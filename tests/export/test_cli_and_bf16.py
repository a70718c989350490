"""`bitnet-rl export` on the command line, and the bf16 format through plain transformers."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from bitnet_rl import load_policy
from bitnet_rl.cli import app

runner = CliRunner()


def test_cli_export_prints_sizes(trained_dir, tmp_path):
    result = runner.invoke(app, ["export", str(trained_dir.parent), "--format", "packed", "--out", str(tmp_path / "p")])  # a run dir
    assert result.exit_code == 0, result.output
    size = (tmp_path / "p" / "model.safetensors").stat().st_size
    assert "model.safetensors" in result.output and f"{size / 1024:,.2f} KiB" in result.output
    assert "smaller than the checkpoint" in result.output
    again = runner.invoke(app, ["export", str(trained_dir), "--format", "packed", "--out", str(tmp_path / "p")])
    assert again.exit_code == 0  # an existing export is replaced atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_cli_export_user_errors(trained_dir, tmp_path):
    for args, message in [
        (["export", str(trained_dir), "--format", "onnx", "--out", str(tmp_path / "x")], "unknown value 'onnx'"),
        (["export", str(tmp_path / "missing"), "--format", "bf16", "--out", str(tmp_path / "x")], "model directory not found"),
        (["export", str(trained_dir), "--format", "gguf", "--out", str(tmp_path / "x")], "has its own lm_head"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        last = result.output.strip().splitlines()[-1]  # (transformers' loading bar may precede it)
        assert last.startswith("error: ") and message in last and "Traceback" not in result.output


def test_bf16_export_is_an_online_checkpoint(trained_dir, tmp_path, tokenizer, no_compile):
    from transformers import AutoModelForCausalLM

    from bitnet_rl.export import export_checkpoint

    result = export_checkpoint(trained_dir, "bf16", tmp_path / "bf16")
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "online"
    assert config["dtype"] == "bfloat16"
    ids = tokenizer(["sort: 3 1 2 =", "sort: 7 7 0 ="], return_tensors="pt", padding=True).input_ids
    plain = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()  # AutoBitLinear online
    ours = load_policy(result.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    original = dict(load_policy(trained_dir).named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, original[name].to(torch.bfloat16).float())  # master weights, rounded to bf16
