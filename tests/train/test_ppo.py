"""PPO / GRPO on the demo task, on CPU: rewards rise, resume is exact, reward errors stop the run."""

import json

import pytest
import torch

from bitnet_rl.data.demo import make_prompts
from bitnet_rl.errors import UserError
from bitnet_rl.eval.task import sample, score_samples, task_metrics
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.rewards import RewardError, load_reward
from bitnet_rl.rollout import make_generator
from bitnet_rl.train.ppo import run_ppo
from bitnet_rl.train.sft import run_sft

REWARD = "reward_models.demo_task:reward"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-sft")
    recipe = {
        "out": str(out),
        "model": {"tiny": TINY},
        "quant": {"schedule": {"kind": "linear", "warmup_steps": 60}},
        "data": {"path": "demo", "demo_size": 2000, "max_length": 32},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"warmup_steps": 10},
        "train": {"max_steps": 100, "batch_size": 32},
        "logging": {"progress": False, "health_every": 0},
    }
    return run_sft(validate(Recipe, recipe, "test"))


def ppo_recipe(out, model, **ppo):
    base = {
        "prompts": "demo", "num_prompts": 512, "iterations": 40, "prompts_per_iteration": 64, "advantage": "gae",
        "epochs": 1, "minibatch_size": 64, "micro_batch_size": 32, "missing_eos_penalty": -1.0, "rewards": [{"source": REWARD}],
    }  # fmt: skip
    data = {
        "out": str(out),
        "model": {"path": str(model)},
        "rollout": {"max_new_tokens": 12},
        "ppo": {**base, **ppo},
        "optimizer": {"lr": 5e-4},
        "scheduler": {"kind": "constant", "warmup_steps": 10},
        "logging": {"progress": False, "health_every": 0},
    }
    return validate(Recipe, data, "test")


def heldout_sampled_reward(model_dir) -> float:
    """Mean demo reward of temperature-1 samples on 256 held-out prompts (fixed seed)."""
    policy = load_policy(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    generator = make_generator(policy, "packed", max_batch_size=128, max_seq_len=64)
    drawn = sample(generator, tokenizer, make_prompts(256, seed=11), 12, temperature=1.0, seed=3, batch_size=128)
    return task_metrics(drawn, score_samples(drawn, load_reward(REWARD)))["reward"]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_rl_raises_heldout_reward(sft_dir, tmp_path, estimator):
    extra = {"samples_per_prompt": 8, "prompts_per_iteration": 16, "kl_coef": 0.02, "kl_mode": "loss", "kl_estimator": "k3"} if estimator == "grpo" else {}
    final = run_ppo(ppo_recipe(tmp_path, sft_dir, advantage=estimator, **extra))
    before, after = heldout_sampled_reward(sft_dir), heldout_sampled_reward(final)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert after > before + 0.04, (before, after)
    assert all(row["kl"] < 5.0 for row in rows)  # bounded drift from the SFT policy
    for key in ("reward", "reward_std", "kl", "entropy", "loss/policy", "clip_frac", "approx_kl", "response_length", "eos_rate", "rollout_tokens_per_s", "time/generate", "time/score", "time/train"):
        assert key in rows[-1], key
    if estimator == "gae":
        assert "loss/value" in rows[-1] and "explained_variance" in rows[-1]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_resume_matches_uninterrupted_run(sft_dir, tmp_path, estimator):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = {"advantage": estimator, "adaptive_kl": True, "kl_target": 0.1}
    if estimator == "grpo":  # dynamic sampling draws extra prompts: the sampler position must resume too
        extra.update(samples_per_prompt=4, prompts_per_iteration=4, dynamic_sampling=True, loss_aggregation="seq_mean_token_mean", clip_eps_high=0.28,
                     dynamic_sampling_max_mean=0.7, skip_dropped_prompts=0.8,  # few prompts, drawn again: the skip flags must resume too
                     num_prompts=24, rewards=[{"source": "reward_models.demo_task:exact_match"}])
    run_ppo(ppo_recipe(a, sft_dir, **{"iterations": 4, "prompts_per_iteration": 16, "minibatch_size": 8, "micro_batch_size": 8, **extra}))
    recipe_b = ppo_recipe(b, sft_dir, **{"iterations": 4, "prompts_per_iteration": 16, "minibatch_size": 8, "micro_batch_size": 8, **extra})
    recipe_b.checkpoint.every = 2
    run_ppo(recipe_b)
    run_ppo(recipe_b, resume=str(b / "checkpoints" / "step-0000002"))
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["sample"] == ra["sample"]
        for key in ("reward", "kl", "kl_coef", "loss/policy", "loss/value", "dynamic/rounds", "dynamic/skipped_prompts"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    pa, pb = load_policy(a / "final"), load_policy(b / "final")
    for (name, x), (_, y) in zip(pa.state_dict().items(), pb.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_reward_error_saves_a_checkpoint_and_names_the_reward(sft_dir, tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def reward(prompts, completions, **meta):\n    return [float('nan')] * len(completions)\n")
    recipe = ppo_recipe(tmp_path / "run", sft_dir, iterations=2, prompts_per_iteration=8, minibatch_size=8, micro_batch_size=8, rewards=[{"source": f"python:{bad}:reward"}])
    with pytest.raises(RewardError, match="bad_reward.py:reward: non-finite"):
        run_ppo(recipe)
    saved = list((tmp_path / "run" / "checkpoints").glob("*before-reward-error"))
    assert len(saved) == 1 and (saved[0] / "trainer_state" / "state.json").is_file()


def test_bad_reward_or_prompts_stop_the_run_before_the_policy_loads(sft_dir, tmp_path, monkeypatch):
    """A reward function that cannot take (prompts, completions), a missing prompts file: one error
    naming it, raised before the policy is built (which would take minutes on a real model)."""
    import bitnet_rl.train.ppo as ppo_module

    def no_policy(*args, **kwargs):
        raise AssertionError("the policy was loaded before the reward and prompts were checked")

    monkeypatch.setattr(ppo_module, "build_policy", no_policy)
    one_arg = tmp_path / "one_arg.py"
    one_arg.write_text("def reward(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"one_arg.py:reward'.*cannot be called as reward\(prompts, completions\)"):
        run_ppo(ppo_recipe(tmp_path / "a", sft_dir, rewards=[{"source": f"python:{one_arg}:reward"}]))
    with pytest.raises(UserError, match="missing.jsonl"):
        run_ppo(ppo_recipe(tmp_path / "b", sft_dir, prompts=str(tmp_path / "missing.jsonl")))


def test_group_estimators_need_several_samples(sft_dir, tmp_path):
    with pytest.raises(UserError, match="samples_per_prompt"):
        run_ppo(ppo_recipe(tmp_path, sft_dir, advantage="grpo", samples_per_prompt=1))


def test_cli_eval_every_health_and_mismatch_are_logged(sft_dir, tmp_path):
    from typer.testing import CliRunner

    from bitnet_rl.cli import app

    out = tmp_path / "run"
    args = ["ppo", "--model", str(sft_dir), "--out", str(out), "--reward", REWARD, "ppo.advantage=grpo", "ppo.samples_per_prompt=4",
            "ppo.prompts_per_iteration=4", "ppo.minibatch_size=16", "ppo.micro_batch_size=8", "ppo.iterations=3", "ppo.eval_every=2",
            "ppo.eval_prompts=16", "rollout.max_new_tokens=8", "logging.health_every=2", "logging.progress=false"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/reward" in r for r in rows] == [False, True, True]  # every 2 iterations, and at the end
    assert 0.0 <= rows[1]["eval/accuracy"] <= 1.0 and rows[1]["eval/reward"] >= 0.0
    assert ["flip_rate" in r for r in rows] == [True, True, True]  # 2 optimizer steps per iteration
    assert all(0.0 <= r["flip_rate"] < 0.5 for r in rows)
    for key in ("mismatch/kl_k3", "mismatch/abs_logp_diff", "mismatch/ratio_p01", "mismatch/ratio_p50", "mismatch/ratio_p99",
                "mismatch/frac_outside", "frac_reward_zero_std", "clip_ratio", "clip_ratio/high"):  # fmt: skip
        assert key in rows[-1], key
    # at λ = 1 on CPU the packed generator computes the policy's function: the ratios are 1
    assert rows[-1]["mismatch/abs_logp_diff"] < 1e-4 and rows[-1]["mismatch/ratio_p50"] == pytest.approx(1.0, abs=1e-4)


def test_packed_rollouts_during_lambda_warmup_need_a_correction(sft_dir, tmp_path):
    recipe = ppo_recipe(tmp_path, sft_dir, iterations=1, prompts_per_iteration=8, minibatch_size=8, micro_batch_size=8, rollout_correction="none")
    recipe.quant.schedule.kind, recipe.quant.schedule.warmup_steps = "linear", 10
    with pytest.raises(UserError, match="rollout_correction"):
        run_ppo(recipe)
    recipe.ppo.rollout_correction = "token_tis"
    final = run_ppo(recipe)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # λ = 0 policy vs ternary generator: a real mismatch, measured and corrected
    assert row["mismatch/abs_logp_diff"] > 1e-3 and row["lambda"] < 1.0
    assert row["correction/mean_weight"] <= 2.0 and (final / "config.json").is_file()


def test_ppo_on_the_run_object_lambda_per_optimizer_step_health_eval_and_exact_resume_in_warmup(sft_dir, tmp_path):
    """Two optimizer steps per iteration during a λ warm-up: each iteration logs the mean λ of its
    own optimizer steps, health and evaluation come at the right iterations, and a resume in the
    middle of the warm-up continues bit-exactly (the rollout samples at the λ of its first update,
    also right after a resume)."""
    from safetensors.torch import load_file

    def recipe(out, every=0):
        r = ppo_recipe(out, sft_dir, iterations=4, prompts_per_iteration=8, minibatch_size=4, micro_batch_size=4, eval_every=3, eval_prompts=8)
        r.quant.schedule.kind, r.quant.schedule.warmup_steps = "linear", 6
        r.logging.health_every, r.checkpoint.every = 3, every
        return r

    a, b = tmp_path / "a", tmp_path / "b"
    run_ppo(recipe(a))
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_step"] for r in rows_a] == [2, 4, 6, 8]
    lam = [min(s / 6, 1.0) for s in range(8)]  # λ(s) of optimizer step s
    assert [r["lambda"] for r in rows_a] == pytest.approx([(lam[2 * k] + lam[2 * k + 1]) / 2 for k in range(4)])
    assert ["flip_rate" in r for r in rows_a] == [False, True, True, False]  # optimizer steps 0→2, 2→4 (3), 4→6 (6), 6→8
    assert ["eval/reward" in r for r in rows_a] == [False, False, True, True]  # every 3 iterations and at the end
    run_ppo(recipe(b, every=2))
    run_ppo(recipe(b, every=2), resume=str(b / "checkpoints" / "step-0000002"))
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    timing = ("time/", "rollout_tokens_per_s")
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in rb.items() if not k.startswith(timing)} == {k: v for k, v in ra.items() if not k.startswith(timing)}
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
