"""Every core dependency in pyproject.toml is imported somewhere in the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pyyaml": "yaml", "lm-eval": "lm_eval", "huggingface-hub": "huggingface_hub"}


def declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]]


def imported_modules() -> set[str]:
    """Top-level names of every absolute import in the package's sources (lazy imports included)."""
    found = set()
    for folder in ("bitnet_rl", "reward_models"):
        for source in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def test_core_dependencies_are_imported_by_the_package():
    imported = imported_modules()
    unused = [name for name in declared() if IMPORT_NAMES.get(name, name) not in imported]
    assert unused == [], f"declared but never imported by bitnet_rl/: {unused} (move them to the extra that uses them)"


def test_third_party_imports_are_declared():
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    names = {IMPORT_NAMES.get(n, n) for n in declared()}
    names |= {IMPORT_NAMES.get(s, s) for s in (re.split(r"[<>=!~\[; ]", e, maxsplit=1)[0].lower() for e in extras)}
    third_party = {m for m in imported_modules() if m not in sys.stdlib_module_names and m not in ("bitnet_rl", "reward_models")}
    assert third_party <= names | {"numpy"}, third_party - names  # numpy: required by torch and gguf
