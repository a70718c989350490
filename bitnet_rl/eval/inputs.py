"""What `bitnet-rl eval` reads, checked before any model runs: the checkpoint (a policy, not a
reward model), the reference (same tokenizer), reward sources with their optional exactness
checkers, prompts and the run the checkpoint came from (for defaults and training curves).

Every mistake is a `UserError` naming the culprit.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

from bitnet_rl.errors import UserError
from bitnet_rl.models.build import resolve_model_dir
from bitnet_rl.models.io import read_config

CORRECT_NAMES = ("correct", "is_correct")  # an exactness checker beside a python reward


def checkpoint_dir(path: str | Path, flag: str) -> Path:
    """The model directory of a checkpoint or run dir, refusing reward models and non-LMs."""
    resolved = resolve_model_dir(path)
    if not Path(resolved).is_dir():
        raise UserError(f"{flag} {path}: directory not found")
    config = read_config(resolved)
    architectures = config.get("architectures") or []
    if any("SequenceClassification" in a for a in architectures) or (Path(resolved) / "reward_stats.json").is_file():
        raise UserError(f"{flag} {path}: this is a reward model ({', '.join(architectures) or 'scalar head'}), not a policy; pass it as --reward")
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{flag} {path}: architecture {architectures[0]} is not a causal language model")
    return Path(resolved)


def run_dir_of(model_dir: Path) -> Path | None:
    """The training run a checkpoint belongs to (the directory holding metrics.jsonl), if any:
    `OUT/final`, `OUT/checkpoints/step-N`, or OUT itself."""
    for candidate in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def run_recipe(run_dir: Path | None) -> dict[str, Any]:
    """The resolved recipe a run saved (`OUT/recipe.json`), or {}."""
    if run_dir is None or not (run_dir / "recipe.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "recipe.json").read_text())
    except json.JSONDecodeError:
        return {}


def checkpoint_lambda(model_dir: Path) -> float:
    """λ the checkpoint's run would use next (its recipe's schedule at its saved step); 1 when unknown.

    A checkpoint saved during λ warm-up computes the blend W + λ·(Q(W) − W), not the ternary model."""
    from bitnet_rl.quant.schedule import lambda_at

    state_file = model_dir / "trainer_state" / "state.json"
    schedule = (run_recipe(run_dir_of(model_dir)).get("quant") or {}).get("schedule")
    if not schedule or not state_file.is_file():
        return 1.0
    step = json.loads(state_file.read_text()).get("step", 0)
    return float(lambda_at(step, schedule.get("kind", "linear"), schedule.get("warmup_steps", 0), schedule.get("k", 10.0), schedule.get("value", 1.0)))


def check_same_tokenizer(policy_tokenizer: Any, reference_tokenizer: Any, ref_path: Path) -> None:
    """KL and side-by-side comparison need one token space: same vocabulary and special tokens."""
    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise UserError(
            f"--ref {ref_path}: its tokenizer differs from the checkpoint's "
            f"(vocabulary {len(reference_tokenizer.get_vocab())} vs {len(policy_tokenizer.get_vocab())} tokens or different ids)"
        )
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(policy_tokenizer, name) != getattr(reference_tokenizer, name):
            raise UserError(f"--ref {ref_path}: its tokenizer's {name} ({getattr(reference_tokenizer, name)}) differs from the checkpoint's ({getattr(policy_tokenizer, name)})")


def parse_reward_spec(spec: str) -> tuple[float, str]:
    """`SPEC` or `WEIGHT*SPEC` (e.g. `0.5*python:rewards.py:fn`) → (weight, spec)."""
    head, star, tail = spec.partition("*")
    if star:
        try:
            return float(head), tail
        except ValueError:
            pass
    return 1.0, spec


def correct_beside(spec: str) -> Callable[[str, str], bool] | None:
    """`correct(prompt, completion)` (or `is_correct`) defined in the same module as a python reward."""
    if Path(spec).is_dir():
        return None
    from bitnet_rl.rewards.python_fn import load_function

    module = inspect.getmodule(load_function(spec))
    for name in CORRECT_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def load_prompt_list(path: str, limit: int | None) -> list[Any]:
    """Prompts from a file (field `prompt` or `messages`) or `demo` (held-out demo prompts).

    `load_prompts` checks each prompt (a non-empty string or a list of {role, content} messages,
    naming `file:line` otherwise)."""
    from bitnet_rl.data.prompts import load_prompts

    prompts = load_prompts(path, n=limit or 256, seed=1)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts[:limit] if limit else prompts
