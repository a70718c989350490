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
