"""Run directories: one run per `OUT`, what it is, and checkpoints that are complete or invisible.

    OUT/run.json                 identity: command, argv, recipe hash, start time (+ one entry per resume)
    OUT/recipe.json, metrics.jsonl
    OUT/checkpoints/step-N/      complete HF directories with trainer_state/ (the newest keep_last)
    OUT/checkpoints/iter-N-before-reward-error/   PPO's checkpoint when a reward function failed
    OUT/final/

A checkpoint is written to a hidden `.NAME.tmp-*` sibling and renamed into place
(`models.io.save_checkpoint`), and pruning renames a checkpoint to a hidden `.NAME.trash-*`
before deleting it, so a visible `step-N` is always complete whenever the process dies.
Hidden leftovers of a killed process are removed when the run (re)starts. A new run refuses a
non-empty `OUT` unless it resumes (`--resume`) or replaces (`--overwrite`) what is there, so
two runs never mix their checkpoints and metrics.

Everything that can be checked without writing (`check_run`) is checked before models and data
are loaded; `begin_run` writes the first byte only after they validated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from bitnet_rl.errors import UserError

RUN_FILE = "run.json"
STATE_FILE = Path("trainer_state") / "state.json"
# what one run writes into OUT; --overwrite removes exactly these
RUN_ARTEFACTS = (RUN_FILE, "recipe.json", "metrics.jsonl", "checkpoints", "final")
HIDDEN_MARKERS = (".tmp-", ".old-", ".trash-")


def check_writable_dir(path: str | Path, what: str = "--out", shown: str | Path | None = None) -> Path:
    """Fail (without writing anything) unless `path` is or can become a writable directory.

    Names the culprit: `path` itself when it is a file, the ancestor that is a file, or the
    first existing ancestor that is read-only.
    """
    path = Path(path)
    what = f"{what} {shown if shown is not None else path}"
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{what}: {probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path and shown is None:
            raise UserError(f"{what}: exists and is a file, not a directory")
        raise UserError(f"{what}: {probe} is a file, not a directory")
    if not _writable(probe):
        raise UserError(f"{what}: {probe} is not writable" + (" (read-only file system)" if _read_only_fs(probe) else ""))
    return path


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """Fail unless a file can be written at `path` (its directory writable, `path` not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, not a file")
    check_writable_dir(path.parent, what=what, shown=path)
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _writable(path: Path) -> bool:
    return not _read_only_fs(path) and os.access(path, os.W_OK | os.X_OK)


def _visible_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def read_identity(out: Path) -> dict[str, Any] | None:
    file = Path(out) / RUN_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_run(out: str | Path, command: str, resume: str | None, overwrite: bool) -> Path | None:
    """Everything about `OUT` and `--resume` that can be checked before loading anything.

    Returns the checkpoint to resume from (None for a fresh run). Writes nothing.
    """
    out = check_writable_dir(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: resume continues OUT, overwrite replaces it")
    identity = read_identity(out)
    if resume:
        if identity and identity.get("command") not in (None, command):
            raise UserError(
                f"--resume: {out} holds a `bitnet-rl {identity['command']}` run; it cannot be resumed by `bitnet-rl {command}`"
            )
        return check_checkpoint_files(find_checkpoint(out, resume))
    entries = _visible_entries(out)
    if entries and not overwrite:
        what = (
            f"a `bitnet-rl {identity.get('command')}` run started {identity.get('started', '?')}"
            if identity
            else f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({', '.join(entries[:3])}{', …' if len(entries) > 3 else ''})"
        )
        raise UserError(f"--out {out} is not empty: it holds {what}; pass --resume latest to continue it or --overwrite to replace it")
    return None


def recipe_hash(recipe: Any) -> str:
    """sha256 of the resolved recipe without `out` (the same recipe in another directory hashes the same).

    Hashed as the whole `Recipe` (a command's own class leaves the other commands' sections at their
    defaults), so a run started before the per-command classes resumes without a mismatch warning."""
    from bitnet_rl.recipe import Recipe

    data = json.loads(Recipe.model_validate(recipe.model_dump()).model_dump_json())
    data.pop("out", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def begin_run(out: str | Path, recipe: Any, command: str, resumed_from: Path | None, overwrite: bool) -> None:
    """Create `OUT`, replace an old run (`overwrite`), remove a killed process's leftovers, record the identity."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_ARTEFACTS:
            _remove_atomically(out / name)
    remove_stale(out)
    remove_stale(out / "checkpoints")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    digest = recipe_hash(recipe)
    identity = read_identity(out) if resumed_from is not None else None
    if identity is None:
        identity = {"command": command, "argv": list(sys.argv), "recipe_sha256": digest, "started": now, "resumes": []}
        if resumed_from is not None:
            identity["resumes"].append({"from": str(resumed_from), "at": now, "recipe_sha256": digest})
    else:
        if identity.get("recipe_sha256") != digest:
            warnings.warn(
                f"{out}: resuming with a recipe that differs from the one this run started with "
                f"(sha256 {digest[:12]} vs {str(identity.get('recipe_sha256'))[:12]}; see {out / 'recipe.json'})",
                stacklevel=2,
            )
        identity.setdefault("resumes", []).append({"from": str(resumed_from), "at": now, "argv": list(sys.argv), "recipe_sha256": digest})
    write_text_atomic(out / RUN_FILE, json.dumps(identity, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_atomically(path: Path) -> None:
    """Rename out of sight, then delete: a crash in between leaves only a hidden `.NAME.trash-*`."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def remove_stale(root: Path) -> list[str]:
    """Delete hidden leftovers of a killed process in `root` (`.NAME.tmp-*`, `.NAME.trash-*`, `.NAME.old-*`).

    An `.NAME.old-*` whose `NAME` is missing (killed between the two renames that replace a
    directory) is renamed back instead: it is the last complete version.
    """
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        name = entry.name
        marker = next((m for m in HIDDEN_MARKERS if m in name), None)
        if not name.startswith(".") or marker is None:
            continue
        target = root / name[1:].split(marker)[0]
        if marker == ".old-" and not target.exists():
            os.rename(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    return removed


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def find_checkpoint(out_dir: str | Path, resume: str) -> Path:
    """`latest` → the furthest resumable checkpoint in OUT; else the directory `resume` names.

    `latest` looks at `checkpoints/step-*`, PPO's `checkpoints/iter-*-before-reward-error` and
    `final`; a directory without `trainer_state/state.json` is not resumable. Of checkpoints at
    the same step (a reward error right after a resume from `final`) the newest wins.
    """
    out_dir = Path(out_dir)
    if resume == "latest":
        root = out_dir / "checkpoints"
        candidates = [*root.glob("step-*"), *root.glob("iter-*"), out_dir / "final"]
        found = [p for p in candidates if (p / STATE_FILE).is_file()]
        if not found:
            raise UserError(f"--resume latest: no checkpoints in {root} nor {out_dir / 'final'}")
        steps = {}
        for path in found:
            try:
                steps[path] = checkpoint_step(path)
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"--resume latest: {path / STATE_FILE} is unreadable; delete {path} or resume another checkpoint") from None
        return max(found, key=lambda p: (steps[p], (p / STATE_FILE).stat().st_mtime))  # ties: the newest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a bitnet-rl checkpoint (no trainer_state/state.json)")
    return path


def check_checkpoint_files(checkpoint: Path) -> Path:
    """Cheap structural checks of a checkpoint before anything is loaded or written: readable
    safetensors headers, a parseable state.json, and trainer-state files that are whole zip archives."""
    import zipfile

    from bitnet_rl.models.io import check_weight_files

    if not check_weight_files(checkpoint):
        raise UserError(f"--resume {checkpoint}: no .safetensors weights found")
    try:
        checkpoint_step(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--resume {checkpoint}: {checkpoint / STATE_FILE} is unreadable") from None
    for file in sorted((checkpoint / "trainer_state").glob("*.pt")):
        try:
            zipfile.ZipFile(file).close()
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"{file}: cannot read the checkpoint's trainer state ({err}); resume another checkpoint") from None
    return checkpoint


def load_trainer_file(path: Path, **kwargs: Any) -> Any:
    """`torch.load` of a checkpoint's trainer-state file, a one-line error when it is missing or damaged."""
    import torch

    try:
        return torch.load(path, **kwargs)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"{path}: cannot read the checkpoint's trainer state ({str(err).splitlines()[0][:120]}); resume another checkpoint") from None


def check_not_finished(checkpoint: Path, step: int, max_steps: int, key: str = "train.max_steps") -> None:
    """Resuming at or after the last step would only copy the checkpoint: say so instead."""
    if step >= max_steps:
        raise UserError(
            f"--resume {checkpoint}: the checkpoint is at step {step} and {key}={max_steps}, so there is nothing left to train "
            f"(raise {key} to continue training)"
        )


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` `step-*` checkpoints, each renamed out of sight before deletion."""
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        _remove_atomically(old)
