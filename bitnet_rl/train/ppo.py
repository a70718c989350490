"""PPO (and GRPO / RLOO / REINFORCE++) for BitNet policies, on accelerate, sampling with the packed generator.

Per iteration: sample prompts → roll out (`PackedGenerator`, synced from the policy; with
dynamic sampling, tied groups are dropped and refilled) → score (+ missing-EOS and overlong
penalties) → `Experience` built on the device from the `RolloutOutput`, keeping the generator's
log-probs → log-probs of the policy (old) and of the frozen 2-bit reference, critic values →
rollout mismatch metrics and correction weights (`rl/correction.py`) → KL penalty (in the reward,
or as a loss term) → advantages (`rl/estimators.py`) → epochs of clipped policy and value
updates over minibatches. λ follows the recipe's schedule per optimizer step; ternary health
every `logging.health_every` steps; greedy held-out evaluation every `ppo.eval_every`
iterations. Everything needed to continue exactly is checkpointed: policy, critic, both
optimizers, KL controller, RNG, prompt order and step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bitnet_rl.distributed.collective import all_ranks, all_reduce_sum, gather_rows, main_then_wait, reduce_rollout_stats, skip_grad_sync
from bitnet_rl.distributed.fsdp import check_uniform_dtypes, full_model_state, full_optimizer_state, gathered_params, load_optimizer_state
from bitnet_rl.distributed.reduce import global_explained_variance, loss_denominator, weighted_means
from bitnet_rl.data.prompts import encode_prompt, load_prompts, rollout_prompt_ids
from bitnet_rl.errors import UserError
from bitnet_rl.lora.apply import finish_lora
from bitnet_rl.lora.critic import adapter_critic
from bitnet_rl.lora.rl import lora_generator, policy_reference
from bitnet_rl.models.build import build_policy, resolve_dtype, resolve_model_dir
from bitnet_rl.models.convert import enable_checkpointing
from bitnet_rl.models.io import prompt_format_of, save_checkpoint
from bitnet_rl.models.value import load_scalar_model
from bitnet_rl.quant.bitlinear import set_lambda
from bitnet_rl.quant.health import code_snapshot, ternary_health
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
from bitnet_rl.rl.shaping import group_reward_stats
from bitnet_rl.rollout import make_generator
from bitnet_rl.train.experience import (
    Experience,
    critic_forward,
    experience_from_rollout,
    policy_forward,
)
from bitnet_rl.train.loop import (
    EpochSampler,
    LoopState,
    MetricsLog,
    build_optimizer,
    build_scheduler,
    current_lambda,
    load_rng,
    load_weights,
    make_accelerator,
    prune_checkpoints,
    save_rng,
)
from bitnet_rl.train.ppo_eval import heldout_prompts, make_evaluator
from bitnet_rl.train.ppo_sampling import sample_groups, sample_round
from bitnet_rl.train.rundir import begin_run, check_not_finished, check_run

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
    if cfg.minibatch_size % cfg.micro_batch_size:
        raise UserError(f"ppo.minibatch_size={cfg.minibatch_size} is not a multiple of ppo.micro_batch_size={cfg.micro_batch_size}")
    if cfg.overlong_buffer > recipe.rollout.max_new_tokens:
        raise UserError(f"ppo.overlong_buffer={cfg.overlong_buffer} exceeds rollout.max_new_tokens={recipe.rollout.max_new_tokens}")
    warming_up = current_lambda(recipe, 0) < 1.0
    if warming_up and recipe.rollout.backend == "packed" and cfg.rollout_correction == "none":
        raise UserError(
            "quant.schedule starts below λ = 1, but the packed generator samples the fully ternary model: "
            "set ppo.rollout_correction (e.g. token_tis) or rollout.backend=policy"
        )


class PPOTrainer:
    """Holds the policy, critic, reference, generator, reward and their optimizers."""

    def __init__(self, recipe: Recipe, reward: RewardSource | None = None, device: str | None = None) -> None:
        cfg = recipe.ppo
        check_config(cfg, recipe)
        self.recipe, self.cfg = recipe, cfg
        self.out = Path(recipe.out)
        self.accelerator = make_accelerator(recipe, self.out)
        device = device or self.accelerator.device
        self.policy, self.tokenizer = build_policy(recipe.model, recipe.quant, lam=current_lambda(recipe, 0), device=device, seed=recipe.train.seed)
        self.reference = policy_reference(self.policy, recipe)  # with LoRA: the base with adapters off (no second copy)
        self.reward = reward or load_rewards([(r.weight, r.source) for r in cfg.rewards], device=device)
        self.critic = self._build_critic(device) if ADVANTAGE_ESTIMATORS[cfg.advantage].needs_critic else None
        self.prompts = load_prompts(cfg.prompts or "demo", cfg.num_prompts, seed=recipe.train.seed)
        self.prompt_ids = rollout_prompt_ids(self.tokenizer, self.policy, self.prompts, recipe.data.chat_template, recipe.rollout.max_new_tokens, cfg.prompts or "demo")
        self.chat = prompt_format_of(self.policy) == "chat"  # as rollout_prompt_ids resolved and recorded it
        self.eval_prompts = heldout_prompts(recipe, self.prompts)
        if recipe.train.gradient_checkpointing:
            enable_checkpointing(self.policy)
            if self.critic is not None:
                enable_checkpointing(self.critic)
        if recipe.distributed.strategy == "fsdp2":
            check_uniform_dtypes(self.policy)
        self.optimizer = build_optimizer(self.policy, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe, total_steps=self.total_optimizer_steps())
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        if self.critic is not None:
            self.critic_optimizer = build_optimizer(self.critic, recipe, lr=cfg.critic_lr or recipe.optimizer.lr)
            self.critic, self.critic_optimizer = self.accelerator.prepare(self.critic, self.critic_optimizer)
        self.reference.to(self.accelerator.device)
        self.kl_ctl = kl_controller(cfg)
        self.state = LoopState()
        max_prompt = max(len(p) for p in self.prompt_ids + [encode_prompt(self.tokenizer, p, self.chat) for p in self.eval_prompts])
        with gathered_params(self.unwrapped):  # FSDP2: the generator packs the full weights
            self.generator = lora_generator(lambda: make_generator(  # with LoRA, syncs re-pack Q(W + s·B·A)
                self.unwrapped,
                backend=recipe.rollout.backend,
                max_batch_size=cfg.prompts_per_iteration * cfg.samples_per_prompt,
                max_seq_len=max_prompt + recipe.rollout.max_new_tokens,
            ), self.unwrapped)
        self.evaluate = make_evaluator(recipe, self.tokenizer, self.reward, self.generator, self.eval_prompts, self.chat)
        with gathered_params(self.unwrapped):
            self.codes = code_snapshot(self.unwrapped) if recipe.logging.health_every else None

    def total_optimizer_steps(self) -> int:
        cfg = self.cfg
        per_iteration = cfg.epochs * -(-cfg.prompts_per_iteration * cfg.samples_per_prompt // cfg.minibatch_size)
        return cfg.iterations * per_iteration

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def _build_critic(self, device) -> nn.Module:
        recipe, cfg = self.recipe, self.cfg
        if recipe.lora.enabled and recipe.lora.critic == "adapter":  # a second adapter on the policy's weights
            return adapter_critic(self.policy, recipe.lora, seed=recipe.train.seed)
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
            picked = sampler.next(cfg.prompts_per_iteration * acc.num_processes)[acc.process_index :: acc.num_processes]
            prompts = [self.prompts[i] for i in picked for _ in range(cfg.samples_per_prompt)]
            prompt_ids = [self.prompt_ids[i] for i in picked for _ in range(cfg.samples_per_prompt)]
            seed = self.recipe.train.seed * 100_003 + iteration * acc.num_processes + acc.process_index + round_index * 7_919_113
            return sample_round(self.generator, self.tokenizer, self.reward, prompts, prompt_ids, cfg, self.recipe.rollout, seed, device)

        failure = None
        try:
            sampled = sample_groups(round_fn, cfg, everyone=all_ranks(acc))  # as many rounds on every rank
        except RewardError as err:  # every rank learns of it, so all of them save and stop together
            failure = err
        if not all_ranks(acc)(failure is None):
            raise failure or RewardError("a reward source failed in another process (its error is above); stopping")
        t1 = time.perf_counter()
        exp = experience_from_rollout(sampled.out, sampled.scores, device)
        mask = exp.mask
        self.policy.eval()
        exp.old_logprobs = policy_forward(self.policy, exp)[0] * mask
        exp.ref_logprobs = policy_forward(self.reference, exp)[0] * mask
        if self.critic is not None:
            exp.values = critic_forward(self.critic, exp) * mask
        exp.is_weights, exp.loss_mask = rollout_correction(cfg.rollout_correction, exp.old_logprobs, exp.rollout_logprobs, mask, cfg.rollout_correction_cap)
        kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
        all_reduce = all_reduce_sum(acc) if acc.num_processes > 1 else None
        exp.advantages, exp.returns, _ = compute_advantages(cfg, exp.scores, exp.values, kl, mask, self.kl_ctl.value, all_reduce)
        new_tokens = int(mask.sum())
        t2 = time.perf_counter()
        raw = sampled.raw
        stats = {
            "reward": float(raw.mean()),
            **group_reward_stats(raw, cfg.samples_per_prompt),
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
        rows, groups = len(exp), len(exp) / cfg.samples_per_prompt
        per_row = {k: rows for k in ("reward", "score", "kl", "response_length", "eos_rate")}
        weights = {**per_row, "reward_std": groups, "frac_reward_zero_std": groups, "correction/kept_tokens": float(mask.sum()), "correction/mean_weight": float(exp.loss_mask.sum())}
        stats = reduce_rollout_stats(acc, stats, weights, maxima=("time/generate", "time/score", "time/logprobs", "dynamic/rounds"), sums=("rollout_tokens_per_s", "dynamic/dropped_groups"))
        return exp, stats, sampled.completions

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
                lam = current_lambda(recipe, self.state.step)
                set_lambda(self.unwrapped, lam)
                if self.critic is not None:
                    set_lambda(self.accelerator.unwrap_model(self.critic), lam)
                batch_rows = order[start : start + cfg.minibatch_size]
                stats = self._minibatch_step(exp, batch_rows)
                stats["lambda"] = lam
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
                self.state.step += 1
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
        num_tokens, num_seqs = loss_denominator(whole.sum(), world, reduce).clamp(min=1.0 / world), loss_denominator((whole.sum(1) > 0).sum(), world, reduce).clamp(min=1.0 / world)
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
        max_norm = self.recipe.optimizer.max_grad_norm
        if max_norm > 0:
            stats["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.policy.parameters(), max_norm))
        stats["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            if max_norm > 0:
                self.accelerator.clip_grad_norm_(self.critic.parameters(), max_norm)
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        return stats

    # ---- loop, checkpoints ---------------------------------------------------------------
    def train(self, resume: str | None = None, evaluate=None, overwrite: bool = False) -> Path:
        cfg, recipe, acc = self.cfg, self.recipe, self.accelerator
        iteration = 0
        checkpoint = check_run(self.out, "ppo", resume, overwrite)
        if checkpoint is not None:
            iteration = self._load(checkpoint)
            check_not_finished(checkpoint, iteration, cfg.iterations, key="ppo.iterations")
        main_then_wait(acc, lambda: begin_run(self.out, recipe, "ppo", checkpoint, overwrite))
        metrics = MetricsLog(self.out / "metrics.jsonl", keep_until=iteration, accelerator=acc)
        if acc.is_main_process:
            (self.out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
        if recipe.logging.report_to:
            acc.init_trackers("ppo")
        sampler = EpochSampler(len(self.prompts), recipe.train.seed, self.state)
        bar = tqdm(total=cfg.iterations, initial=iteration, desc="ppo", disable=not recipe.logging.progress or not acc.is_main_process, dynamic_ncols=True)
        evaluate = evaluate or self.evaluate
        while iteration < cfg.iterations:
            try:
                exp, stats, completions = self.rollout(sampler, iteration)
            except RewardError:
                self.save(self.out / "checkpoints" / f"iter-{iteration:06d}-before-reward-error", iteration)
                raise
            t0 = time.perf_counter()
            steps_before = self.state.step
            update_stats = self.update(exp)
            iteration += 1
            stats.update(self._health(steps_before))
            self.kl_ctl.update(stats["kl"], len(exp))
            record = {"step": iteration, "optimizer_step": self.state.step, **stats, **update_stats, "time/train": time.perf_counter() - t0}
            if self.critic is not None:
                record["explained_variance"] = float(global_explained_variance(exp.values, exp.returns, exp.mask, all_reduce_sum(acc)))
            record["sample"] = completions[0]
            last = iteration == cfg.iterations
            if evaluate is not None and ((cfg.eval_every and iteration % cfg.eval_every == 0) or last):
                self.policy.eval()
                record.update(evaluate(self.unwrapped))
            if acc.is_main_process and (iteration % recipe.logging.every == 0 or last):
                metrics.write(record)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}", len=f"{stats['response_length']:.1f}")
            bar.update(1)
            if recipe.checkpoint.every and iteration % recipe.checkpoint.every == 0 and not last:
                self.save(self.out / "checkpoints" / f"step-{iteration:07d}", iteration)
                if acc.is_main_process:
                    prune_checkpoints(self.out / "checkpoints", recipe.checkpoint.keep_last)
        bar.close()
        final = self.save(self.out / "final", iteration)
        if recipe.logging.report_to:
            acc.end_training()
        return final

    def _health(self, steps_before: int) -> dict[str, float]:
        """Ternary health (code fractions, flip rate since the last report) when the optimizer
        step crossed a multiple of `logging.health_every` during this iteration's update."""
        every = self.recipe.logging.health_every
        if not every or steps_before // every == self.state.step // every:
            return {}
        with gathered_params(self.unwrapped):
            report = ternary_health(self.unwrapped, previous=self.codes)
        self.codes = report.codes
        return report.overall()  # the same keys as SFT/DPO/RM (flip_rate, code fractions), so one set of curves reads every run

    def save(self, path: Path, iteration: int) -> Path:
        full_state, optimizer_state = full_model_state(self.policy), full_optimizer_state(self.policy, self.optimizer)  # collective under FSDP2
        if self.critic is not None:
            critic_state, critic_optimizer_state = full_model_state(self.critic), full_optimizer_state(self.critic, self.critic_optimizer)
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return path

        def write_state(trainer_dir: Path) -> None:
            trainer_dir.mkdir()
            torch.save(optimizer_state, trainer_dir / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), trainer_dir / "scheduler.pt")
            if self.critic is not None:
                torch.save(critic_optimizer_state, trainer_dir / "critic_optimizer.pt")
                save_checkpoint(self.accelerator.unwrap_model(self.critic), None, trainer_dir / "critic", kind="critic", state_dict=critic_state)
            save_rng(trainer_dir / "rng.pt")
            state = {**asdict(self.state), "extra": {"iteration": iteration, "kl_ctl": self.kl_ctl.state_dict()}}
            (trainer_dir / "state.json").write_text(json.dumps(state))

        extra = {"trainer_state": write_state}
        if path.name == "final":  # with LoRA: the merged (ternary) model, or base + adapter/
            extra.update(finish_lora(self.unwrapped, self.recipe.lora))
        saved = save_checkpoint(self.unwrapped, self.tokenizer, path, extra=extra, state_dict=full_state)
        self.accelerator.wait_for_everyone()
        return saved

    def _load(self, checkpoint: Path) -> int:
        trainer_dir = checkpoint / "trainer_state"
        load_weights(self.unwrapped, checkpoint)
        device = self.accelerator.device
        load_optimizer_state(self.policy, self.optimizer, torch.load(trainer_dir / "optimizer.pt", map_location=device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(trainer_dir / "scheduler.pt", weights_only=True))
        if self.critic is not None:
            load_weights(self.accelerator.unwrap_model(self.critic), trainer_dir / "critic")
            load_optimizer_state(self.critic, self.critic_optimizer, torch.load(trainer_dir / "critic_optimizer.pt", map_location=device, weights_only=True))
        load_rng(trainer_dir / "rng.pt")
        saved = json.loads((trainer_dir / "state.json").read_text())
        extra = saved.pop("extra")
        self.state = LoopState(**saved)
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        if self.codes is not None:
            with gathered_params(self.unwrapped):
                self.codes = code_snapshot(self.unwrapped)
        return int(extra["iteration"])


def _add(totals: dict[str, float], values: dict[str, float], weight: float) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value * weight


def run_ppo(recipe: Recipe, resume: str | None = None, reward: RewardSource | None = None, evaluate=None, overwrite: bool = False) -> Path:
    """PPO of the recipe's policy; returns the final checkpoint directory."""
    check_run(recipe.out, "ppo", resume, overwrite)  # before loading anything
    return PPOTrainer(recipe, reward=reward).train(resume=resume, evaluate=evaluate, overwrite=overwrite)
