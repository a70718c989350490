"""PPO (and GRPO / RLOO / REINFORCE++) for BitNet policies, on accelerate, sampling with the packed generator.

Per iteration: sample prompts → roll out (`PackedGenerator`, synced from the policy; with
dynamic sampling, tied groups are dropped and refilled) → score (+ missing-EOS and overlong
penalties) → `Experience` built on the device from the `RolloutOutput`, keeping the generator's
log-probs → log-probs of the policy (old) and of the frozen 2-bit reference, critic values →
rollout mismatch metrics and correction weights (`rl/correction.py`) → KL penalty (in the reward,
or as a loss term) → advantages (`rl/estimators.py`) → epochs of clipped policy and value
updates over minibatches.

PPO is a stage of the run object (`train/run.py`), like SFT: one stage step is one iteration,
and the run owns λ (per optimizer step, on policy and critic), ternary health every
`logging.health_every` optimizer steps, greedy held-out evaluation every `ppo.eval_every`
iterations, metrics, progress and checkpoints. Everything needed to continue exactly is
checkpointed: policy, critic, both optimizers, RNG, prompt order and step (the run), and the
KL controller (this stage's own state).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bitnet_rl.data.prompts import encode_prompt, load_prompts, rollout_prompt_ids
from bitnet_rl.distributed.collective import all_ranks, all_reduce_max, all_reduce_sum, gather_rows, reduce_rollout_stats, skip_grad_sync
from bitnet_rl.distributed.fsdp import gathered_params
from bitnet_rl.distributed.reduce import global_explained_variance, loss_denominator, weighted_means
from bitnet_rl.errors import UserError
from bitnet_rl.lora.critic import adapter_critic
from bitnet_rl.lora.rl import lora_generator, policy_reference
from bitnet_rl.models.build import build_policy, model_source, resolve_dtype, resolve_model_dir
from bitnet_rl.models.io import prompt_format_of
from bitnet_rl.models.value import load_scalar_model
from bitnet_rl.recipe import STAGE_DEFAULTS, PPOConfig, Recipe
from bitnet_rl.rewards import RewardError, RewardSource, load_rewards
from bitnet_rl.rl import advantages as adv
from bitnet_rl.rl.correction import rollout_correction, rollout_mismatch
from bitnet_rl.rl.estimators import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    estimate_advantages,
)
from bitnet_rl.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from bitnet_rl.rl.losses import ppo_policy_loss, value_loss
from bitnet_rl.rl.shaping import filtered_groups, group_reward_stats
from bitnet_rl.rollout import make_generator
from bitnet_rl.train.experience import (
    Experience,
    completion_columns,
    critic_forward,
    experience_from_rollout,
    policy_forward,
)
from bitnet_rl.train.loop import EpochSampler, current_lambda
from bitnet_rl.train.ppo_eval import heldout_prompts, make_evaluator
from bitnet_rl.train.ppo_sampling import sample_groups, sample_round
from bitnet_rl.train.prompt_skip import PromptSkipper, rank_major_to_pick_order
from bitnet_rl.train.run import Run
from bitnet_rl.train.rundir import check_run

PPO_DEFAULTS = STAGE_DEFAULTS["ppo"]  # `bitnet-rl ppo` without a recipe (recipe.STAGE_DEFAULTS)


def kl_controller(cfg: PPOConfig):
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def compute_advantages(cfg: PPOConfig, scores: torch.Tensor, values: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, all_reduce=None):
    """(advantages, returns, token rewards) `(B, T)` from the estimator registered as `cfg.advantage`.
    Pure; `all_reduce` (several processes) makes whitening use all ranks' moments."""
    token_rewards = adv.scores_to_token_rewards(scores, mask)
    if cfg.kl_mode == "reward":
        token_rewards = adv.add_kl_penalty(token_rewards, kl, kl_coef, mask)
    inputs = AdvantageInputs(token_rewards, values, mask, cfg.samples_per_prompt, cfg.gamma, cfg.gae_lambda, cfg.group_std_eps, all_reduce)
    advantages, returns = estimate_advantages(cfg.advantage, inputs, cfg.whiten_advantages)
    return advantages, returns, token_rewards


def check_config(cfg: PPOConfig, recipe: Recipe) -> None:
    """UserErrors for settings that cannot work together."""
    estimator = ADVANTAGE_ESTIMATORS[cfg.advantage]
    if estimator.grouped and cfg.samples_per_prompt < 2:
        raise UserError(f"ppo.advantage={cfg.advantage} needs ppo.samples_per_prompt >= 2 (got {cfg.samples_per_prompt})")
    if cfg.dynamic_sampling and not estimator.grouped:
        raise UserError(f"ppo.dynamic_sampling needs a group estimator (grpo, rloo), not ppo.advantage={cfg.advantage}")
    if cfg.dynamic_sampling_max_mean is not None and not cfg.dynamic_sampling:
        raise UserError(f"ppo.dynamic_sampling_max_mean={cfg.dynamic_sampling_max_mean} filters groups only with ppo.dynamic_sampling: true")
    if cfg.skip_dropped_prompts > 0 and not cfg.dynamic_sampling:
        raise UserError(f"ppo.skip_dropped_prompts={cfg.skip_dropped_prompts} skips prompts that dynamic sampling dropped: set ppo.dynamic_sampling: true")
    if cfg.minibatch_size % cfg.micro_batch_size:
        raise UserError(f"ppo.minibatch_size={cfg.minibatch_size} is not a multiple of ppo.micro_batch_size={cfg.micro_batch_size}")
    if cfg.overlong_buffer > recipe.rollout.max_new_tokens:
        raise UserError(f"ppo.overlong_buffer={cfg.overlong_buffer} exceeds rollout.max_new_tokens={recipe.rollout.max_new_tokens}")
    warming_up = current_lambda(recipe, 0) < 1.0
    if cfg.old_logprobs == "rollout" and cfg.rollout_correction != "none":
        raise UserError(
            f"ppo.old_logprobs=rollout takes π_old from the generator, so ppo.rollout_correction={cfg.rollout_correction} would "
            "compare the rollout log-probs with themselves: set ppo.rollout_correction=none (the PPO ratio then carries the mismatch)"
        )
    if cfg.old_logprobs == "prefill" and (recipe.rollout.backend != "packed" or warming_up):
        raise UserError(
            "ppo.old_logprobs=prefill runs the packed generator's fully ternary model: it needs rollout.backend=packed and "
            "a quant.schedule at λ = 1 from the start (use ppo.old_logprobs=policy)"
        )
    if cfg.critic_values == "prefill" and (warming_up or recipe.lora.enabled):
        raise UserError("ppo.critic_values=prefill packs the critic as ternary: it needs λ = 1 from the start and no LoRA (use ppo.critic_values=critic)")
    if warming_up and recipe.rollout.backend == "packed" and cfg.rollout_correction == "none":
        raise UserError(
            "quant.schedule starts below λ = 1, but the packed generator samples the fully ternary model: "
            "set ppo.rollout_correction (e.g. token_tis) or rollout.backend=policy"
        )


class PPOTrainer:
    """The PPO/GRPO stage: policy, critic, reference, generator and reward, driven by the run object.

    One stage step is one iteration (rollout → experience → `ppo.epochs` passes of minibatch
    updates, each an optimizer step of the run); `total` is `ppo.iterations`."""

    total_key = "ppo.iterations"
    baseline_eval = False

    def __init__(self, recipe: Recipe, reward: RewardSource | None = None, device: str | None = None) -> None:
        cfg = recipe.ppo
        check_config(cfg, recipe)
        self.recipe, self.cfg = recipe, cfg
        self.command, self.total, self.eval_every = "ppo", cfg.iterations, cfg.eval_every
        self.out = Path(recipe.out)
        self.run = Run(recipe, "ppo")
        self.accelerator = self.run.accelerator
        device = device or self.accelerator.device
        # paths, rewards and prompts first: a bad --model, --reward or --prompts stops the run before the policy loads
        model_source(recipe.model)
        self.reward = reward or load_rewards([(r.weight, r.source) for r in cfg.rewards], device=device)
        self.prompts = load_prompts(cfg.prompts or "demo", cfg.num_prompts, seed=recipe.train.seed)
        policy, self.tokenizer = build_policy(recipe.model, recipe.quant, lam=current_lambda(recipe, 0), device=device, seed=recipe.train.seed)
        self.reference = policy_reference(policy, recipe)  # with LoRA: the base with adapters off (no second copy)
        critic = self._build_critic(policy, device) if ADVANTAGE_ESTIMATORS[cfg.advantage].needs_critic else None
        self.prompt_ids = rollout_prompt_ids(self.tokenizer, policy, self.prompts, recipe.data.chat_template, recipe.rollout.max_new_tokens, cfg.prompts or "demo")
        self.chat = prompt_format_of(policy) == "chat"  # as rollout_prompt_ids resolved and recorded it
        self.eval_prompts = heldout_prompts(recipe, self.prompts)
        self.policy = self.run.add_model(policy, self.tokenizer, total_steps=self.total_optimizer_steps())
        self.critic = self.run.add_model(critic, name="critic", lr=cfg.critic_lr or recipe.optimizer.lr) if critic is not None else None
        self.reference.to(self.accelerator.device)
        self.kl_ctl = kl_controller(cfg)
        self.critic_prefill = None  # ppo.critic_values=prefill: the critic's packed copy, built at the first rollout
        self.sampler: EpochSampler | None = None
        self.skipper = PromptSkipper(len(self.prompts), cfg.skip_dropped_prompts, recipe.train.seed)
        max_prompt = max(len(p) for p in self.prompt_ids + [encode_prompt(self.tokenizer, p, self.chat) for p in self.eval_prompts])
        with gathered_params(self.unwrapped):  # FSDP2: the generator packs the full weights
            self.generator = lora_generator(lambda: make_generator(  # with LoRA, syncs re-pack Q(W + s·B·A)
                self.unwrapped,
                backend=recipe.rollout.backend,
                max_batch_size=cfg.prompts_per_iteration * cfg.samples_per_prompt,
                max_seq_len=max_prompt + recipe.rollout.max_new_tokens,
            ), self.unwrapped)
        self.evaluate = make_evaluator(recipe, self.tokenizer, self.reward, self.generator, self.eval_prompts, self.chat)

    @property
    def state(self):
        """The run's position (`LoopState`: optimizer steps, prompt order)."""
        return self.run.state

    def total_optimizer_steps(self) -> int:
        cfg = self.cfg
        per_iteration = cfg.epochs * -(-cfg.prompts_per_iteration * cfg.samples_per_prompt // cfg.minibatch_size)
        return cfg.iterations * per_iteration

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def _build_critic(self, policy: nn.Module, device) -> nn.Module:
        recipe, cfg = self.recipe, self.cfg
        if recipe.lora.enabled and recipe.lora.critic == "adapter":  # a second adapter on the policy's weights
            return adapter_critic(policy, recipe.lora, seed=recipe.train.seed)
        dtype = resolve_dtype(recipe.model.dtype, device)
        if cfg.critic == "reward_model":
            dirs = [r.source for r in cfg.rewards if Path(r.source).is_dir()]
            if not dirs:
                raise UserError("ppo.critic=reward_model needs a reward-model directory among the rewards")
            source = resolve_model_dir(dirs[0])
        else:
            if not recipe.model.path:
                raise UserError("ppo.critic=policy needs model.path (the SFT checkpoint to copy)")
            source = resolve_model_dir(recipe.model.path)
        lam = current_lambda(recipe, 0)
        return load_scalar_model(source, quant=recipe.quant, lam=lam, dtype=dtype, device=device, head="zero")

    # ---- one iteration -------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, sampler: EpochSampler, iteration: int) -> tuple[Experience, dict[str, float], list[str]]:
        """Sample (with refills under dynamic sampling), then build and score the experience batch."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        t0 = time.perf_counter()
        if hasattr(self.generator, "sync_from"):
            with gathered_params(self.unwrapped):  # FSDP2: the generator packs the full weights
                self.generator.sync_from(self.unwrapped)

        def round_fn(round_index: int):
            everyone_picked = self.skipper.pick(sampler, cfg.prompts_per_iteration * acc.num_processes, iteration, round_index)
            picked = everyone_picked[acc.process_index :: acc.num_processes]
            prompts = [self.prompts[i] for i in picked for _ in range(cfg.samples_per_prompt)]
            prompt_ids = [self.prompt_ids[i] for i in picked for _ in range(cfg.samples_per_prompt)]
            seed = self.recipe.train.seed * 100_003 + iteration * acc.num_processes + acc.process_index + round_index * 7_919_113
            result = sample_round(self.generator, self.tokenizer, self.reward, prompts, prompt_ids, cfg, self.recipe.rollout, seed, device)
            if cfg.skip_dropped_prompts > 0:  # every rank learns every group's outcome, so the skippers stay equal
                dropped = filtered_groups(result.scores, result.raw, cfg.samples_per_prompt, cfg.dynamic_sampling_max_mean)
                self.skipper.record(everyone_picked, rank_major_to_pick_order(gather_rows(acc, dropped.to(device=device, dtype=torch.long))[0], acc.num_processes))
            return result

        # as many rounds on every rank; a reward error anywhere raises on every rank, so all of them save and stop together
        sampled = sample_groups(round_fn, cfg, everyone=all_ranks(acc))
        t1 = time.perf_counter()
        exp = experience_from_rollout(sampled.out, sampled.scores, device)
        mask = exp.mask
        self.policy.eval()
        exp.old_logprobs = self._old_logprobs(exp) * mask
        exp.ref_logprobs = policy_forward(self.reference, exp)[0] * mask
        if self.critic is not None:
            exp.values = self._values(exp) * mask
        exp.is_weights, exp.loss_mask = rollout_correction(cfg.rollout_correction, exp.old_logprobs, exp.rollout_logprobs, mask, cfg.rollout_correction_cap)
        kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
        all_reduce = all_reduce_sum(acc) if acc.num_processes > 1 else None
        exp.advantages, exp.returns, _ = compute_advantages(cfg, exp.scores, exp.values, kl, mask, self.kl_ctl.value, all_reduce)
        new_tokens = int(mask.sum())
        t2 = time.perf_counter()
        raw = sampled.raw
        stats = {
            "reward": float(raw.mean()),
            **group_reward_stats(gather_rows(acc, raw)[0] if cfg.samples_per_prompt < 2 else raw, cfg.samples_per_prompt),  # groups of 1: the std over every rank's batch
            "score": float(exp.scores.mean()),
            "kl": float(kl.sum(1).mean()),
            "kl_coef": self.kl_ctl.value,
            "response_length": new_tokens / len(exp),
            "eos_rate": float(sampled.stopped.float().mean()),
            "rollout_tokens_per_s": new_tokens / max(t1 - t0, 1e-9),
            **rollout_mismatch(*gather_rows(acc, exp.old_logprobs, exp.rollout_logprobs, mask), cfg.rollout_correction_cap),
            "correction/kept_tokens": float(exp.loss_mask.sum() / mask.sum().clamp(min=1)),
            "correction/mean_weight": float(adv.masked_mean(exp.is_weights, exp.loss_mask)) if exp.loss_mask.any() else 0.0,
            "time/generate": sampled.generate_seconds,
            "time/score": sampled.score_seconds,
            "time/logprobs": t2 - t1,
        }
        if cfg.dynamic_sampling:
            stats["dynamic/rounds"], stats["dynamic/dropped_groups"] = sampled.rounds, sampled.dropped_groups
            stats["dynamic/skipped_prompts"] = self.skipper.take_skipped()  # already global: every rank decides for all ranks' picks
        rows, groups = len(exp), len(exp) / cfg.samples_per_prompt
        per_row = {k: rows for k in ("reward", "score", "kl", "response_length", "eos_rate")}
        weights = {**per_row, "reward_std": groups, "frac_reward_zero_std": groups, "correction/kept_tokens": float(mask.sum()), "correction/mean_weight": float(exp.loss_mask.sum())}
        stats = reduce_rollout_stats(acc, stats, weights, maxima=("time/generate", "time/score", "time/logprobs", "dynamic/rounds"), sums=("rollout_tokens_per_s", "dynamic/dropped_groups"))
        return exp, stats, sampled.completions

    def _old_logprobs(self, exp: Experience) -> torch.Tensor:
        """π_old of the completion tokens `(B, T)` from `ppo.old_logprobs` (issue 13: the last two skip the policy's pass)."""
        source = self.cfg.old_logprobs
        if source == "rollout":  # the generator's temperature-1 log-probs of the sampled tokens (verl: recompute_old_log_prob off)
            return exp.rollout_logprobs
        if source == "prefill":  # the generator, synced at this rollout, on its packed prefill path
            return completion_columns(self.generator.token_logprobs(exp.input_ids).float(), exp.prompt_lens, exp.mask.shape[1])
        return policy_forward(self.policy, exp)[0]

    def _values(self, exp: Experience) -> torch.Tensor:
        """Critic values `(B, T)` from `ppo.critic_values`: the critic's forward, or its packed copy synced now (issue 13)."""
        if self.cfg.critic_values == "critic":
            return critic_forward(self.critic, exp)
        from bitnet_rl.rollout.prefill import PackedPrefill

        with gathered_params(self.accelerator.unwrap_model(self.critic)) as critic:
            if self.critic_prefill is None:
                self.critic_prefill = PackedPrefill.from_model(critic)
            else:
                self.critic_prefill.sync_from(critic)
        values = self.critic_prefill.token_values(exp.input_ids)[:, :-1].float()
        return completion_columns(values, exp.prompt_lens, exp.mask.shape[1])

    def update(self, exp: Experience) -> dict[str, float]:
        """`ppo.epochs` passes of clipped updates over shuffled minibatches of `exp`."""
        cfg, recipe = self.cfg, self.recipe
        self.policy.train()
        totals: dict[str, float] = {}
        count = 0
        generator = torch.Generator().manual_seed(recipe.train.seed + self.state.step)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(exp), generator=generator)
            for start in range(0, len(exp), cfg.minibatch_size):
                lam = self.run.set_lambda()  # λ per optimizer step, on the policy and the critic
                batch_rows = order[start : start + cfg.minibatch_size]
                stats = self._minibatch_step(exp, batch_rows)
                stats["lambda"] = lam
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        means = {key: value / max(count, 1) for key, value in totals.items()}
        if self.accelerator.num_processes == 1:
            return means
        tokens = float(exp.loss_mask.sum())  # token means weigh by tokens; loss and entropy are shares of the global mean already
        shares = ("loss/policy", "loss/value", "entropy")
        return weighted_means(means, {k: (1.0 if k in shares else tokens) for k in means}, all_reduce_sum(self.accelerator))

    def _minibatch_step(self, exp: Experience, rows: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        stats: dict[str, float] = {}
        micro_batches = rows.split(cfg.micro_batch_size)
        whole = exp.loss_mask[rows.to(exp.loss_mask.device)]
        reduce, world = all_reduce_sum(self.accelerator), self.accelerator.num_processes  # global minibatch denominators (distributed.reduce)
        mask_tokens = loss_denominator(exp.mask[rows.to(exp.mask.device)].sum(), world, reduce).clamp(min=1.0 / world)
        num_tokens = loss_denominator(whole.sum(), world, reduce).clamp(min=1.0 / world)
        num_seqs = loss_denominator((whole.sum(1) > 0).sum(), world, reduce).clamp(min=1.0 / world)
        for index, micro in enumerate(micro_batches):
            with skip_grad_sync(self.accelerator, (self.policy, self.critic), sync=index == len(micro_batches) - 1):
                part = exp.select(micro.to(exp.input_ids.device))
                weight = len(micro) / len(rows)
                with self.accelerator.autocast():
                    logprobs, entropy = policy_forward(self.policy, part, with_entropy=True)
                    pg_loss, pstats = ppo_policy_loss(
                        logprobs, part.old_logprobs, part.advantages, part.loss_mask, cfg.clip_eps, cfg.clip_eps_high,
                        weights=part.is_weights, aggregation=cfg.loss_aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                    )  # fmt: skip
                    entropy_share = (entropy * part.mask).sum() / mask_tokens  # token means over the (global) minibatch
                    loss = pg_loss - cfg.entropy_coef * entropy_share
                    if cfg.kl_mode == "loss":
                        loss = loss + self.kl_ctl.value * (kl_estimate(logprobs, part.ref_logprobs, cfg.kl_estimator) * part.mask).sum() / mask_tokens
                self.accelerator.backward(loss)
                _add(stats, {"loss/policy": float(loss.detach())}, 1.0)  # micro-batch losses add up to the minibatch loss
                _add(stats, {"entropy": float(entropy_share.detach())}, 1.0)  # shares add up to the minibatch's token mean
                _add(stats, {k: float(v) for k, v in pstats.items()}, weight)
                if self.critic is not None:
                    with self.accelerator.autocast():
                        values = critic_forward(self.critic, part)
                        vloss, vstats = value_loss(values, part.values, part.returns, part.mask, cfg.value_clip_eps)
                    value_share = vloss * part.mask.sum() / mask_tokens  # token mean over the (global) minibatch
                    self.accelerator.backward(value_share)
                    _add(stats, {"loss/value": float(value_share.detach())}, 1.0)
                    _add(stats, {"value_clip_frac": float(vstats["clip_frac"])}, weight)
        stats.update(self.run.optimizer_step())  # policy and critic: clip, step, LR schedule; grad_norm, lr
        return stats

    # ---- the stage's side of the run object ------------------------------------------------
    def begin(self, run: Run) -> None:
        self.sampler = EpochSampler(len(self.prompts), self.recipe.train.seed, run.state)

    def step(self, run: Run) -> dict[str, Any]:
        """One iteration: rollout and experience, then the updates; returns its metrics record."""
        try:
            exp, stats, completions = self.rollout(self.sampler, run.iteration)
        except RewardError:
            run.save(self.out / "checkpoints" / f"iter-{run.iteration:06d}-before-reward-error")
            raise
        t0 = time.perf_counter()
        update_stats = self.update(exp)
        self.kl_ctl.update(stats["kl"], len(exp))
        record = {"optimizer_step": run.state.step, **stats, **update_stats, "time/train": all_reduce_max(self.accelerator, time.perf_counter() - t0)}  # the slowest rank's
        if self.critic is not None:
            record["explained_variance"] = float(global_explained_variance(exp.values, exp.returns, exp.mask, all_reduce_sum(self.accelerator)))
        record["sample"] = completions[0]
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "prompt_skip": self.skipper.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.skipper.load_state_dict(state.get("prompt_skip", {}))  # absent in checkpoints written before prompt skipping

    def final_files(self, model: nn.Module) -> dict:
        return {}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{record['reward']:.3f}", "kl": f"{record['kl']:.3f}", "len": f"{record['response_length']:.1f}"}

    def train(self, resume: str | None = None, evaluate=None, overwrite: bool = False) -> Path:
        """Run `ppo.iterations` iterations on the run object (`evaluate` replaces the held-out evaluation)."""
        if evaluate is not None:
            self.evaluate = evaluate
        return self.run.train(self, resume=resume, overwrite=overwrite)


def _add(totals: dict[str, float], values: dict[str, float], weight: float) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value * weight


def run_ppo(recipe: Recipe, resume: str | None = None, reward: RewardSource | None = None, evaluate=None, overwrite: bool = False) -> Path:
    """PPO of the recipe's policy; returns the final checkpoint directory."""
    check_run(recipe.out, "ppo", resume, overwrite)  # before loading anything
    return PPOTrainer(recipe, reward=reward).train(resume=resume, evaluate=evaluate, overwrite=overwrite)
