"""The eval report: a summary table (also printed to the terminal), side-by-side samples,
`report.md` and `results.json`.

`results` is the plain dict `run.run_eval` builds: `policy` / `reference` hold each model's own
metrics (`core.sample_metrics`, perplexity, health), `comparison` the paired ones (win rate, KL).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bitnet_rl.eval.core import TOTAL


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _reward_cell(stats: dict[str, float] | None) -> str:
    if not stats or not stats.get("n"):
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} (median {stats['q50']:.3f})"


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, policy, reference) rows of the summary table; absent values are '—'."""
    policy, reference = results.get("policy", {}), results.get("reference") or {}
    comparison = results.get("comparison", {})
    rows: list[tuple[str, str, str]] = []
    sources = list(policy.get("reward", {}))
    for source in sources:
        label = "reward (weighted sum)" if source == TOTAL else f"reward: {source}"
        if source == TOTAL and len(sources) == 2:
            continue  # one source: its sum is itself
        rows.append((label, _reward_cell(policy["reward"][source]), _reward_cell(reference.get("reward", {}).get(source))))
    win = comparison.get("win_rate")
    if win:
        rows.append(("win rate vs reference (95% CI)", f"{win['win_rate']:.1%} [{win['ci_low']:.1%}, {win['ci_high']:.1%}]", f"{win['wins']}W / {win['ties']}T / {win['losses']}L"))
    kl = comparison.get("kl")
    if kl:
        rows.append(("KL per token: k1 ± SE / k3 ± SE", f"{_num(kl['k1_token'], '.4f')} ± {_num(kl['k1_token_se'], '.4f')} / {_num(kl['k3_token'], '.4f')} ± {_num(kl['k3_token_se'], '.4f')}", "—"))
        rows.append(("KL per sequence: k1 ± SE / k3 ± SE", f"{_num(kl['k1_seq'])} ± {_num(kl['k1_seq_se'])} / {_num(kl['k3_seq'])} ± {_num(kl['k3_seq_se'])}", "—"))
        if "exact_seq" in kl:
            rows.append(("KL per sequence, full vocabulary ± SE", f"{_num(kl['exact_seq'])} ± {_num(kl['exact_seq_se'])}", "—"))
    for key in sorted(policy.get("pass", {}), key=lambda k: (k.startswith("mean"), int(k.split("@")[1]))):
        rows.append((key, f"{policy['pass'][key]:.1%}", _pct(reference.get("pass", {}).get(key))))
    if "perplexity" in policy:
        ppl = policy["perplexity"]
        rows.append((f"perplexity on --data ({ppl['tokens']} tokens)", _num(ppl["perplexity"]), _num(reference.get("perplexity", {}).get("perplexity"))))
    if "length" in policy and policy["length"].get("n"):
        ref_len = reference.get("length", {})
        rows.append(("response length (tokens, mean)", _num(policy["length"]["mean"], ".1f"), _num(ref_len.get("mean"), ".1f")))
        rows.append(("stop (EOS) rate", _pct(policy.get("stop_rate")), _pct(reference.get("stop_rate"))))
        key = next(k for k in policy if k.startswith("repetition_rate"))
        rows.append((f"repeated {key.split('_')[-1].replace('gram', '-grams')}", _pct(policy[key]), _pct(reference.get(key))))
    if "health" in policy:
        rows.append(("ternary codes −1 / 0 / +1", _codes(policy["health"]), _codes(reference.get("health"))))
        rows.append(("collapsed BitLinear layers (std < 1e-3)", str(len(policy["health"]["collapsed_layers"])), str(len(reference["health"]["collapsed_layers"])) if reference.get("health") else "—"))
    for task, metrics in (results.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            name, _, filt = metric.partition(",")
            if "stderr" in name or name == "sample_len":
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            shown = _num(float(value), ".4f") + (f" ± {_num(float(stderr), '.4f')}" if isinstance(stderr, (int, float)) else "")
            label = name if filt in ("", "none") else f"{name} ({filt})"
            rows.append((f"lm-eval {task}: {label} (n={metrics.get('sample_len', '?')})", shown, "—"))
    return rows


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _codes(health: dict[str, Any] | None) -> str:
    if not health:
        return "—"
    return f"{health['frac_neg']:.1%} / {health['frac_zero']:.1%} / {health['frac_pos']:.1%}"


def format_summary(rows: list[tuple[str, str, str]]) -> str:
    """The summary rows as a markdown table (also what the terminal shows)."""
    lines = ["| metric | policy | reference |", "| --- | --- | --- |"]
    lines += [f"| {m} | {p} | {r} |" for m, p, r in rows]
    return "\n".join(lines)


def _cell(text: str, width: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def _prompt_text(prompt: Any) -> str:
    """A plain prompt as is; chat messages as `role: content` turns."""
    if isinstance(prompt, list):
        return " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def samples_table(examples: list[dict[str, Any]]) -> str:
    """Prompts with the policy's and the reference's completions side by side, with their rewards."""
    with_ref = any("reference" in e for e in examples)
    head = "| # | prompt | policy | reward |" + (" reference | reward |" if with_ref else "")
    lines = [head, "| --- " * (6 if with_ref else 4) + "|"]
    for i, e in enumerate(examples):
        row = f"| {i} | {_cell(_prompt_text(e['prompt']))} | {_cell(e['policy'])} | {_num(e.get('policy_reward'))} |"
        if with_ref:
            row += f" {_cell(e.get('reference', ''))} | {_num(e.get('reference_reward'))} |"
        lines.append(row)
    return "\n".join(lines)


def report_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    parts = [
        f"# Evaluation of `{results['checkpoint']}`",
        "",
        f"Reference: `{results.get('reference_path') or 'none'}`. "
        f"{settings['prompts_count']} prompts × {settings['n_samples']} samples at temperature {settings['temperature']}, "
        f"max {settings['max_new_tokens']} new tokens, seed {settings['seed']}, backend {settings['backend']}.",
        "",
        "## Summary",
        "",
        format_summary(summary_rows(results)),
        "",
    ]
    if results.get("samples"):
        parts += ["## Samples", "", samples_table(results["samples"]), ""]
    if results.get("plots"):
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]] + [""]
    notes = results.get("notes") or []
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    parts += ["## Command", "", "```", " ".join(results["command"]), "```", ""]
    return "\n".join(parts)


def write_report(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `results.json` (every number, the command line, seeds, paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    report.write_text(report_markdown(results))
    data = out_dir / "results.json"
    data.write_text(json.dumps(_jsonable(results), indent=2))
    return report, data


def _jsonable(value: Any) -> Any:
    """Tensors to lists, paths to strings, NaN/inf to null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
