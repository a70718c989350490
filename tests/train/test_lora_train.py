"""DPO and GRPO with LoRA on the demo task (CPU, tiny): held-out reward rises, final/ is the merged ternary
model, the reference needs no second copy, and resume is exact."""

import json

import pytest
import torch

from bitnet_rl.data.demo import make_prompts
from bitnet_rl.eval.task import sample, score_samples, task_metrics
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.quant.health import code_snapshot
from bitnet_rl.rewards import load_reward
from bitnet_rl.rollout import make_generator
from bitnet_rl.train.dpo import run_dpo
from bitnet_rl.train.ppo import run_ppo

from .test_dpo import dpo_recipe

REWARD = "reward_models.demo_task:reward"
LORA = {"enabled": True, "r": 8, "alpha": 16}


def heldout_reward(model_dir, n=512, temperature=1.0) -> float:
    """Mean demo reward of completions (temperature 1, fixed seed) of `n` held-out prompts."""
    policy = load_policy(model_dir).eval()
    generator = make_generator(policy, "packed", max_batch_size=128, max_seq_len=64)
    drawn = sample(generator, load_tokenizer(model_dir), make_prompts(n, seed=11), 12, temperature=temperature, seed=3, batch_size=128)
    return task_metrics(drawn, score_samples(drawn, load_reward(REWARD)))["reward"]


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
    from bitnet_rl.models.io import read_weight_files

    start, end = read_weight_files(sft_dir), read_weight_files(final)  # the files, before load_policy merges adapter/
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)


TINY2 = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def sft64(tmp_path_factory):
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.sft import run_sft

    recipe = {
        "out": str(tmp_path_factory.mktemp("lora-sft")), "model": {"tiny": TINY2},
        "quant": {"schedule": {"kind": "linear", "warmup_steps": 60}}, "data": {"path": "demo", "demo_size": 2000, "max_length": 32},
        "optimizer": {"lr": 3e-3}, "scheduler": {"warmup_steps": 10}, "train": {"max_steps": 100, "batch_size": 32},
        "logging": {"progress": False, "health_every": 0},
    }  # fmt: skip
    return run_sft(validate(Recipe, recipe, "test"))


def grpo_recipe(out, model, iterations, **lora):
    from bitnet_rl.recipe import Recipe, validate

    ppo = {
        "prompts": "demo", "num_prompts": 512, "iterations": iterations, "prompts_per_iteration": 16, "samples_per_prompt": 8,
        "advantage": "grpo", "kl_coef": 0.02, "kl_mode": "loss", "kl_estimator": "k3", "epochs": 1, "minibatch_size": 64,
        "micro_batch_size": 64, "missing_eos_penalty": -1.0, "rewards": [{"source": REWARD}],
    }  # fmt: skip
    data = {
        "out": str(out), "model": {"path": str(model)}, "rollout": {"max_new_tokens": 12}, "ppo": ppo,
        "lora": {**LORA, **lora}, "optimizer": {"lr": 3e-3}, "scheduler": {"kind": "constant", "warmup_steps": 5},
        "logging": {"progress": False, "health_every": 0},
    }  # fmt: skip
    return validate(Recipe, data, "test")


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_grpo_with_pre_quant_lora_raises_heldout_reward(sft64, tmp_path, seed):
    # packed rollouts: the generator re-packs Q(W + s·B·A) every iteration (LoraSyncedGenerator)
    recipe = grpo_recipe(tmp_path, sft64, iterations=80, r=16, alpha=32)
    recipe.train.seed = seed
    final = run_ppo(recipe)
    before, after = heldout_reward(sft64), heldout_reward(final)
    # LoRA learns slowly here: +0.016 to +0.041 over seeds and lrs (256 prompts); full fine-tuning +0.12 in 40 iterations
    print("held-out reward", before, after)
    assert after > before + 0.01, (before, after)
    log = rows(tmp_path)
    assert sum(r["reward"] for r in log[-20:]) > sum(r["reward"] for r in log[:20])
    assert not any("lora" in k for k in load_policy(final).state_dict())


def test_export_merge_lora_equals_the_merged_final(sft_dir, tmp_path):
    from typer.testing import CliRunner

    from bitnet_rl.cli import app

    kw = {"optimizer": {"lr": 3e-3}, "train": {"max_steps": 4}}
    merged = run_dpo(dpo_recipe(tmp_path / "m", sft_dir, lora=LORA, **kw))
    unmerged = run_dpo(dpo_recipe(tmp_path / "u", sft_dir, lora={**LORA, "merge": False}, **kw))
    runner = CliRunner()
    for name, source, extra in (("a", merged, []), ("b", unmerged, ["--merge-lora"])):
        result = runner.invoke(app, ["export", str(source), "--format", "packed", "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    a, b = code_snapshot(load_policy(tmp_path / "a")), code_snapshot(load_policy(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(int((a[k] != code_snapshot(load_policy(sft_dir))[k]).sum()) for k in a) > 0
    # any command loading the unmerged final (eval, generate, the next stage) gets the adapted model, not its base
    direct = code_snapshot(load_policy(unmerged))
    assert all(torch.equal(a[k], direct[k]) for k in a)
    result = runner.invoke(app, ["export", str(unmerged), "--format", "packed", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    d = code_snapshot(load_policy(tmp_path / "d"))
    assert all(torch.equal(a[k], d[k]) for k in a)
    result = runner.invoke(app, ["export", str(merged), "--format", "packed", "--out", str(tmp_path / "c"), "--merge-lora"])
    assert result.exit_code == 2 and "no adapter/" in result.output


def test_grpo_lora_resume_is_exact(sft64, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_ppo(grpo_recipe(a, sft64, iterations=4))
    recipe_b = grpo_recipe(b, sft64, iterations=4)
    recipe_b.checkpoint.every = 2
    run_ppo(recipe_b)
    run_ppo(recipe_b, resume=str(b / "checkpoints" / "step-0000002"))
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert y["sample"] == x["sample"]
        for key in ("reward", "kl", "loss/policy"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    pa, pb = load_policy(a / "final").state_dict(), load_policy(b / "final").state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_sft_and_rm_with_lora(tmp_path):
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.sft import run_sft

    recipe = {
        "out": str(tmp_path / "sft"), "model": {"tiny": TINY2}, "data": {"path": "demo", "demo_size": 300, "max_length": 32},
        "optimizer": {"lr": 1e-2}, "train": {"max_steps": 20, "batch_size": 16}, "lora": LORA,
        "logging": {"progress": False, "health_every": 5},
    }  # fmt: skip
    final = run_sft(validate(Recipe, recipe, "test"))
    log = [r for r in rows(tmp_path / "sft") if "loss" in r]
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert all(r["flip_rate"] > 0 for r in log if "flip_rate" in r)
    assert not any("lora" in k for k in load_policy(final).state_dict())


def test_rm_with_lora_trains_adapters_and_the_score_head(sft_dir, tmp_path):
    from bitnet_rl.recipe import Recipe, validate
    from bitnet_rl.train.rm import RM_DEFAULTS, run_rm

    recipe = {
        **RM_DEFAULTS, "out": str(tmp_path), "model": {"path": str(sft_dir)}, "lora": LORA,
        "data": {"path": "demo", "format": "prefs", "demo_size": 600, "max_length": 32, "max_prompt_length": 16, "val_fraction": 0.1},
        "optimizer": {"lr": 1e-2}, "train": {"max_steps": 40, "batch_size": 16}, "logging": {"progress": False, "health_every": 0},
    }  # fmt: skip
    final = run_rm(validate(Recipe, recipe, "test"))
    log = rows(tmp_path)
    assert log[-1]["val_accuracy"] > 0.6 and log[-1]["val_loss"] < log[0]["val_loss"], log[-1]
    assert (final / "reward_stats.json").is_file()


def test_dpo_lora_with_a_separate_reference_copy(sft_dir, tmp_path):
    run_dpo(dpo_recipe(tmp_path, sft_dir, lora={**LORA, "reference": "copy"}, dpo={"reference": "ternary"}, train={"max_steps": 3}))
    log = rows(tmp_path)
    assert abs(log[0]["val_margin"]) < 1e-4 and log[-1]["step"] == 3


def test_post_quant_grpo_needs_the_policy_backend(sft64, tmp_path):
    from bitnet_rl.errors import UserError

    with pytest.warns(UserWarning, match="no longer ternary"), pytest.raises(UserError, match="rollout.backend=policy"):
        run_ppo(grpo_recipe(tmp_path / "a", sft64, iterations=1, mode="post_quant"))
    recipe = grpo_recipe(tmp_path / "b", sft64, iterations=2, mode="post_quant")
    recipe.rollout.backend = "policy"
    with pytest.warns(UserWarning, match="no longer ternary"):
        run_ppo(recipe)
    assert [r["step"] for r in rows(tmp_path / "b")] == [1, 2]


def test_ppo_gae_with_an_adapter_critic_shares_the_policy_weights(sft64, tmp_path):
    from bitnet_rl.train.ppo import PPOTrainer

    def recipe(out, **extra):
        r = grpo_recipe(out, sft64, iterations=4, critic="adapter")
        r.ppo.advantage, r.ppo.samples_per_prompt, r.ppo.kl_mode = "gae", 1, "reward"
        r.ppo.prompts_per_iteration, r.ppo.minibatch_size, r.ppo.micro_batch_size = 16, 8, 8
        for key, value in extra.items():
            setattr(r.checkpoint, key, value)
        return r

    checkpointed = recipe(tmp_path / "x")
    checkpointed.train.gradient_checkpointing = True
    trainer = PPOTrainer(checkpointed)
    critic, policy = trainer.accelerator.unwrap_model(trainer.critic), trainer.unwrapped
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    frozen = [p for p in critic.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in policy_ptrs for p in frozen)  # no second copy of any base weight
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    assert not any(p.data_ptr() in policy_ptrs for n, p in critic.named_parameters() if n in trainable)
    a, b = tmp_path / "a", tmp_path / "b"
    run_ppo(recipe(a))
    run_ppo(recipe(b, every=2))
    run_ppo(recipe(b, every=2), resume=str(b / "checkpoints" / "step-0000002"))
    ra, rb = rows(a), rows(b)
    assert all(abs(r["explained_variance"]) >= 0 for r in ra) and ra[-1]["loss/value"] < ra[0]["loss/value"]
    for x, y in zip(ra, rb):
        for key in ("reward", "loss/policy", "loss/value"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    saved = (b / "final" / "trainer_state" / "critic" / "model.safetensors").stat().st_size
    assert saved < 0.2 * (a / "final" / "model.safetensors").stat().st_size  # adapter + head only
