"""`bitnet-rl quickstart`: a tiny BitNet model trained end to end on the demo task, on CPU.

A sequence of stages, each reading the previous stage's checkpoint and adding a row to the
before/after table: the random model, then SFT (with a linear λ warm-up), then the alignment
stages. Every stage runs the `recipes/tiny/*.yaml` recipe shipped inside the package (so the
command works from an installed package too), with its own output directory and input model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bitnet_rl.data.demo import format_completion, make_prompts
from bitnet_rl.data.sft import tokenize_sft
from bitnet_rl.data.tokenizer import pad_id
from bitnet_rl.models.io import load_policy, load_tokenizer, save_checkpoint
from bitnet_rl.recipe import SHIPPED_RECIPES, Recipe, TinyModelConfig, read_yaml, validate
from bitnet_rl.rewards.python_fn import PythonReward

REWARD_SPEC = "reward_models.demo_task:reward"
GRPO_REWARD_SPEC = "reward_models.demo_task:exact_match"  # GRPO trains on exact match; every stage is evaluated with REWARD_SPEC
EVAL_PROMPTS = 256
MAX_NEW_TOKENS = 12
FINAL_EVAL_PROMPTS, FINAL_EVAL_SAMPLES = 128, 4


def shipped_recipe(name: str) -> dict[str, Any]:
    """`recipes/tiny/NAME.yaml` as the package ships it, less `out` and `model` (each stage sets them)."""
    data = read_yaml(SHIPPED_RECIPES / "tiny" / f"{name}.yaml")
    return {key: value for key, value in data.items() if key not in ("out", "model")}


def tiny_shape() -> dict[str, Any]:
    """The model the quickstart builds: `model.tiny` of the shipped `recipes/tiny/sft.yaml`."""
    return read_yaml(SHIPPED_RECIPES / "tiny" / "sft.yaml")["model"]["tiny"]


@dataclass
class Context:
    out: Path
    steps: int | None
    progress: bool
    tokenizer: Any = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sft_sampled: torch.Tensor | None = None  # SFT's rewards on the temperature-1 samples, for win rates


def demo_reward():
    return PythonReward(REWARD_SPEC)


def heldout_examples(tokenizer, n: int = EVAL_PROMPTS):
    """Held-out prompts with their correct answers, for the held-out loss column."""
    from reward_models.demo_task import parse_prompt

    records = [{"prompt": p, "completion": format_completion(sorted(parse_prompt(p)))} for p in make_prompts(n, seed=1)]
    return tokenize_sft(records, tokenizer, "prompt_completion", max_length=32)


def evaluate(ctx: Context, name: str, model_dir: Path, seconds: float) -> dict[str, Any]:
    """One row of the table, computed by the eval code (`bitnet_rl.eval.core`): greedy accuracy
    and reward, reward of temperature-1 samples and their win rate against SFT's own
    samples (drawn independently), held-out loss on correct answers, and KL to SFT on the policy's own samples."""
    from reward_models.demo_task import is_correct

    from bitnet_rl.eval import core
    from bitnet_rl.eval.metrics import win_rate

    policy = core.load_model(name, model_dir, "packed", "cpu", max_batch_size=64, max_seq_len=64)
    prompts, sources = make_prompts(EVAL_PROMPTS, seed=1), [(1.0, demo_reward())]
    greedy = core.draw(policy, prompts, 1, 0.0, MAX_NEW_TOKENS, seed=0, batch_size=64)
    greedy_metrics = core.sample_metrics(greedy, core.score_rewards(sources, greedy), 1, is_correct)
    drawn = core.draw(policy, prompts, 1, 1.0, MAX_NEW_TOKENS, seed=7, batch_size=64)
    sampled = core.score_rewards(sources, drawn)[core.TOTAL]
    pad = pad_id(ctx.tokenizer)
    row = {
        "stage": name,
        "accuracy": greedy_metrics["pass"]["pass@1"],
        "reward": greedy_metrics["reward"][core.TOTAL]["mean"],
        "sampled_reward": float(sampled.mean()),
        "heldout_loss": core.perplexity_metrics(policy.module, heldout_examples(ctx.tokenizer), pad)["nll"],
        "kl": None,
        "win_rate": None,
        "seconds": seconds,
        "sample": f"{greedy.prompts[0]}{greedy.completions[0]}",
    }
    if name == "sft":  # the baseline of the win rates: SFT's own samples, drawn independently
        baseline = core.draw(policy, prompts, 1, 1.0, MAX_NEW_TOKENS, seed=7 + core.REFERENCE_SEED_OFFSET, batch_size=64)
        ctx.sft_sampled = core.score_rewards(sources, baseline)[core.TOTAL]
    elif ctx.sft_sampled is not None and name != "init":
        row["win_rate"] = win_rate(sampled, ctx.sft_sampled)["win_rate"]
        sft = core.load_model("sft", ctx.checkpoints["sft"], "packed", "cpu", max_batch_size=64, max_seq_len=64)
        row["kl"] = core.kl_metrics(policy.module, sft.module, drawn, pad)["k1_seq"]
    ctx.rows.append(row)
    return row


def final_report(ctx: Context, echo: Callable[[str], None]) -> Path | None:
    """`bitnet-rl eval` of the last aligned policy against the SFT checkpoint (report under OUT/eval)."""
    from bitnet_rl.eval.run import EvalConfig, run_eval

    policies = [name for name, _, is_policy in STAGES if is_policy and name in ctx.checkpoints and name not in ("init", "sft")]
    if not policies or "sft" not in ctx.checkpoints:
        return None
    final = policies[-1]
    rewards = [REWARD_SPEC] + ([f"0*{ctx.checkpoints['rm']}"] if "rm" in ctx.checkpoints else [])  # the RM's score, shown but not summed
    config = EvalConfig(
        checkpoint=str(ctx.checkpoints[final]), ref=str(ctx.checkpoints["sft"]), rewards=rewards, prompts="demo",
        num_prompts=FINAL_EVAL_PROMPTS, n_samples=FINAL_EVAL_SAMPLES, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
        out=str(ctx.out / "eval"), progress=ctx.progress, command=["bitnet-rl", "eval", str(ctx.checkpoints[final]), "--ref", str(ctx.checkpoints["sft"])],
    )  # fmt: skip
    echo(f"\n[eval] {final} against sft, {FINAL_EVAL_PROMPTS} held-out prompts x {FINAL_EVAL_SAMPLES} samples:")
    run_eval(config, echo=echo)
    return ctx.out / "eval" / "report.md"


def stage_init(ctx: Context) -> Path:
    from bitnet_rl.models.convert import to_bitlinear
    from bitnet_rl.models.tiny import tiny_bitnet

    model, tokenizer = tiny_bitnet(shape=TinyModelConfig(**tiny_shape()), seed=0)
    ctx.tokenizer = tokenizer
    return save_checkpoint(to_bitlinear(model), tokenizer, ctx.out / "init")


def stage_sft(ctx: Context) -> Path:
    from bitnet_rl.train.sft import run_sft

    data = dict(shipped_recipe("sft"), out=str(ctx.out / "sft"), model={"path": str(ctx.checkpoints["init"])})
    data["logging"] = dict(data["logging"], progress=ctx.progress)
    if ctx.steps:
        data["train"] = dict(data["train"], max_steps=ctx.steps)
    return run_sft(validate(Recipe, data, "quickstart sft recipe"), overwrite=True)


def _stage_recipe(ctx: Context, base: dict[str, Any], name: str, model: Path, **extra: Any) -> Recipe:
    data = {**base, "out": str(ctx.out / name), "model": {"path": str(model)}, **extra}
    data["logging"] = dict(data.get("logging", {}), progress=ctx.progress)
    return validate(Recipe, data, f"quickstart {name} recipe")


def stage_dpo(ctx: Context) -> Path:
    from bitnet_rl.train.dpo import run_dpo

    return run_dpo(_stage_recipe(ctx, shipped_recipe("dpo"), "dpo", ctx.checkpoints["sft"]), overwrite=True)


def stage_rm(ctx: Context) -> Path:
    """The demo's preference pairs plus best-vs-worst of 4 SFT samples on 512 RL prompts, labelled
    by the programmatic reward (an RM that never saw the policy's own mistakes is gamed by PPO)."""
    import json

    from bitnet_rl.data.demo import make_pref_records
    from bitnet_rl.rollout import make_generator
    from bitnet_rl.train.onpolicy_prefs import onpolicy_pairs
    from bitnet_rl.train.rm import run_rm

    policy = load_policy(ctx.checkpoints["sft"]).eval()
    generator = make_generator(policy, backend="packed", max_batch_size=256, max_seq_len=64)
    base, ppo_base = shipped_recipe("rm"), shipped_recipe("ppo")
    rl_prompts = make_prompts(ppo_base["ppo"]["num_prompts"], seed=0)[:512]  # the RL training prompts (seed 0)
    pairs = onpolicy_pairs(generator, ctx.tokenizer, demo_reward(), rl_prompts, samples=4, max_new_tokens=MAX_NEW_TOKENS)
    prefs = ctx.out / "rm-prefs.jsonl"
    records = pairs + make_pref_records(base["data"]["demo_size"], seed=0)
    prefs.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {**base, "data": {**base["data"], "path": str(prefs)}}
    rm_dir = run_rm(_stage_recipe(ctx, data, "rm", ctx.checkpoints["sft"]), overwrite=True)
    ctx.notes.append(f"reward model ({len(pairs)} on-policy pairs among {len(records)}): {_last_metrics(ctx.out / 'rm')}")
    return rm_dir


def stage_grpo_python(ctx: Context) -> Path:
    from bitnet_rl.train.ppo import run_ppo

    base = shipped_recipe("grpo")
    ppo = dict(base["ppo"], rewards=[{"source": GRPO_REWARD_SPEC}])
    return run_ppo(_stage_recipe(ctx, {**base, "ppo": ppo}, "grpo-python", ctx.checkpoints["sft"]), overwrite=True)


def stage_ppo_learned(ctx: Context) -> Path:
    from bitnet_rl.train.ppo import run_ppo

    # a learned reward can be gamed: a stronger KL anchor keeps the policy near the RM's training data;
    # 60 iterations (of ppo.yaml's 100) keep the whole quickstart within 3 minutes (100 gave 56.6 %, 60 gave 57.8 %)
    base = shipped_recipe("ppo")
    ppo = dict(base["ppo"], rewards=[{"source": str(ctx.checkpoints["rm"])}], kl_coef=0.2, iterations=60)
    return run_ppo(_stage_recipe(ctx, {**base, "ppo": ppo}, "ppo-rm", ctx.checkpoints["sft"]), overwrite=True)


def _last_metrics(out: Path) -> str:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return ", ".join(f"{k} {last[k]:.3f}" for k in ("val_accuracy", "val_margin") if k in last)


# (name, run, evaluated as a policy): later stages start from the SFT checkpoint.
STAGES: list[tuple[str, Callable[[Context], Path], bool]] = [
    ("init", stage_init, True),
    ("sft", stage_sft, True),
    ("dpo", stage_dpo, True),
    ("rm", stage_rm, False),
    ("grpo-python", stage_grpo_python, True),
    ("ppo-rm", stage_ppo_learned, True),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stage | accuracy (greedy) | mean reward (greedy) | mean reward (sampled, T=1) | win rate vs SFT (T=1) | held-out loss | KL to SFT | stage time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        kl = "—" if row.get("kl") is None else f"{row['kl']:.3f}"
        win = "—" if row.get("win_rate") is None else f"{row['win_rate']:.1%}"
        lines.append(
            f"| {row['stage']} | {row['accuracy']:.1%} | {row['reward']:.3f} | {row['sampled_reward']:.3f} | {win} | "
            f"{row['heldout_loss']:.3f} | {kl} | {row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def run_quickstart(
    out: Path, steps: int | None = None, progress: bool = True, echo: Callable[[str], None] = print, stages: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run every stage in order, evaluate each checkpoint, print the table; returns its rows."""
    torch.manual_seed(0)
    ctx = Context(out=Path(out), steps=steps, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name, run, is_policy in STAGES:
        if stages is not None and name not in stages:
            continue
        t0 = time.perf_counter()
        ctx.checkpoints[name] = run(ctx)
        if ctx.tokenizer is None:
            ctx.tokenizer = load_tokenizer(ctx.checkpoints[name])
        if not is_policy:
            echo(f"[{name}] {ctx.notes[-1]} ({time.perf_counter() - t0:.0f} s)")
            continue
        row = evaluate(ctx, name, ctx.checkpoints[name], time.perf_counter() - t0)
        echo(f"[{name}] accuracy {row['accuracy']:.1%}, mean reward {row['reward']:.3f}, held-out loss {row['heldout_loss']:.3f}; e.g. {row['sample']!r}")
    echo("")
    echo(format_table(ctx.rows))
    for note in ctx.notes:
        echo(note)
    final_report(ctx, echo)
    echo(f"\ntotal wall time {time.perf_counter() - started:.0f} s; checkpoints under {ctx.out}/")
    return ctx.rows
