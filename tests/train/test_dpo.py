import json

import pytest
import torch

from bitnet_rl.data.prefs import tokenize_prefs
from bitnet_rl.data.demo import make_pref_records
from bitnet_rl.errors import UserError
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.recipe import DPOConfig, Recipe, validate
from bitnet_rl.train.dpo import DPO_DEFAULTS, DPOCollator, evaluate_pairs, make_reference, pair_logps, run_dpo

def dpo_recipe(out, model, **sections):
    data = {
        **DPO_DEFAULTS,
        "out": str(out),
        "model": {"path": str(model)},
        "data": {"path": "demo", "format": "prefs", "demo_size": 300, "max_length": 32, "max_prompt_length": 16, "val_fraction": 0.1},
        "optimizer": {"lr": 5e-3},
        "train": {"max_steps": 80, "batch_size": 16},
        "logging": {"progress": False, "health_every": 5},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(Recipe, data, "test")


def test_pair_logps_equal_a_manual_sum(sft_dir):
    model = load_policy(sft_dir).eval()
    tokenizer = load_tokenizer(sft_dir)
    examples = tokenize_prefs(make_pref_records(3, seed=5), tokenizer, 16, 32)
    batch = DPOCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch, average=False)
        for row, example in enumerate(examples):
            for side, got in (("chosen", chosen[row]), ("rejected", rejected[row])):
                ids = torch.tensor([example["prompt_ids"] + example[f"{side}_ids"]])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                start = len(example["prompt_ids"])
                manual = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
                assert got.item() == pytest.approx(manual, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("reference", ["ternary", "precompute"])
def test_dpo_raises_heldout_margin_and_accuracy(sft_dir, tmp_path, reference):
    recipe = dpo_recipe(tmp_path, sft_dir, dpo={"reference": reference})
    final = run_dpo(recipe)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # before: evaluate the starting policy on the same held-out pairs against itself (margin 0)
    tokenizer = load_tokenizer(sft_dir)
    from bitnet_rl.data.sft import train_val_split

    examples = tokenize_prefs(make_pref_records(300, seed=0), tokenizer, 16, 32)
    _, val = train_val_split(examples, 0.1, 0)
    start, end = load_policy(sft_dir).eval(), load_policy(final).eval()
    reference_model = make_reference(start, "ternary")
    cfg = DPOConfig()
    before = evaluate_pairs(start, reference_model, val, DPOCollator(tokenizer.pad_token_id), cfg)
    after = evaluate_pairs(end, reference_model, val, DPOCollator(tokenizer.pad_token_id), cfg)
    assert abs(before["val_margin"]) < 1e-4
    assert after["val_margin"] > 0.3 and after["val_accuracy"] >= 0.7  # chance is 0.5; before DPO it is 0
    assert rows[-1]["val_accuracy"] == pytest.approx(after["val_accuracy"], abs=0.05)
    assert rows[0]["step"] == 0 and abs(rows[0]["val_margin"]) < 1e-4  # validation before the first step: policy = reference
    assert rows[-1]["rewards/margin"] > rows[1]["rewards/margin"] + 0.2
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "lambda"):
        assert key in rows[1]


def test_dpo_resume_matches(sft_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_dpo(dpo_recipe(a, sft_dir, train={"max_steps": 8}))
    run_dpo(dpo_recipe(b, sft_dir, train={"max_steps": 8}, checkpoint={"every": 4}))
    # resume from the middle (`latest` would be OUT/final, at max_steps: an error, nothing left to train)
    run_dpo(dpo_recipe(b, sft_dir, train={"max_steps": 8}, checkpoint={"every": 4}), resume=str(b / "checkpoints" / "step-0000004"))
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(0, 9))
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)


def test_bad_preference_data(sft_dir, tmp_path):
    cases = {
        "missing.jsonl": ('{"prompt": "sort: 1 2 =", "chosen": " 1 2"}\n', r"missing.jsonl:1.*rejected"),
        "empty.jsonl": ('{"prompt": "sort: 1 2 =", "chosen": "", "rejected": " 2 1"}\n', r"empty.jsonl:1.*chosen"),
        "long.jsonl": ('{"prompt": "sort: ' + "1 " * 40 + '=", "chosen": " 1", "rejected": " 2"}\n', r"long.jsonl:1.*max_prompt_length"),
    }
    for name, (text, match) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UserError, match=match):
            run_dpo(dpo_recipe(tmp_path / "o", sft_dir, data={"path": str(path)}))
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "sort: 1 2 =", "chosen": " 1 2", "rejected": " 1 2"}\n' * 2 + '{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}\n' * 4)
    with pytest.warns(UserWarning, match="skipped 2"):
        run_dpo(dpo_recipe(tmp_path / "o", sft_dir, data={"path": str(same), "val_fraction": 0.0}, train={"max_steps": 1}))
