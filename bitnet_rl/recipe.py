"""Recipes: pydantic models of every section, each command's recipe class, a YAML loader and
`key.sub=value` overrides.

`Recipe` holds every section; each command validates against its own class (`SFTRecipe`,
`DPORecipe`, `RMRecipe`, `PPORecipe`), which holds only the sections it reads and applies the
command's defaults (`STAGE_DEFAULTS`). Unknown keys, another command's keys and wrong types are
`UserError`s naming the key path and the file. The field descriptions below are the recipe
reference in the README (`bitnet-rl recipe reference`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bitnet_rl.errors import UserError
from bitnet_rl.recipe_files import (  # noqa: F401  (re-exported: the recipe API)
    SHIPPED_RECIPES,
    apply_overrides,
    parse_override,
    read_yaml,
    resolve_recipe_path,
    shipped_recipes,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LambdaSchedule(Section):
    kind: Literal["constant", "linear", "sigmoid", "exponential"] = Field(
        "constant", description="How λ (share of quantization blended in) rises: constant, linear, sigmoid or exponential."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps over which λ rises from 0 to 1 (non-constant kinds).")
    k: float = Field(10.0, gt=0, description="Steepness of the sigmoid / exponent of the exponential schedule.")
    value: float = Field(1.0, ge=0, le=1, description="λ of the constant schedule.")


class QuantConfig(Section):
    granularity: Literal["per_tensor", "per_channel", "per_group"] = Field(
        "per_tensor", description="Scope of the absmean weight scale: one per tensor (BitNet b1.58), per output row, or per group."
    )
    group_size: int = Field(128, gt=0, description="Input columns per scale group (per_group only).")
    activations: Literal["int8", "none"] = Field("int8", description="Per-token absmax int8 activation quantization, or none.")
    schedule: LambdaSchedule = Field(default_factory=LambdaSchedule, description="λ schedule.")

    def layer_settings(self) -> dict[str, Any]:
        """The part of the settings that defines the quantized function (saved with checkpoints)."""
        return self.model_dump(include={"granularity", "group_size", "activations"})


class TinyModelConfig(Section):
    hidden_size: int = Field(64, gt=0, description="Hidden size of the tiny demo model.")
    num_hidden_layers: int = Field(2, gt=0, description="Decoder layers of the tiny demo model.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads of the tiny demo model.")
    num_key_value_heads: int = Field(2, gt=0, description="KV heads of the tiny demo model.")
    intermediate_size: int = Field(128, gt=0, description="MLP width of the tiny demo model.")
    tokenizer_vocab_size: int = Field(384, ge=64, description="Vocabulary of the byte-level BPE tokenizer trained for the tiny model.")
    tokenizer_data: str | None = Field(
        None,
        description="Data file (any supported format) whose text trains the tiny model's tokenizer; default: the run's own training data (the demo corpus for `demo` and for ppo).",
    )

    def shape(self) -> dict[str, int]:
        """The architecture fields (what goes into the model config)."""
        return self.model_dump(exclude={"tokenizer_vocab_size", "tokenizer_data"})


class ModelConfig(Section):
    path: str | None = Field(
        None, description="Local model directory: BitNet BF16 master weights, a bitnet-rl checkpoint, or a dense Llama-style LM."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Master-weight dtype: auto is float32 on CPU, bfloat16 on GPU."
    )
    tiny: TinyModelConfig | None = Field(None, description="Build a random tiny BitNet model instead of loading `path` (demo, tests); excludes `path`.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.tiny is not None and self.path:
            raise ValueError(
                f"model.tiny and model.path={self.path} are both set; remove one (--model DIR replaces model.tiny)"
            )
        return self


class DataConfig(Section):
    path: str | None = Field(None, description="Training data: .jsonl/.json/.parquet/.csv file or a datasets directory; `demo` for the bundled task.")
    format: Literal["auto", "text", "prompt_completion", "messages", "prefs"] = Field("auto", description="Record format; auto detects it from the fields.")
    max_length: int = Field(512, gt=0, description="Truncate token sequences to this length.")
    max_prompt_length: int = Field(256, gt=0, description="Longest prompt allowed (preference and RL data).")
    train_on_prompt: bool = Field(False, description="Also put the loss on prompt / user tokens.")
    packing: bool = Field(False, description="Concatenate examples into max_length chunks.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of records held out for validation loss / perplexity.")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Render prompts with the tokenizer's chat template: always, never, or auto (when the data holds chat messages or the model was trained on chat prompts, as its checkpoint records).",
    )
    demo_size: int = Field(2000, gt=0, description="Records generated when path is `demo`.")


class OptimizerConfig(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (BitNet seed notebook: 0.9, 0.95).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 for BitNet, as in the seed notebook).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")


class SchedulerConfig(Section):
    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of the peak (cosine/linear).")


class TrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="Optimizer steps to run (unless `epochs` is set).")
    epochs: float | None = Field(None, gt=0, description="If set, train this many passes over the data instead of max_steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch (per process).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    loss_aggregation: Literal["mean", "sum"] = Field(
        "mean", description="Token loss aggregation: mean over tokens, or sum (BitNet b1.58 2B4T SFT)."
    )
    seed: int = Field(0, description="Seed for data order, init and sampling.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile each decoder layer (regional; the first steps compile). CUDA speed lever.")
    eval_every: int = Field(0, ge=0, description="Validation every N steps (0: only at the end).")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save a resumable checkpoint every N optimizer steps (0: only at the end).")
    keep_last: int = Field(2, gt=0, description="How many step checkpoints to keep.")


class LoggingConfig(Section):
    every: int = Field(1, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Extra trackers through accelerate.")
    progress: bool = Field(True, description="Show a progress bar.")
    health_every: int = Field(10, ge=0, description="Ternary health (code fractions, flip rate) every N steps (0: off).")


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO β: strength of the implicit KL constraint to the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO loss: sigmoid (DPO), ipo, hinge (SLiC), robust (cDPO-style noise-robust).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (sigmoid and robust).")
    rpo_alpha: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen completions (RPO); keeps their likelihood from falling."
    )
    reference: Literal["ternary", "precompute", "full"] = Field(
        "ternary",
        description="Frozen reference: a 2-bit packed ternary copy (default), log-probs precomputed once before training, or a full-precision copy.",
    )


class LoraSettings(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) on the BitLinear projections instead of all weights.")
    mode: Literal["pre_quant", "post_quant"] = Field(
        "pre_quant",
        description="pre_quant: W_eff = Q(W + s·B·A), trains and merges into a ternary model; post_quant: plain LoRA after the ternary product (its merge is not ternary).",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling s = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA input dropout (post_quant only; pre_quant needs 0).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )
    merge: bool = Field(True, description="Write final/ as the merged model (ternary for pre_quant); false: the base weights plus final/adapter/.")
    critic: Literal["model", "adapter"] = Field(
        "model",
        description="PPO critic with LoRA (ppo.advantage gae): model = ppo.critic's separate model; adapter = a second adapter + value head on the policy's own base weights (no second model).",
    )
    reference: Literal["base", "copy"] = Field(
        "base",
        description="Reference of DPO and PPO with LoRA: base = the policy with adapters disabled (no second copy); copy = dpo.reference / PPO's packed copy.",
    )


class RolloutConfig(Section):
    backend: Literal["packed", "policy"] = Field(
        "packed",
        description="packed: the 2-bit PackedGenerator (samples the fully quantized model); policy: the training model's own generate (exact on-policy during λ warm-up).",
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest completion sampled.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")


class RewardSpec(Section):
    source: str = Field(..., description="python:FILE.py:FUNCTION, module.path:FUNCTION, or a reward-model directory.")
    weight: float = Field(1.0, description="Weight of this source in the summed reward.")


class PPOConfig(Section):
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward sources, summed with weights (--reward adds one).")
    prompts: str | None = Field("demo", description="Prompts file (field prompt or messages) or `demo`.")
    num_prompts: int = Field(512, gt=0, description="Prompts generated when prompts is `demo`.")
    iterations: int = Field(100, gt=0, description="Rollout + update iterations.")
    prompts_per_iteration: int = Field(16, gt=0, description="Prompts sampled per iteration (per process).")
    samples_per_prompt: int = Field(1, gt=0, description="Completions per prompt (≥ 2 for grpo / rloo).")
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field("gae", description="Advantage estimator (registered in bitnet_rl.rl.estimators).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    group_std_eps: float = Field(1e-4, gt=0, description="ε in GRPO's (r − mean) / (std + ε) (TRL 1.16: 1e-4).")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator.")
    kl_mode: Literal["reward", "loss"] = Field("reward", description="KL in the reward (classic RLHF) or as a loss term (GRPO style).")
    adaptive_kl: bool = Field(False, description="Adapt the KL coefficient towards kl_target (Ziegler et al.).")
    kl_target: float = Field(6.0, gt=0, description="Target KL per sequence for the adaptive controller.")
    kl_horizon: float = Field(10000, gt=0, description="Horizon of the adaptive controller.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip ε (the lower bound 1 − ε; also the upper one unless clip_eps_high is set).")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip ε (DAPO's clip-higher, e.g. 0.28); default: clip_eps.")
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="How token losses become the minibatch loss (verl loss_agg_mode; token_mean is TRL's dapo)."
    )
    value_clip_eps: float = Field(0.2, gt=0, description="Value clip ε.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    whiten_advantages: bool | None = Field(
        None, description="Whiten advantages (gae: over tokens; grpo/rloo: per sequence). Default: on for gae, off for grpo/rloo (as TRL)."
    )
    rollout_correction: Literal["none", "token_tis", "seq_tis", "token_mask", "seq_mask"] = Field(
        "token_tis",
        description="Correct for the generator not being the training policy: truncated importance weights (tis) or masking, per token or sequence.",
    )
    rollout_correction_cap: float = Field(2.0, gt=1, description="C: weights min(π_old/π_rollout, C); masks keep ratios in [1/C, C].")
    old_logprobs: Literal["policy", "prefill", "rollout"] = Field(
        "policy",
        description="π_old for the PPO ratio: the training policy's own forward; the generator's packed prefill (fully ternary, "
        "needs rollout.backend=packed and λ = 1); or the generator's sampling log-probs, no extra pass (needs "
        "rollout_correction=none). The last two leave the rollout-mismatch metrics measuring the generator against itself.",
    )
    dynamic_sampling: bool = Field(False, description="Drop groups whose rewards all tie and refill with new prompts (DAPO; grpo/rloo).")
    dynamic_sampling_rounds: int = Field(3, ge=0, description="Extra generation rounds allowed per iteration to refill dropped groups.")
    dynamic_sampling_max_mean: float | None = Field(
        None, description="Dynamic sampling also drops groups whose mean raw reward exceeds this (PRIME's accuracy ≤ 0.8 filter; 0/1 rewards: mostly solved prompts)."
    )
    skip_dropped_prompts: float = Field(
        0.0, ge=0, lt=1, description="Probability of skipping, before generation, a prompt whose latest group dynamic sampling dropped (GRESO; 0: off)."
    )
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty over the last N tokens before max_new_tokens (0: off).")
    overlong_penalty: float = Field(1.0, ge=0, description="Scale of the overlong penalty (−scale at max_new_tokens).")
    epochs: int = Field(2, gt=0, description="Passes over each rollout batch.")
    minibatch_size: int = Field(8, gt=0, description="Sequences per optimizer step (per process).")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward (per process; gradient accumulation below minibatch_size).")
    missing_eos_penalty: float | None = Field(None, description="Added to the score of completions that hit max_new_tokens without EOS.")
    critic: Literal["policy", "reward_model"] = Field("policy", description="Critic backbone for gae: a copy of the SFT policy, or the reward model.")
    critic_lr: float | None = Field(None, gt=0, description="Critic learning rate (default: optimizer.lr).")
    critic_values: Literal["critic", "prefill"] = Field(
        "critic",
        description="Rollout values (gae): the critic's own forward, or a packed copy of it re-synced each iteration on the generator's "
        "prefill path (W2A8 kernels on CUDA; needs λ = 1 and no LoRA). The update always trains the critic's own forward.",
    )
    eval_every: int = Field(0, ge=0, description="Greedy evaluation on held-out prompts every N iterations (0: only at the end).")
    eval_prompts: int = Field(128, ge=0, description="Held-out prompts for evaluation (0: no evaluation).")
    eval_path: str | None = Field(None, description="Held-out prompts file for evaluation; default: fresh demo prompts when prompts is `demo`, none otherwise.")


class DistributedConfig(Section):
    num_processes: int = Field(1, ge=1, description="Worker processes (one per GPU; on CPU, gloo workers); above 1 the command starts them through `accelerate launch` (`--num-processes` overrides).")
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="ddp: a full replica per process, gradients all-reduced; fsdp2: parameters, gradients and optimizer state sharded per decoder layer (accelerate's FSDP2 plugin; needs GPUs).")
    accelerate_config: str | None = Field(None, description="An `accelerate config` YAML file for the launch (multi-node): distributed_type MULTI_GPU or FSDP (with strategy fsdp2); the keys above win where both are set.")


class CommonSections(Section):
    """The sections every command reads."""

    out: str = Field("runs/out", description="Output directory (checkpoints, metrics.jsonl).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy to load.")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="BitLinear quantization and λ schedule.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW settings.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and progress.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Several processes (GPUs) through accelerate.")


class DPOSections(Section):
    """What only `bitnet-rl dpo` reads."""

    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO (bitnet-rl dpo).")


class PPOSections(Section):
    """What only `bitnet-rl ppo` reads."""

    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling for RL.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO / GRPO (bitnet-rl ppo).")


class Recipe(PPOSections, DPOSections, CommonSections):
    """Every section, at the schema's defaults: the Python API's recipe (`validate(Recipe, ...)`) and
    the recipe reference. Each command validates against its own class (`STAGE_RECIPES`)."""


def validate(model_cls: type[Section], data: dict[str, Any], source: str) -> Section:
    """Build `model_cls` from `data`; the first error becomes a one-line `UserError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            owner = section_owner(key) if issubclass(model_cls, StageRecipe) else None
            if owner is not None:
                shown = _foreign_key(key, first.get("input"))
                raise UserError(f"{source}: {shown} is a `bitnet-rl {owner}` key, but this recipe runs `bitnet-rl {model_cls.stage}`") from None
            raise UserError(f"{source}: unknown key {key}") from None
        if first["type"] == "value_error":
            raise UserError(f"{source}: {first['msg'].removeprefix('Value error, ')}") from None
        raise UserError(f"{source}: {key}: {first['msg']} (got {first.get('input')!r})") from None


# Defaults each command runs with where its recipe is silent: the one place they live (each command's
# class below applies them; the README's per-command table is generated from them). sft needs a
# recipe file; dpo/rm/ppo run without one.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {  # TRL's DPO defaults where they apply
        "out": "runs/dpo",
        "optimizer": {"lr": 1e-6},
        "scheduler": {"kind": "cosine", "warmup_steps": 10},
        "train": {"max_steps": 500, "batch_size": 8},
        "data": {"format": "prefs", "max_length": 1024, "max_prompt_length": 512, "val_fraction": 0.05},
    },
    "rm": {
        "out": "runs/rm",
        "optimizer": {"lr": 1e-5},
        "scheduler": {"kind": "cosine", "warmup_steps": 10},
        "train": {"max_steps": 500, "batch_size": 8},
        "data": {"format": "prefs", "max_length": 1024, "max_prompt_length": 512, "val_fraction": 0.05},
    },
    "ppo": {"out": "runs/ppo", "optimizer": {"lr": 1e-6}, "scheduler": {"kind": "constant"}},
}


class StageRecipe(CommonSections):
    """A command's recipe: only the sections it reads, so another command's key is a validation
    error, with the command's defaults (`STAGE_DEFAULTS[stage]`) under whatever it is given.
    `recipe show` prints an instance, so it shows exactly what the command runs with."""

    stage: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _command_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # a whole-recipe dump (an older run's recipe.json) carries the other commands' sections at
        # their defaults: harmless, dropped; a changed value would be ignored, so it stays and is refused
        data = {k: v for k, v in data.items() if k in cls.model_fields or section_owner(k) is None or _changed_keys(k, v)}
        merged = _deep_merge(copy.deepcopy(STAGE_DEFAULTS[cls.stage]), data)
        return {k: merged[k] for k in cls.model_fields if k in merged} | {k: v for k, v in merged.items() if k not in cls.model_fields}


class SFTRecipe(StageRecipe):
    """`bitnet-rl sft`."""

    stage: ClassVar[str] = "sft"


class DPORecipe(DPOSections, StageRecipe):
    """`bitnet-rl dpo`."""

    stage: ClassVar[str] = "dpo"


class RMRecipe(StageRecipe):
    """`bitnet-rl rm`."""

    stage: ClassVar[str] = "rm"


class PPORecipe(PPOSections, StageRecipe):
    """`bitnet-rl ppo` (PPO, GRPO, RLOO, REINFORCE++)."""

    stage: ClassVar[str] = "ppo"


STAGE_RECIPES: dict[str, type[StageRecipe]] = {cls.stage: cls for cls in (SFTRecipe, DPORecipe, RMRecipe, PPORecipe)}
# Sections that only one command reads (a view of the classes): in another command's recipe they are an error.
STAGE_ONLY_SECTIONS: dict[str, tuple[str, ...]] = {
    stage: own for stage, cls in STAGE_RECIPES.items() if (own := tuple(n for n in cls.model_fields if n not in CommonSections.model_fields))
}


def section_owner(section: str) -> str | None:
    """The command that alone reads `section` (`dpo` → dpo, `rollout`/`ppo` → ppo), or None."""
    return next((stage for stage, sections in STAGE_ONLY_SECTIONS.items() if section in sections), None)


def _changed_keys(section: str, value: Any) -> list[str]:
    """Keys of a section's value that differ from the schema's defaults (all of it when not a mapping)."""
    if not isinstance(value, dict):
        return [section]
    defaults = Recipe.model_fields[section].get_default(call_default_factory=True).model_dump(mode="json")
    return [k for k, v in value.items() if defaults.get(k, object()) != v]


def _foreign_key(section: str, value: Any) -> str:
    changed = _changed_keys(section, value)
    return f"{section}.{changed[0]}" if isinstance(value, dict) and changed else section


def infer_stage(data: dict[str, Any]) -> str:
    """The command a recipe is for, from the command-only sections it sets (sft when it sets none)."""
    for stage, sections in STAGE_ONLY_SECTIONS.items():
        if any(section in data for section in sections):
            return stage
    return "sft"


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model_cls: type[Section] = Recipe,
    base: dict[str, Any] | None = None,
    stage: str | None = None,
) -> Section:
    """Read a YAML recipe (or start from `base`/defaults when `path` is None), apply overrides, validate.

    With `stage` (sft | dpo | rm | ppo) it validates against that command's class
    (`STAGE_RECIPES`): the command's defaults go under the file, and a key of another command's
    section in the file or the overrides is an error."""
    if stage is not None:
        model_cls = STAGE_RECIPES[stage]
    source = str(path) if path is not None else "recipe"
    own = read_yaml(path) if path is not None else {}
    data = _deep_merge(copy.deepcopy(base or {}), own)  # deep copy: overrides edit sections in place, never a caller's defaults
    data = apply_overrides(data, list(overrides or []))
    return validate(model_cls, data, source)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
