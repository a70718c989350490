"""The `bitnet-rl` command line. Parses, validates and calls one function per command.

User mistakes (`UserError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import errno
import os
import functools
import json
from pathlib import Path
from typing import Callable, List, Optional

import typer

from bitnet_rl.errors import UserError
from bitnet_rl.runtime import configure_progress

app = typer.Typer(
    help="Fine-tune and align BitNet b1.58 (ternary) language models: SFT, DPO, reward models, PPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def user_errors(fn: Callable) -> Callable:
    """Turn a `UserError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:  # the disk filled up or became read-only outside a checkpoint write
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            where = f" writing {err.filename}" if err.filename else ""
            what = "disk full: no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
            typer.echo(f"error: {what}{where}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def options(
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU threads for torch (default on CPU-only machines: half the cores, at most 8; OMP_NUM_THREADS is honoured when set)."
    ),
) -> None:
    """Fine-tune and align BitNet b1.58 (ternary) language models."""
    from bitnet_rl.runtime import set_threads

    set_threads(threads)


OVERRIDES_HELP = "Recipe overrides, e.g. optimizer.lr=3e-4 train.max_steps=200."


@app.command()
@user_errors
def info(model_dir: Path = typer.Argument(..., help="A local model directory.")) -> None:
    """Architecture, parameter counts, ternary health and memory (bf16 vs 2-bit packed)."""
    from bitnet_rl.models.inspect import model_summary

    typer.echo(model_summary(model_dir))


def flag_overrides(model: str | None = None, data: str | None = None, out: str | None = None, **more: str | None) -> list[str]:
    """Command-line flags as recipe overrides (applied after the recipe's own overrides)."""
    pairs = []
    if model is not None:
        pairs += [f"model.path={model}", "model.tiny=null"]
    if data is not None:
        pairs.append(f"data.path={data}")
    if out is not None:
        pairs.append(f"out={out}")
    pairs += [f"{key}={value}" for key, value in more.items() if value is not None]
    return pairs


def finished(final: Path) -> None:
    """End of a training command: its last logged metrics on one line, then where the model is."""
    from bitnet_rl.eval.curves import last_metrics_line

    if int(os.environ.get("RANK", "0")) != 0:  # one report from a run of several processes
        return
    summary = last_metrics_line(Path(final).parent)
    if summary:
        typer.echo(f"last metrics: {summary}")
    typer.echo(f"saved {final}")


def launched(recipe, command: str, num_processes: int | None) -> None:
    """With more than one process asked for (and not inside a worker): run the workers, exit with their code."""
    from bitnet_rl.distributed.launch import maybe_launch

    code = maybe_launch(recipe, command, num_processes)
    if code is not None:
        if code != 0:
            typer.echo(f"error: the worker processes failed (exit code {code}); their output is above", err=True)
        raise typer.Exit(code)


MODEL_HELP = "Policy directory (overrides model.path): BitNet master weights, a bitnet-rl checkpoint or run dir, or a dense Llama-style LM."
PROCESSES_HELP = "Run N worker processes (one per GPU; gloo on CPU) through `accelerate launch` (overrides distributed.num_processes)."
RESUME_HELP = "Resume from `latest` (the furthest checkpoint in OUT) or a checkpoint directory."
OVERWRITE_HELP = "Replace the run already in OUT (its checkpoints, final model and metrics); without it a non-empty OUT is an error."


@app.command()
@user_errors
def sft(
    recipe: Path = typer.Argument(..., help="SFT recipe YAML (see `bitnet-rl recipe reference`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="Training data (overrides data.path): a file, a datasets dir, or `demo`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (overrides out)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help=PROCESSES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Supervised fine-tuning with BitLinear, λ warm-up, checkpoints and metrics.jsonl."""
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.sft import run_sft

    resolved = load_recipe(recipe, list(overrides or []) + flag_overrides(model, data, None if out is None else str(out)), stage="sft")
    launched(resolved, "sft", num_processes)
    configure_progress(resolved.logging.progress)
    finished(run_sft(resolved, resume=resume, overwrite=overwrite))


@app.command()
@user_errors
def dpo(
    prefs: Optional[str] = typer.Option(None, "--prefs", help="Preference pairs (prompt, chosen, rejected): .jsonl/.json/.parquet or a datasets dir; `demo` for the demo task."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="DPO recipe YAML (optional: the defaults are complete)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (overrides out)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help=PROCESSES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, e.g. dpo.beta=0.1 dpo.loss_type=ipo."),
) -> None:
    """Direct preference optimization against a frozen (2-bit ternary) reference."""
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.dpo import run_dpo

    extra = flag_overrides(model, prefs, None if out is None else str(out))
    resolved = load_recipe(recipe, list(overrides or []) + extra, stage="dpo")
    launched(resolved, "dpo", num_processes)
    configure_progress(resolved.logging.progress)
    finished(run_dpo(resolved, resume=resume, overwrite=overwrite))


@app.command()
@user_errors
def rm(
    prefs: Optional[str] = typer.Option(None, "--prefs", help="Preference pairs (prompt, chosen, rejected), or `demo`."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Reward-model recipe YAML (optional)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: an SFT checkpoint, any causal LM, or a reward model to continue."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory; OUT/final is what `ppo --reward` takes."),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help=PROCESSES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train a Bradley-Terry reward model (BitLinear backbone + scalar head)."""
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.rm import run_rm

    extra = flag_overrides(model, prefs, None if out is None else str(out))
    resolved = load_recipe(recipe, list(overrides or []) + extra, stage="rm")
    launched(resolved, "rm", num_processes)
    configure_progress(resolved.logging.progress)
    finished(run_rm(resolved, resume=resume, overwrite=overwrite))


@app.command()
@user_errors
def ppo(
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="Reward: a reward-model dir, python:FILE.py:FUNCTION or module:FUNCTION (repeat to sum)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="PPO recipe YAML (optional)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompts file (field prompt or messages), or `demo`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (overrides out)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help=PROCESSES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, e.g. ppo.advantage=grpo ppo.samples_per_prompt=4."),
) -> None:
    """PPO / GRPO / RLOO / REINFORCE++ with a KL penalty to the frozen reference, sampling with the packed generator."""
    from bitnet_rl.recipe import RewardSpec, load_recipe
    from bitnet_rl.train.ppo import run_ppo

    extra = flag_overrides(model, None, None if out is None else str(out), **{"ppo.prompts": prompts})
    resolved = load_recipe(recipe, list(overrides or []) + extra, stage="ppo")
    if reward:
        resolved.ppo.rewards = [RewardSpec(source=spec) for spec in reward]
    launched(resolved, "ppo", num_processes)
    configure_progress(resolved.logging.progress)
    finished(run_ppo(resolved, resume=resume, overwrite=overwrite))


@app.command()
@user_errors
def generate(
    model_dir: Path = typer.Argument(..., help="A model directory or run directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt; the completion is printed."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A prompts file (field prompt or messages); writes JSON lines."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where --prompts writes its JSON lines (default: stdout)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest completion."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus mass (1: off)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Prompts per generator batch."),
    backend: str = typer.Option("packed", "--backend", help="packed (2-bit PackedGenerator) or policy (transformers generate)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", help="Render prompts with the chat template, or not (default: as the model was trained, recorded in its config)."
    ),
) -> None:
    """Sample from a model with the packed 2-bit generator."""
    from bitnet_rl.generate import generate_to_records
    from bitnet_rl.train.rundir import check_writable_file

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if backend not in ("packed", "policy"):
        raise UserError(f"--backend {backend!r}: use packed or policy")
    if out is not None:
        check_writable_file(out)
    records = generate_to_records(
        model_dir, [prompt] if prompt is not None else None, prompts, max_new_tokens, temperature, top_k, top_p, seed, batch_size, backend, chat
    )
    if prompt is not None:
        typer.echo(prompt + records[0]["completion"])
        return
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if out is None:
        typer.echo(lines, nl=False)
    else:
        from bitnet_rl.generate import write_atomic

        write_atomic(out, lines)
        typer.echo(f"wrote {len(records)} completions to {out}", err=True)


@app.command("eval")
@user_errors
def eval_command(
    checkpoint: str = typer.Argument(..., metavar="CKPT", help="The policy to evaluate: a checkpoint or run directory."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference policy to compare with (default: the run's starting model; `none` to skip)."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="Reward: a reward-model dir, python:FILE.py:FUNCTION or module:FUNCTION, optionally WEIGHT*SPEC (repeat to sum; default: the run's)."),
    correct: Optional[str] = typer.Option(None, "--correct", help="python:FILE.py:FUNCTION(prompt, completion) -> bool for pass@k (default: `correct`/`is_correct` beside a python reward)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompts file (field prompt or messages), or `demo` (default: the run's)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Use the first N prompts (demo: generate N, default 256)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data for perplexity: text, prompt/completion or messages (completion tokens only)."),
    n_samples: int = typer.Option(1, "--n-samples", help="Samples per prompt (K): pass@K and mean@K need K > 1."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (KL always uses temperature-1 samples)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest completion."),
    seed: int = typer.Option(0, "--seed", help="Sampling and bootstrap seed."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: RUN/eval, or eval/NAME)."),
    backend: str = typer.Option("packed", "--backend", help="packed (2-bit PackedGenerator) or policy (transformers generate; for λ < 1)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Sequences per generator batch."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks, comma-separated names or task YAML files (needs bitnet-rl[eval])."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="At most N examples per lm-eval task."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar while sampling."),
) -> None:
    """Reward, win rate, KL, perplexity, pass@k and ternary health of a checkpoint against a reference: report.md, results.json, plots."""
    from bitnet_rl.eval.run import EvalConfig, run_eval

    config = EvalConfig(
        checkpoint=checkpoint, ref=ref, rewards=list(reward or []), correct=correct, prompts=prompts, num_prompts=num_prompts,
        data=data, n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
        out=None if out is None else str(out), backend=backend, batch_size=batch_size, lm_eval=lm_eval,
        lm_eval_limit=lm_eval_limit, progress=progress,
    )  # fmt: skip
    run_eval(config, echo=typer.echo)


@app.command()
@user_errors
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where the stages write their checkpoints."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps of the SFT stage (default: the recipe's)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train a tiny BitNet model end to end on the demo task (CPU, minutes) and print a before/after table."""
    from bitnet_rl.quickstart import run_quickstart
    from bitnet_rl.train.rundir import check_writable_dir

    check_writable_dir(out)
    configure_progress(progress)
    run_quickstart(out, steps=steps, progress=progress, echo=typer.echo)


@app.command()
@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint or run directory (anything `--model` accepts)."),
    format: str = typer.Option(..., "--format", help="packed (transformers offline 2-bit), bf16 (master weights) or gguf (llama.cpp)."),
    out: Path = typer.Option(..., "--out", help="Directory to write (replaced atomically if it exists)."),
    gguf_type: str = typer.Option("TQ2_0", "--gguf-type", help="Ternary GGUF type: TQ2_0 (2.06 bits/weight, faster) or TQ1_0 (1.69 bits/weight, smaller)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Require the checkpoint's adapter/ (trained with lora.merge=false). An adapter/ is merged whenever a checkpoint loads; this flag makes its absence an error."),
) -> None:
    """Write a model for where it will run, and print the on-disk sizes."""
    from bitnet_rl.export import export_checkpoint

    options = {"ternary_type": gguf_type} if format == "gguf" else {}
    typer.echo(export_checkpoint(checkpoint, format, out, merge_lora=merge_lora, **options).summary(format))


@recipe_app.command("show")
@user_errors
def recipe_show(
    recipe: Path = typer.Argument(..., help="A recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    stage: Optional[str] = typer.Option(None, "--stage", help="The command it is for: sft, dpo, rm or ppo (default: from its sections; rm needs --stage rm)."),
) -> None:
    """Print the resolved recipe as the command will run it (its defaults, the file and overrides merged), as YAML."""
    import yaml

    from bitnet_rl.recipe import STAGE_RECIPES, infer_stage, load_recipe, read_yaml

    if stage is not None and stage not in STAGE_RECIPES:
        raise UserError(f"--stage {stage!r}: use one of {', '.join(STAGE_RECIPES)}")
    stage = stage or infer_stage(read_yaml(recipe))
    resolved = load_recipe(recipe, overrides, stage=stage)  # the command's own class, as the command loads it
    shown = json.loads(resolved.model_dump_json())
    typer.echo(f"# what `bitnet-rl {stage}` runs with\n" + yaml.safe_dump(shown, sort_keys=False))


@recipe_app.command("list")
def recipe_list() -> None:
    """The recipes that ship with bitnet-rl (give any of them to a command, from any directory)."""
    from bitnet_rl.recipe import shipped_recipes

    typer.echo("\n".join(shipped_recipes()))


@recipe_app.command("reference")
def recipe_reference() -> None:
    """Print every recipe key with its default and meaning, then each command's own defaults (markdown)."""
    from bitnet_rl.reference import command_defaults_markdown, reference_markdown

    typer.echo(reference_markdown() + "\n\nDefaults that depend on the command:\n\n" + command_defaults_markdown())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
