"""PPO (and GRPO / RLOO / REINFORCE++) for BitNet policies, on accelerate, sampling with the packed generator.

Per iteration: sample prompts → roll out (`PackedGenerator`, synced from the policy) → score
(+ missing-EOS penalty) → log-probs of the policy (old) and of the frozen 2-bit reference,
critic values → KL penalty (in the reward, or as a loss term) → advantages → several epochs
of clipped policy and value updates over minibatches. λ follows the recipe's schedule per
optimizer step. Everything needed to continue exactly is checkpointed: policy, critic, both
optimizers, KL controller, RNG, prompt order and step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bitnet_rl.data.prompts import load_prompts, rollout_prompt_ids
from bitnet_rl.data.tokenizer import pad_id
from bitnet_rl.errors import UserError
from bitnet_rl.models.build import build_policy, resolve_dtype, resolve_model_dir
from bitnet_rl.models.convert import enable_checkpointing
from bitnet_rl.models.io import save_checkpoint
from bitnet_rl.models.value import load_scalar_model
from bitnet_rl.quant.bitlinear import set_lambda
from bitnet_rl.recipe import PPOConfig, Recipe
from bitnet_rl.rewards import RewardError, RewardSource, load_rewards
from bitnet_rl.rl import advantages as adv
from bitnet_rl.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from bitnet_rl.rl.losses import explained_variance, ppo_policy_loss, value_loss
from bitnet_rl.rollout import make_generator
from bitnet_rl.lora.apply import finish_lora  # issue 15
from bitnet_rl.lora.critic import adapter_critic  # issue 15
from bitnet_rl.lora.rl import lora_generator, policy_reference  # issue 15
from bitnet_rl.train.experience import Experience, critic_forward, pack_sequences, policy_forward
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
from bitnet_rl.train.rundir import begin_run, check_not_finished, check_run

PPO_DEFAULTS: dict[str, Any] = {
    "out": "runs/ppo",
    "optimizer": {"lr": 1e-6},
    "scheduler": {"kind": "constant"},
}


def kl_controller(cfg: PPOConfig):
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def compute_advantages(cfg: PPOConfig, scores: torch.Tensor, values: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """(advantages, returns, token rewards) `(B, T)` for the recipe's estimator. Pure."""
    token_rewards = adv.scores_to_token_rewards(scores, mask)
    if cfg.kl_mode == "reward":
        token_rewards = adv.add_kl_penalty(token_rewards, kl, kl_coef, mask)
    if cfg.advantage == "gae":
        advantages, returns = adv.gae(token_rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = adv.masked_whiten(advantages, mask)
        return advantages, returns, token_rewards
    if cfg.advantage == "reinforce_pp":
        advantages = adv.reinforce_pp_advantages(token_rewards, mask, cfg.gamma)
        return advantages, advantages.clone(), token_rewards
    sequence_rewards = (token_rewards * mask).sum(dim=1)  # score minus the sequence's KL penalty
    estimator = adv.grpo_advantages if cfg.advantage == "grpo" else adv.rloo_advantages
    per_sequence = estimator(sequence_rewards, cfg.samples_per_prompt)
    advantages = per_sequence.unsqueeze(1) * mask
    if cfg.whiten_advantages and cfg.advantage == "rloo":
        advantages = adv.masked_whiten(advantages, mask)
    return advantages, advantages.clone(), token_rewards


class PPOTrainer:
    """Holds the policy, critic, reference, generator, reward and their optimizers."""

    def __init__(self, recipe: Recipe, reward: RewardSource | None = None, device: str | None = None) -> None:
        cfg = recipe.ppo
        if cfg.advantage in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
            raise UserError(f"ppo.advantage={cfg.advantage} needs ppo.samples_per_prompt >= 2 (got {cfg.samples_per_prompt})")
        if cfg.minibatch_size % cfg.micro_batch_size:
            raise UserError(f"ppo.minibatch_size={cfg.minibatch_size} is not a multiple of ppo.micro_batch_size={cfg.micro_batch_size}")
        self.recipe, self.cfg = recipe, cfg
        self.out = Path(recipe.out)
        self.accelerator = make_accelerator(recipe, self.out)
        device = device or self.accelerator.device
        self.policy, self.tokenizer = build_policy(recipe.model, recipe.quant, lam=current_lambda(recipe, 0), device=device, seed=recipe.train.seed)
        self.reference = policy_reference(self.policy, recipe)  # issue 15: LoRA; reference = base with adapters off
        self.reward = reward or load_rewards([(r.weight, r.source) for r in cfg.rewards], device=device)
        self.critic = self._build_critic(device) if cfg.advantage == "gae" else None
        self.prompts = load_prompts(cfg.prompts or "demo", cfg.num_prompts, seed=recipe.train.seed)
        self.prompt_ids = rollout_prompt_ids(self.tokenizer, self.policy, self.prompts, recipe.data.chat_template, recipe.rollout.max_new_tokens, cfg.prompts or "demo")
        if recipe.train.gradient_checkpointing:
            enable_checkpointing(self.policy)
            if self.critic is not None:
                enable_checkpointing(self.critic)
        self.optimizer = build_optimizer(self.policy, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe, total_steps=self.total_optimizer_steps())
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        if self.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(
                [p for p in self.critic.parameters() if p.requires_grad],
                lr=cfg.critic_lr or recipe.optimizer.lr,
                betas=recipe.optimizer.betas,
                weight_decay=recipe.optimizer.weight_decay,
            )
            self.critic, self.critic_optimizer = self.accelerator.prepare(self.critic, self.critic_optimizer)
        self.reference.to(self.accelerator.device)
        self.kl_ctl = kl_controller(cfg)
        self.state = LoopState()
        max_prompt = max(len(p) for p in self.prompt_ids)
        self.generator = lora_generator(lambda: make_generator(  # issue 15: with LoRA, syncs re-pack Q(W + s·B·A)
            self.unwrapped,
            backend=recipe.rollout.backend,
            max_batch_size=cfg.prompts_per_iteration * cfg.samples_per_prompt,
            max_seq_len=max_prompt + recipe.rollout.max_new_tokens,
        ), self.unwrapped)

    def total_optimizer_steps(self) -> int:
        cfg = self.cfg
        per_iteration = cfg.epochs * -(-cfg.prompts_per_iteration * cfg.samples_per_prompt // cfg.minibatch_size)
        return cfg.iterations * per_iteration

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def _build_critic(self, device) -> nn.Module:
        recipe, cfg = self.recipe, self.cfg
        if recipe.lora.enabled and recipe.lora.critic == "adapter":  # issue 15: critic = second adapter on the policy's weights
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
    def rollout(self, prompt_indices: list[int], iteration: int) -> tuple[Experience, dict[str, float], list[str]]:
        cfg, rcfg = self.cfg, self.recipe.rollout
        device = self.accelerator.device
        prompts = [self.prompts[i] for i in prompt_indices for _ in range(cfg.samples_per_prompt)]
        prompt_ids = [self.prompt_ids[i] for i in prompt_indices for _ in range(cfg.samples_per_prompt)]
        t0 = time.perf_counter()
        if hasattr(self.generator, "sync_from"):
            self.generator.sync_from(self.unwrapped)
        out = self.generator.generate(
            prompt_ids,
            max_new_tokens=rcfg.max_new_tokens,
            temperature=rcfg.temperature,
            top_k=rcfg.top_k,
            top_p=rcfg.top_p,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.recipe.train.seed * 100_003 + iteration * (self.accelerator.num_processes) + self.accelerator.process_index,
        )
        lengths = out.lengths.tolist()
        completion_ids = [out.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        t1 = time.perf_counter()
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        raw = self.reward.score(prompts, completions).to(device)
        stopped = torch.tensor([r == "stop" for r in out.finish_reasons], device=device)
        scores = raw.clone()
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(stopped, scores, scores + cfg.missing_eos_penalty)
        t2 = time.perf_counter()
        input_ids, attention_mask, prompt_lens, mask = (x.to(device) for x in pack_sequences(prompt_ids, completion_ids, pad_id(self.tokenizer)))
        zeros = torch.zeros_like(mask)
        exp = Experience(
            input_ids, attention_mask, prompt_lens, mask,
            old_logprobs=zeros, ref_logprobs=zeros, values=zeros, scores=scores, advantages=zeros, returns=zeros,
        )  # fmt: skip
        self.policy.eval()
        exp.old_logprobs = policy_forward(self.policy, exp)[0]
        exp.ref_logprobs = policy_forward(self.reference, exp)[0]
        if self.critic is not None:
            exp.values = critic_forward(self.critic, exp) * mask
        kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
        exp.advantages, exp.returns, _ = compute_advantages(cfg, scores, exp.values, kl, mask, self.kl_ctl.value)
        new_tokens = int(mask.sum())
        t3 = time.perf_counter()
        stats = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "score": float(scores.mean()),
            "kl": float(kl.sum(1).mean()),
            "kl_coef": self.kl_ctl.value,
            "response_length": new_tokens / len(exp),
            "eos_rate": float(stopped.float().mean()),
            "rollout_tokens_per_s": new_tokens / max(t1 - t0, 1e-9),
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/logprobs": t3 - t2,
        }
        return exp, stats, completions

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
        return {key: value / max(count, 1) for key, value in totals.items()}

    def _minibatch_step(self, exp: Experience, rows: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        stats: dict[str, float] = {}
        micro_batches = rows.split(cfg.micro_batch_size)
        for micro in micro_batches:
            part = exp.select(micro.to(exp.input_ids.device))
            weight = len(micro) / len(rows)
            with self.accelerator.autocast():
                logprobs, entropy = policy_forward(self.policy, part, with_entropy=True)
                loss, pstats = ppo_policy_loss(logprobs, part.old_logprobs, part.advantages, part.mask, cfg.clip_eps)
                mean_entropy = adv.masked_mean(entropy, part.mask)
                loss = loss - cfg.entropy_coef * mean_entropy
                if cfg.kl_mode == "loss":
                    loss = loss + self.kl_ctl.value * adv.masked_mean(kl_estimate(logprobs, part.ref_logprobs, cfg.kl_estimator), part.mask)
            self.accelerator.backward(loss * weight)
            _add(stats, {"loss/policy": float(loss.detach()), "entropy": float(mean_entropy.detach()), "clip_frac": float(pstats["clip_frac"]), "approx_kl": float(pstats["approx_kl"])}, weight)
            if self.critic is not None:
                with self.accelerator.autocast():
                    values = critic_forward(self.critic, part)
                    vloss, vstats = value_loss(values, part.values, part.returns, part.mask, cfg.value_clip_eps)
                self.accelerator.backward(vloss * weight)
                _add(stats, {"loss/value": float(vloss.detach()), "value_clip_frac": float(vstats["clip_frac"])}, weight)
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
        begin_run(self.out, recipe, "ppo", checkpoint, overwrite)
        metrics = MetricsLog(self.out / "metrics.jsonl", keep_until=iteration, accelerator=acc)
        (self.out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
        if recipe.logging.report_to:
            acc.init_trackers("ppo")
        sampler = EpochSampler(len(self.prompts), recipe.train.seed, self.state)
        bar = tqdm(total=cfg.iterations, initial=iteration, desc="ppo", disable=not recipe.logging.progress or not acc.is_main_process, dynamic_ncols=True)
        while iteration < cfg.iterations:
            picked = sampler.next(cfg.prompts_per_iteration * acc.num_processes)[acc.process_index :: acc.num_processes]
            try:
                exp, stats, completions = self.rollout(picked, iteration)
            except RewardError:
                self.save(self.out / "checkpoints" / f"iter-{iteration:06d}-before-reward-error", iteration)
                raise
            t0 = time.perf_counter()
            update_stats = self.update(exp)
            iteration += 1
            self.kl_ctl.update(stats["kl"], len(exp))
            record = {"step": iteration, "optimizer_step": self.state.step, **stats, **update_stats, "time/train": time.perf_counter() - t0}
            if self.critic is not None:
                record["explained_variance"] = float(explained_variance(exp.values, exp.returns, exp.mask))
            record["sample"] = completions[0]
            last = iteration == cfg.iterations
            if evaluate is not None and ((cfg.eval_every and iteration % cfg.eval_every == 0) or last):
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

    def save(self, path: Path, iteration: int) -> Path:
        if not self.accelerator.is_main_process:
            return path

        def write_state(trainer_dir: Path) -> None:
            trainer_dir.mkdir()
            torch.save(self.optimizer.state_dict(), trainer_dir / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), trainer_dir / "scheduler.pt")
            if self.critic is not None:
                torch.save(self.critic_optimizer.state_dict(), trainer_dir / "critic_optimizer.pt")
                save_checkpoint(self.accelerator.unwrap_model(self.critic), None, trainer_dir / "critic", kind="critic")
            save_rng(trainer_dir / "rng.pt")
            state = {**asdict(self.state), "extra": {"iteration": iteration, "kl_ctl": self.kl_ctl.state_dict()}}
            (trainer_dir / "state.json").write_text(json.dumps(state))

        extra = {"trainer_state": write_state}
        if path.name == "final":  # issue 15: final/ is the merged (ternary) model, or base + adapter/
            extra.update(finish_lora(self.unwrapped, self.recipe.lora))
        return save_checkpoint(self.unwrapped, self.tokenizer, path, extra=extra)

    def _load(self, checkpoint: Path) -> int:
        trainer_dir = checkpoint / "trainer_state"
        load_weights(self.unwrapped, checkpoint)
        device = self.accelerator.device
        self.optimizer.load_state_dict(torch.load(trainer_dir / "optimizer.pt", map_location=device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(trainer_dir / "scheduler.pt", weights_only=True))
        if self.critic is not None:
            load_weights(self.accelerator.unwrap_model(self.critic), trainer_dir / "critic")
            self.critic_optimizer.load_state_dict(torch.load(trainer_dir / "critic_optimizer.pt", map_location=device, weights_only=True))
        load_rng(trainer_dir / "rng.pt")
        saved = json.loads((trainer_dir / "state.json").read_text())
        extra = saved.pop("extra")
        self.state = LoopState(**saved)
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        return int(extra["iteration"])


def _add(totals: dict[str, float], values: dict[str, float], weight: float) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value * weight


def run_ppo(recipe: Recipe, resume: str | None = None, reward: RewardSource | None = None, evaluate=None, overwrite: bool = False) -> Path:
    """PPO of the recipe's policy; returns the final checkpoint directory."""
    check_run(recipe.out, "ppo", resume, overwrite)  # before loading anything
    return PPOTrainer(recipe, reward=reward).train(resume=resume, evaluate=evaluate, overwrite=overwrite)
