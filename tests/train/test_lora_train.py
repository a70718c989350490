"""DPO and GRPO with LoRA on the demo task (CPU, tiny): held-out reward rises, final/ is the merged ternary
model, the reference needs no second copy, and resume is exact."""

import json

import pytest
import torch

from bitnet_rl.data.demo import make_prompts
from bitnet_rl.eval.task import sample, task_metrics
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.quant.health import code_snapshot
from bitnet_rl.rewards import load_reward
from bitnet_rl.rollout import make_generator
from bitnet_rl.train.dpo import run_dpo

from .test_dpo import dpo_recipe

REWARD = "reward_models.demo_task:reward"
LORA = {"enabled": True, "r": 8, "alpha": 16}


def heldout_reward(model_dir, n=128) -> float:
    """Mean demo reward of greedy completions of `n` held-out prompts."""
    policy = load_policy(model_dir).eval()
    generator = make_generator(policy, "packed", max_batch_size=n, max_seq_len=48)
    drawn = sample(generator, load_tokenizer(model_dir), make_prompts(n, seed=11), 12, temperature=0.0, seed=3, batch_size=n)
    return task_metrics(drawn, load_reward(REWARD))["reward"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_with_pre_quant_lora_raises_heldout_preference_and_merges_ternary(sft_dir, tmp_path):
    final = run_dpo(dpo_recipe(tmp_path, sft_dir, lora=LORA, optimizer={"lr": 3e-3}, train={"max_steps": 60, "batch_size": 16}))
    log = rows(tmp_path)
    assert abs(log[0]["val_margin"]) < 1e-4 and log[0]["val_accuracy"] == 0  # B = 0 at the start: policy = base = reference
    # held-out implicit reward: seeds 0 and 1 reach margins 0.043 / 0.111 and accuracy 0.7 / 0.8 (chance 0.5)
    assert log[-1]["val_margin"] > 0.02 and log[-1]["val_accuracy"] >= 0.6, log[-1]
    first, last = log[1:11], log[-10:]
    assert sum(r["rewards/margin"] for r in last) > sum(r["rewards/margin"] for r in first)
    assert any(r.get("flip_rate", 0) > 0 for r in log)  # health sees Q(W + s·B·A) move
    # final/ is a plain ternary checkpoint (no adapter keys) whose codes differ from the start
    start, end = load_policy(sft_dir), load_policy(final)
    assert not any("lora" in k for k in end.state_dict())
    a, b = code_snapshot(start), code_snapshot(end)
    assert sum(int((a[k] != b[k]).sum()) for k in a) > 0


def test_dpo_lora_resume_is_exact(sft_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = {"lora": LORA, "optimizer": {"lr": 3e-3}}
    run_dpo(dpo_recipe(a, sft_dir, train={"max_steps": 6}, **kw))
    run_dpo(dpo_recipe(b, sft_dir, train={"max_steps": 6}, checkpoint={"every": 3}, **kw))
    run_dpo(dpo_recipe(b, sft_dir, train={"max_steps": 6}, checkpoint={"every": 3}, **kw), resume=str(b / "checkpoints" / "step-0000003"))
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb] == list(range(0, 7))
    for x, y in zip(ra[1:], rb[1:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-7)
    pa, pb = load_policy(a / "final").state_dict(), load_policy(b / "final").state_dict()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


def test_dpo_lora_unmerged_final_keeps_the_base_and_an_adapter(sft_dir, tmp_path):
    final = run_dpo(dpo_recipe(tmp_path, sft_dir, lora={**LORA, "merge": False}, train={"max_steps": 2}))
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["bitnet_rl_mode"] == "pre_quant"
    start, end = load_policy(sft_dir).state_dict(), load_policy(final).state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)
