"""The README's generated reference: each command's own recipe defaults and every command-line option.

`bitnet-rl recipe reference` prints the recipe keys (`reference_markdown`) and the
per-command defaults; tests check that the README holds exactly what these functions return.
"""

from __future__ import annotations

from typing import Any

from bitnet_rl.recipe import Recipe, Section


def reference_markdown(model_cls: type[Section] = Recipe, prefix: str = "") -> str:
    """A table of every key with its type, default and description (the README's recipe reference)."""
    rows = [] if prefix else ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        nested = _section_type(annotation)
        if nested is not None:
            rows.extend(reference_markdown(nested, prefix=f"{key}.").splitlines())
            continue
        if field.is_required():
            shown = "required"
        else:
            default = field.get_default(call_default_factory=True)
            shown = "—" if default is None else f"`{default}`"
        rows.append(f"| `{key}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def _section_type(annotation: Any) -> type[Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


def command_recipe_defaults() -> dict[str, dict[str, Any]]:
    """The defaults each command merges under a recipe file (sft has none: its recipe file is required)."""
    from bitnet_rl.recipe import STAGE_DEFAULTS

    return STAGE_DEFAULTS


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def command_defaults_markdown() -> str:
    """A table of the keys whose default depends on the command (other keys: the recipe reference)."""
    per_command = {name: _flatten(values) for name, values in command_recipe_defaults().items()}
    base = _flatten(Recipe().model_dump())
    keys = sorted({key for values in per_command.values() for key in values}, key=list(base).index)
    rows = ["| key | sft (the recipe default) | dpo | rm | ppo |", "| --- | --- | --- | --- | --- |"]
    for key in keys:
        cells = [f"`{per_command[c].get(key, base[key])}`" for c in ("dpo", "rm", "ppo")]
        rows.append(f"| `{key}` | `{base[key]}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cli_options_markdown() -> str:
    """Every command's arguments and options with their defaults (read from the Typer app itself)."""
    import typer

    from bitnet_rl.cli import app

    rows = ["| command | argument / option | default | meaning |", "| --- | --- | --- | --- |"]

    def describe(param) -> tuple[str, str]:
        if param.param_type_name == "argument":
            return param.name.upper() + (" ..." if param.nargs == -1 else ""), "required" if param.required else "—"
        label = " / ".join([*param.opts, *param.secondary_opts])
        return label, "—" if param.default is None else f"`{param.default}`"

    def walk(command, name: str) -> None:
        if hasattr(command, "commands"):  # a group: its own options, then each subcommand
            for sub_name in sorted(command.commands):
                walk(command.commands[sub_name], f"{name} {sub_name}")
            return
        for param in command.params:
            if param.name == "help":
                continue
            label, default = describe(param)
            meaning = (getattr(param, "help", None) or "").replace("|", "\\|")
            rows.append(f"| `{name}` | `{label}` | {default} | {meaning} |")

    root = typer.main.get_command(app)
    for param in root.params:
        if param.name != "help":
            label, default = describe(param)
            rows.append(f"| `bitnet-rl` (before any command) | `{label}` | {default} | {param.help} |")
    walk(root, "bitnet-rl")
    return "\n".join(rows)



def generated_blocks() -> dict[str, str]:
    return {"recipe-reference": reference_markdown(), "command-defaults": command_defaults_markdown(), "command-options": cli_options_markdown()}


def update_readme(path: str) -> None:
    """Rewrite the generated blocks of a README (`<!-- NAME:start -->` … `<!-- NAME:end -->`) in place."""
    import re
    from pathlib import Path

    text = Path(path).read_text()
    for name, body in generated_blocks().items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: no <!-- {name}:start --> … <!-- {name}:end --> block")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    Path(path).write_text(text)


if __name__ == "__main__":  # python -m bitnet_rl.reference README.md
    import sys

    update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
