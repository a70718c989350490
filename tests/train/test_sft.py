import json
import math

import pytest
import torch

from bitnet_rl.errors import UserError
from bitnet_rl.quant.schedule import lambda_at
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.train.sft import aggregate, run_sft, token_losses

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def recipe(out, **sections):
    data = {
        "out": str(out),
        "model": {"tiny": TINY},
        "quant": {"schedule": {"kind": "linear", "warmup_steps": 8}},
        "data": {"path": "demo", "demo_size": 400, "max_length": 32, "val_fraction": 0.05},
        "optimizer": {"lr": 3e-3},
        "train": {"max_steps": 12, "batch_size": 16},
        "logging": {"every": 1, "progress": False, "health_every": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(Recipe, data, "test")


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_aggregation_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert aggregate(losses, mask, "sum").item() == 1 + 2 + 5 + 6
    assert aggregate(losses, mask, "mean").item() == pytest.approx((1 + 2 + 5 + 6) / 4)


def test_token_losses_match_manual_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 3, -100, 1]])
    losses, mask = token_losses(logits, labels)
    # position t predicts labels[t+1]: targets (t=0 → 3), (t=2 → 1); t=1 is masked
    logp = torch.log_softmax(logits[0], -1)
    assert mask.tolist() == [[True, False, True]]
    assert losses[0, 0].item() == pytest.approx(-logp[0, 3].item(), rel=1e-6)
    assert losses[0, 2].item() == pytest.approx(-logp[2, 1].item(), rel=1e-6)


def test_loss_falls_and_lambda_follows_schedule(tmp_path):
    final = run_sft(recipe(tmp_path, train={"max_steps": 40}))
    baseline, *rows = read_metrics(tmp_path)
    assert baseline["step"] == 0 and baseline["val_loss"] > rows[-1]["val_loss"]  # validation before the first step
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:  # step s was trained with λ(s - 1)
        assert r["lambda"] == pytest.approx(lambda_at(r["step"] - 1, "linear", 8))
    first = sum(r["token_loss"] for r in rows[:3]) / 3
    last = sum(r["token_loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first
    assert "val_loss" in rows[-1] and math.isclose(rows[-1]["val_ppl"], math.exp(rows[-1]["val_loss"]), rel_tol=1e-6)
    assert "flip_rate" in rows[3] and 0 <= rows[3]["flip_rate"] <= 1
    assert (final / "config.json").is_file() and (final / "trainer_state" / "state.json").is_file()


def test_resume_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(recipe(a))
    run_sft(recipe(b, checkpoint={"every": 6, "keep_last": 2}))
    # throw away the second half of run b, then resume it from its step-6 checkpoint
    run_sft(recipe(b, checkpoint={"every": 6, "keep_last": 2}), resume=str(b / "checkpoints" / "step-0000006"))
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_b] == list(range(0, 13))  # step 0: validation before training
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        assert rb["lambda"] == ra["lambda"] and rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
        # same weights, data and optimizer state: equal up to float summation order (1e-5 relative)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_resume_latest_and_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        run_sft(recipe(tmp_path / "x"), resume="latest")
    with pytest.raises(UserError, match="not a bitnet-rl checkpoint"):
        run_sft(recipe(tmp_path / "x"), resume=str(tmp_path))


def test_bad_data_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2.*completion"):
        run_sft(recipe(tmp_path / "o", data={"path": str(bad), "format": "prompt_completion"}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no records"):
        run_sft(recipe(tmp_path / "o", data={"path": str(empty)}))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="broken.jsonl:2"):
        run_sft(recipe(tmp_path / "o", data={"path": str(broken)}))


def test_sum_aggregation_trains(tmp_path):
    run_sft(recipe(tmp_path, train={"max_steps": 3, "loss_aggregation": "sum"}, optimizer={"lr": 1e-4}))
    rows = read_metrics(tmp_path)[1:]  # [0] is the step-0 validation
    # the summed objective is the mean token loss times the number of trainable tokens
    assert all(r["loss"] > 10 * r["token_loss"] for r in rows)
