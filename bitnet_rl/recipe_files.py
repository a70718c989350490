"""Recipe files: finding a recipe (a path, or one shipped inside the package), reading its YAML
with one-line errors, and `key.sub=value` overrides. `bitnet_rl.recipe` re-exports all of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bitnet_rl.errors import UserError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        hint = " (a recipe file is passed with --recipe FILE)" if text.endswith((".yaml", ".yml")) else ""
        raise UserError(f"override {text!r}: expected key.sub=value{hint}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


SHIPPED_RECIPES = Path(__file__).parent / "recipes"  # installed with the package


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package, e.g. `recipes/tiny/grpo.yaml`."""
    return sorted(f"recipes/{p.relative_to(SHIPPED_RECIPES).as_posix()}" for p in SHIPPED_RECIPES.glob("*/*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file: `path` itself, or else the shipped recipe it names (`recipes/tiny/sft.yaml` or
    `tiny/sft.yaml`), so the README's recipe paths work from any directory after `pip install`."""
    path = Path(path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    shipped = SHIPPED_RECIPES.joinpath(*parts) if parts and not path.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    raise UserError(f"recipe not found: {path} (shipped recipes: {', '.join(shipped_recipes())})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_recipe_path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the recipe as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data
