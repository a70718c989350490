import json

from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.eval.curves import curves, last_metrics_line


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")


def test_last_metrics_line_keeps_the_latest_value_of_each_key(tmp_path):
    _write(tmp_path / "metrics.jsonl", [
        {"step": 0, "val_loss": 3.0},
        {"step": 5, "loss": 2.5, "val_loss": 1.25, "lambda": 0.5},
        {"step": 10, "loss": 2.0, "lambda": 1.0, "sample": "text"},
    ])  # fmt: skip
    assert last_metrics_line(tmp_path) == "step 10: loss 2, val_loss 1.25, lambda 1"
    assert last_metrics_line(tmp_path / "missing") == ""


def test_curves_pick_the_keys_each_stage_logs(tmp_path):
    rows = [{"step": 0, "val_loss": 3.0}, {"step": 1, "loss": 2.0, "kl": 0.1, "lambda": 1.0}, {"step": 2, "loss": 1.0, "kl": 0.2, "lambda": 1.0}]
    found = curves(rows)
    assert found["loss"] == {"loss": [[1, 2], [2.0, 1.0]], "val_loss": [[0], [3.0]]}
    assert found["KL to reference"] == {"kl": [[1, 2], [0.1, 0.2]]} and "flip rate" not in found


def test_sft_command_ends_with_its_last_metrics(tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "recipes/tiny/sft.yaml", "--out", str(out), "train.max_steps=2", "logging.progress=false", "logging.health_every=0"]
    args += ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "data.demo_size=200"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("last metrics: step 2: loss ") and "val_loss" in lines[-2]
    assert lines[-1] == f"saved {out / 'final'}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]  # validation before the first step
