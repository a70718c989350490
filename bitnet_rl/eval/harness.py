"""EleutherAI's lm-evaluation-harness on the loaded BitLinear model (optional extra `bitnet-rl[eval]`).

The harness's `HFLM` wraps our model object, so what gets evaluated is the quantized function
bitnet-rl computes (ternary weights, int8 activations), not a dense re-load of the directory.
`--lm-eval` takes comma-separated task names, and paths to task YAML files (or directories of
them) for tasks defined locally: their directories are added to the harness's include path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from bitnet_rl.errors import UserError

INSTALL_HINT = "--lm-eval needs lm-evaluation-harness: pip install 'bitnet-rl[eval]'"


def require_lm_eval() -> None:
    """One clear line when the extra is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def parse_tasks(spec: str) -> tuple[list[str], list[str]]:
    """(task names, include paths) from `TASK[,TASK|FILE.yaml|DIR...]`."""
    names, include = [], []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise UserError(f"--lm-eval: task file not found: {path}")
            include.append(str(path.parent.resolve()))
            names.append(_task_name(path))
        elif path.is_dir():
            include.append(str(path.resolve()))
            names += [_task_name(p) for p in sorted(path.glob("*.yaml"))]
        else:
            names.append(item)
    if not names:
        raise UserError(f"--lm-eval {spec!r}: no task names")
    return names, include


def _task_name(path: Path) -> str:
    import yaml

    class Lenient(yaml.SafeLoader):  # task files use custom tags such as !function
        pass

    Lenient.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(), Loader=Lenient) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--lm-eval {path}: invalid YAML ({err})") from None
    name = data.get("task") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise UserError(f"--lm-eval {path}: no 'task:' name in the file")
    return name


def prepare_tasks(spec: str) -> tuple[list[str], Any]:
    """(task names, the harness's TaskManager), checking every name before any model runs."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names, include = parse_tasks(spec)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--lm-eval: unknown task {unknown[0]!r} (see `lm-eval ls tasks`, or pass a task YAML file)")
    return names, manager


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: tuple[list[str], Any], limit: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run the prepared harness tasks (`prepare_tasks`) on `model`; returns {task: {metric: value}}
    (metric names as the harness spells them, e.g. `acc,none`, `acc_stderr,none`)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, manager = tasks
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(
        model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=1000,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )  # fmt: skip
    results = (out or {}).get("results", {})
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"} for task, metrics in results.items()}
