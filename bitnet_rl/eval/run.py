"""`bitnet-rl eval CKPT`: did an aligned checkpoint get better, and at what cost?

Samples the checkpoint (and the reference, independently) on held-out prompts, scores
the samples with every reward source, compares the two (win rate with a bootstrap interval,
KL on the policy's temperature-1 samples), adds perplexity on data, length / stop / repetition
statistics, pass@k, ternary health and optionally lm-evaluation-harness tasks, then writes
`report.md`, `results.json` and PNG plots and prints the summary table.

When CKPT belongs to a training run, the run's recipe supplies defaults: its reward sources,
its prompts, and its starting model as the reference (`--ref none` to skip it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from bitnet_rl.errors import UserError
from bitnet_rl.eval import core, inputs, plots
from bitnet_rl.eval.curves import curves, read_metrics
from bitnet_rl.eval.metrics import win_rate
from bitnet_rl.eval.report import format_summary, summary_rows, write_report
from bitnet_rl.train.rundir import check_writable_dir

SIDE_BY_SIDE = 10


@dataclass
class EvalConfig:
    checkpoint: str
    ref: str | None = None  # None: the run's starting model if known; "none": no reference
    rewards: list[str] = field(default_factory=list)  # SPEC or WEIGHT*SPEC; empty: the run's ppo.rewards
    correct: str | None = None  # python:FILE.py:fn checking exactness (default: `correct`/`is_correct` beside a reward)
    prompts: str | None = None  # file or `demo`; None: the run's ppo.prompts
    num_prompts: int | None = None  # first N prompts (demo: how many to generate, default 256)
    data: str | None = None
    n_samples: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    out: str | None = None
    backend: str = "packed"
    batch_size: int = 64
    lm_eval: str | None = None
    lm_eval_limit: int | None = None
    progress: bool = True
    command: list[str] = field(default_factory=lambda: ["bitnet-rl", *sys.argv[1:]])


def check_config(cfg: EvalConfig) -> None:
    """Argument mistakes, before anything is loaded."""
    if cfg.n_samples < 1:
        raise UserError(f"--n-samples must be at least 1 (got {cfg.n_samples})")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (got {cfg.temperature})")
    if cfg.temperature == 0 and cfg.n_samples > 1:
        raise UserError(f"--n-samples {cfg.n_samples} with --temperature 0 gives {cfg.n_samples} identical greedy samples; use a temperature > 0")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {cfg.max_new_tokens})")
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1 (got {cfg.num_prompts})")
    from bitnet_rl.rollout import BACKENDS

    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend {cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.lm_eval:
        from bitnet_rl.eval.harness import require_lm_eval

        require_lm_eval()


def resolve_defaults(cfg: EvalConfig, model_dir: Path) -> tuple[Path | None, list[str]]:
    """Fill reward sources, prompts and reference from the checkpoint's run; returns (run dir, notes)."""
    run_dir = inputs.run_dir_of(model_dir)
    recipe = inputs.run_recipe(run_dir)
    notes = []
    run_rewards = (recipe.get("ppo") or {}).get("rewards") or []
    if not cfg.rewards and run_rewards:
        cfg.rewards = [s["source"] if s.get("weight", 1.0) == 1.0 else f"{s['weight']}*{s['source']}" for s in run_rewards]
        notes.append(f"reward sources from the run's recipe: {', '.join(cfg.rewards)}")
        if cfg.prompts is None and recipe["ppo"].get("prompts"):
            cfg.prompts = recipe["ppo"]["prompts"]
            notes.append(f"prompts from the run's recipe: {cfg.prompts}")
    if cfg.ref is None:
        start = (recipe.get("model") or {}).get("path")
        if start and Path(start).is_dir() and Path(start).resolve() != model_dir.resolve():
            cfg.ref = start
            notes.append(f"reference: the run's starting model {start} (--ref none to skip)")
    if cfg.ref == "none":
        cfg.ref = None
    return run_dir, notes


def load_sources(specs: list[str], correct: str | None, device: str) -> tuple[list[tuple[float, Any]], Callable | None]:
    """Reward sources with weights, and the exactness checker (explicit, or beside a python reward)."""
    from bitnet_rl.rewards import load_reward
    from bitnet_rl.rewards.python_fn import load_function

    sources = []
    for spec in specs:
        weight, source = inputs.parse_reward_spec(spec)
        sources.append((weight, load_reward(source, device)))
    correct_fn = load_function(correct) if correct else None
    for spec in specs:
        if correct_fn is None:
            correct_fn = inputs.correct_beside(inputs.parse_reward_spec(spec)[1])
    return sources, correct_fn


def run_eval(cfg: EvalConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint`; writes the report and returns the results dict."""
    started = time.perf_counter()
    check_config(cfg)
    model_dir = inputs.checkpoint_dir(cfg.checkpoint, "CKPT")
    run_dir, notes = resolve_defaults(cfg, model_dir)
    ref_dir = inputs.checkpoint_dir(cfg.ref, "--ref") if cfg.ref else None
    if cfg.rewards and cfg.prompts is None:
        raise UserError("--reward needs --prompts FILE (or `--prompts demo`) to sample completions to score")
    if not (cfg.prompts or cfg.data or cfg.lm_eval):
        raise UserError("nothing to evaluate: give --prompts (with --reward), --data or --lm-eval")
    prompts = inputs.load_prompt_list(cfg.prompts, cfg.num_prompts) if cfg.prompts else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sources, correct_fn = load_sources(cfg.rewards, cfg.correct, device)
    out_dir = Path(cfg.out) if cfg.out else (run_dir / "eval" if run_dir else Path("eval") / model_dir.name)
    check_writable_dir(out_dir, "--out" if cfg.out else "report directory")  # before the minutes of sampling, not after

    from bitnet_rl.data.prompts import encode_prompt
    from bitnet_rl.models.io import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if ref_dir is not None:
        inputs.check_same_tokenizer(tokenizer, load_tokenizer(ref_dir), ref_dir)
    examples = core.data_examples(cfg.data, tokenizer) if cfg.data else None
    if cfg.lm_eval:
        from bitnet_rl.eval.harness import prepare_tasks

        lm_tasks = prepare_tasks(cfg.lm_eval)
    from bitnet_rl.models.io import prompt_format_of, read_config

    chat = True if prompt_format_of(read_config(model_dir)) == "chat" else None  # as `core.draw` encodes them
    longest = max((len(encode_prompt(tokenizer, p, chat)) for p in prompts), default=1)
    batch = min(cfg.batch_size, max(len(prompts) * cfg.n_samples, 1))
    models = {}
    for label, path in (("policy", model_dir), ("reference", ref_dir)):
        if path is None:
            continue
        lam = inputs.checkpoint_lambda(path)
        if lam < 1.0:
            notes.append(f"{label} {path} was saved during λ warm-up: evaluated at λ = {lam:.3f}" + (" (sampling with --backend packed draws from the fully ternary model; use --backend policy)" if cfg.backend == "packed" else ""))
            echo(f"note: {notes[-1]}")
        models[label] = core.load_model(label, path, cfg.backend, device, batch, longest + cfg.max_new_tokens, lam=lam)
    pad = tokenizer.pad_token_id

    results: dict[str, Any] = {
        "checkpoint": str(model_dir),
        "reference_path": str(ref_dir) if ref_dir else None,
        "run_dir": str(run_dir) if run_dir else None,
        "command": cfg.command,
        "settings": {**asdict(cfg), "prompts_count": len(prompts), "device": device},
        "lambda": {label: core.model_lambda(model.module) for label, model in models.items()},
        "notes": notes,
    }
    samples, rewards = {}, {}
    if prompts:
        kl_draw = ref_dir is not None and cfg.temperature != 1.0
        total = len(prompts) * (cfg.n_samples * len(models) + (1 if kl_draw else 0))
        with tqdm(total=total, desc="sampling", unit="sample", disable=not cfg.progress, dynamic_ncols=True) as bar:
            for label, model in models.items():
                bar.set_postfix_str(label)
                seed = cfg.seed + (core.REFERENCE_SEED_OFFSET if label == "reference" else 0)
                samples[label] = core.draw(model, prompts, cfg.n_samples, cfg.temperature, cfg.max_new_tokens, seed, batch, bar.update)
            kl_samples = core.draw(models["policy"], prompts, 1, 1.0, cfg.max_new_tokens, cfg.seed + 1, batch, bar.update) if kl_draw else samples.get("policy")
        for label, drawn in samples.items():
            rewards[label] = core.score_rewards(sources, drawn)
            results[label] = core.sample_metrics(drawn, rewards[label], cfg.n_samples, correct_fn)
        if "reference" in models:
            results["comparison"] = {}
            if sources:
                shape = (len(prompts), cfg.n_samples)
                results["comparison"]["win_rate"] = win_rate(rewards["policy"][core.TOTAL].view(shape), rewards["reference"][core.TOTAL].view(shape), seed=cfg.seed)
            kl = core.kl_metrics(models["policy"].module, models["reference"].module, kl_samples, pad)
            results["comparison"]["kl"] = {**kl, "temperature": 1.0, "samples_reused": not kl_draw}
        results["samples"] = side_by_side(samples, rewards, cfg.n_samples)
    if examples is not None:
        for label, model in models.items():
            results.setdefault(label, {})["perplexity"] = core.perplexity_metrics(model.module, examples, pad)
    for label, model in models.items():
        results.setdefault(label, {})["health"] = core.health_metrics(model.module)
    if cfg.lm_eval:
        from bitnet_rl.eval.harness import run_lm_eval

        results["lm_eval"] = run_lm_eval(models["policy"].module, tokenizer, lm_tasks, cfg.lm_eval_limit, seed=cfg.seed)
    results["plots"] = [str(p) for p in make_plots(samples, rewards, run_dir, cfg, out_dir)]
    results["seconds"] = time.perf_counter() - started
    report, _ = write_report(results, out_dir)
    echo(format_summary(summary_rows(results)))
    echo(f"report: {report} (results.json and {len(results['plots'])} plots beside it; {results['seconds']:.0f} s)")
    return results


def side_by_side(samples: dict[str, Any], rewards: dict[str, dict[str, torch.Tensor]], n_samples: int) -> list[dict[str, Any]]:
    """The first sample of the first `SIDE_BY_SIDE` prompts, policy next to reference, with rewards."""
    rows = []
    policy = samples["policy"]
    for index in range(0, min(len(policy.prompts), SIDE_BY_SIDE * n_samples), n_samples):
        row: dict[str, Any] = {"prompt": policy.prompts[index], "policy": policy.completions[index]}
        if core.TOTAL in rewards.get("policy", {}):
            row["policy_reward"] = float(rewards["policy"][core.TOTAL][index])
        if "reference" in samples:
            row["reference"] = samples["reference"].completions[index]
            if core.TOTAL in rewards.get("reference", {}):
                row["reference_reward"] = float(rewards["reference"][core.TOTAL][index])
        rows.append(row)
    return rows


def make_plots(samples: dict[str, Any], rewards: dict[str, dict[str, torch.Tensor]], run_dir: Path | None, cfg: EvalConfig, out_dir: Path) -> list[Path]:
    paths = []
    if rewards.get("policy"):
        single = len(rewards["policy"]) == 2  # one source and its (identical) sum: plot the source only
        shown = {label: {k: v for k, v in r.items() if not (single and k == core.TOTAL)} for label, r in rewards.items()}
        paths.append(plots.reward_distributions(shown, out_dir / "rewards.png"))
    if samples:
        paths.append(plots.length_histograms({k: [len(c) for c in s.completion_ids] for k, s in samples.items()}, cfg.max_new_tokens, out_dir / "lengths.png"))
    if run_dir is not None:
        found = curves(read_metrics(run_dir / "metrics.jsonl"))
        if found:
            paths.append(plots.training_curves(found, out_dir / "training.png", title=f"Training curves of {run_dir}"))
    return paths
