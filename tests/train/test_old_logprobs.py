"""`ppo.old_logprobs`: π_old from the policy's forward, the generator's packed prefill, or the rollout's own log-probs."""

import pytest
import torch

from bitnet_rl.errors import UserError
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.train.experience import policy_forward
from bitnet_rl.train.ppo import PPOTrainer, check_config

REWARD = "reward_models.demo_task:reward"


def recipe(out, model, **ppo):
    base = {"prompts": "demo", "num_prompts": 32, "iterations": 1, "prompts_per_iteration": 8, "advantage": "grpo", "samples_per_prompt": 2,
            "epochs": 1, "minibatch_size": 16, "micro_batch_size": 8, "rewards": [{"source": REWARD}], "eval_prompts": 0}  # fmt: skip
    data = {"out": str(out), "model": {"path": str(model)}, "rollout": {"max_new_tokens": 6}, "ppo": {**base, **ppo}, "logging": {"progress": False, "health_every": 0}}
    return validate(Recipe, data, "test")


def test_sources_that_cannot_hold_are_refused(sft_dir, tmp_path):
    for ppo, rollout, match in [
        ({"old_logprobs": "rollout", "rollout_correction": "token_tis"}, {}, "rollout_correction=none"),
        ({"old_logprobs": "prefill"}, {"backend": "policy"}, "rollout.backend=packed"),
    ]:
        r = recipe(tmp_path, sft_dir, **ppo)
        for key, value in rollout.items():
            setattr(r.rollout, key, value)
        with pytest.raises(UserError, match=match):
            check_config(r.ppo, r)
    warm = recipe(tmp_path, sft_dir, old_logprobs="prefill")
    warm.quant.schedule.kind, warm.quant.schedule.warmup_steps = "linear", 10
    with pytest.raises(UserError, match="λ = 1"):
        check_config(warm.ppo, warm)
    ok = recipe(tmp_path, sft_dir, old_logprobs="rollout", rollout_correction="none")
    check_config(ok.ppo, ok)


@pytest.mark.parametrize("source", ["policy", "rollout", "prefill"])
def test_old_logprobs_from_the_generator_match_the_policy_at_lambda_one(sft_dir, tmp_path, source, monkeypatch):
    """At λ = 1 the generator samples the policy's ternary function: π_old from it equals the policy's own pass
    (float32 on CPU, to 1e-4), and `rollout` is exactly the sampling log-probs with no extra forward."""
    extra = {"rollout_correction": "none"} if source == "rollout" else {}
    trainer = PPOTrainer(recipe(tmp_path / source, sft_dir, old_logprobs=source, **extra))
    trainer.begin(trainer.run)
    import bitnet_rl.train.ppo as ppo

    models = []
    monkeypatch.setattr(ppo, "policy_forward", lambda model, *a, **k: models.append(model) or policy_forward(model, *a, **k))
    exp, stats, _ = trainer.rollout(trainer.sampler, 0)
    own_pass = [trainer.policy] if source == "policy" else []
    assert models == own_pass + [trainer.reference]  # the generator's sources skip the policy's own pass
    with torch.no_grad():
        own = policy_forward(trainer.policy.eval(), exp)[0] * exp.mask
    assert exp.mask.sum() > 0
    torch.testing.assert_close(exp.old_logprobs, own, rtol=0, atol=1e-4)
    if source == "rollout":
        assert torch.equal(exp.old_logprobs, exp.rollout_logprobs * exp.mask) and stats["mismatch/abs_logp_diff"] == 0.0
    record = trainer.step(trainer.run)  # the update runs on it
    assert torch.isfinite(torch.tensor(record["loss/policy"]))


def test_critic_values_on_the_packed_prefill_follow_the_critic(sft_dir, tmp_path):
    """`ppo.critic_values=prefill`: values from the critic's packed copy equal the critic's own forward (float32 on CPU, 1e-3),
    also after an update changed the critic (the copy is re-synced each rollout); λ warm-up and LoRA are refused."""
    from bitnet_rl.train.experience import critic_forward

    r = recipe(tmp_path / "gae", sft_dir, advantage="gae", samples_per_prompt=1, critic="policy", critic_values="prefill")
    r.optimizer.lr = 1e-2  # a visible change of the critic between the two rollouts
    trainer = PPOTrainer(r)
    trainer.begin(trainer.run)
    with torch.no_grad():
        trainer.critic.score.weight.normal_(std=0.5)  # the zero-initialised head would make every value 0
    for iteration in range(2):
        exp, _, _ = trainer.rollout(trainer.sampler, iteration)
        with torch.no_grad():
            own = critic_forward(trainer.critic.eval(), exp) * exp.mask
        assert own.abs().max() > 1e-2
        torch.testing.assert_close(exp.values, own, rtol=1e-3, atol=1e-4)  # float32; an int8 activation code may round the other way
        before = exp.values.clone()
        trainer.update(exp)
    with torch.no_grad():
        assert (critic_forward(trainer.critic.eval(), exp) * exp.mask - before).abs().max() > 1e-3  # the critic did move
    for change, match in [({"kind": "linear", "warmup_steps": 10}, "λ = 1"), (None, "LoRA")]:
        bad = recipe(tmp_path, sft_dir, advantage="gae", samples_per_prompt=1, critic_values="prefill")
        if change:
            bad.quant.schedule.kind, bad.quant.schedule.warmup_steps = change["kind"], change["warmup_steps"]
        else:
            bad.lora.enabled = True
        with pytest.raises(UserError, match=match):
            check_config(bad.ppo, bad)
