import datetime as dt
import errno
import json
import os
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.train import rundir
from bitnet_rl.train.rundir import find_checkpoint, prune_checkpoints, recipe_hash, remove_stale
from bitnet_rl.train.sft import run_sft

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def recipe(out, **sections):
    data = {
        "out": str(out),
        "model": {"tiny": TINY},
        "data": {"path": "demo", "demo_size": 64, "max_length": 32, "val_fraction": 0},
        "train": {"max_steps": 3, "batch_size": 4},
        "logging": {"progress": False, "health_every": 0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate(Recipe, data, "test")


def fake_checkpoint(path, step, files=("model.safetensors", "config.json")):
    (path / "trainer_state").mkdir(parents=True)
    (path / "trainer_state" / "state.json").write_text(json.dumps({"step": step}))
    for name in files:
        (path / name).write_text("x")
    return path


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    """A crash while deleting (simulated: rmtree dies after removing the weights) never leaves a visible, incomplete step-N."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        fake_checkpoint(root / f"step-{step:07d}", step)

    def dies_halfway(path, ignore_errors=False):
        os.remove(os.path.join(path, "model.safetensors"))
        raise KeyboardInterrupt  # the process is gone from here on

    monkeypatch.setattr(rundir.shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(root, keep_last=2)
    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert visible == ["step-0000002", "step-0000003"]
    assert all((root / name / "model.safetensors").is_file() for name in visible)
    monkeypatch.undo()
    assert remove_stale(root) and sorted(p.name for p in root.iterdir()) == visible


def test_remove_stale_cleans_leftovers_and_restores_a_replaced_final(tmp_path):
    (tmp_path / ".step-0000004.tmp-1a2b3c4d").mkdir()
    (tmp_path / ".step-0000001.trash-00000000").mkdir()
    (tmp_path / ".metrics.jsonl.tmp-123").write_text("x")
    fake_checkpoint(tmp_path / ".final.old-deadbeef", 7)  # killed between the two renames that replace `final`
    fake_checkpoint(tmp_path / "step-0000002", 2)
    removed = remove_stale(tmp_path)
    assert sorted(removed) == [".metrics.jsonl.tmp-123", ".step-0000001.trash-00000000", ".step-0000004.tmp-1a2b3c4d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step-0000002"]


def test_resume_latest_finds_the_before_reward_error_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints" / "step-0000004", 8)
    fake_checkpoint(tmp_path / "checkpoints" / "iter-000006-before-reward-error", 12)
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # no trainer state: not resumable
    assert find_checkpoint(tmp_path, "latest").name == "iter-000006-before-reward-error"


def test_run_identity_and_resume_entries(tmp_path):
    out = tmp_path / "run"
    r = recipe(out, checkpoint={"every": 1, "keep_last": 1})
    run_sft(r)
    identity = json.loads((out / "run.json").read_text())
    assert identity["command"] == "sft" and identity["recipe_sha256"] == recipe_hash(r) and identity["resumes"] == []
    assert abs(dt.datetime.fromisoformat(identity["started"]) - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    assert recipe_hash(r) == recipe_hash(recipe(tmp_path / "elsewhere", checkpoint={"every": 1, "keep_last": 1}))
    longer = recipe(out, checkpoint={"every": 1, "keep_last": 1}, train={"max_steps": 4})
    with pytest.warns(UserWarning, match="recipe that differs"):
        run_sft(longer, resume="latest")
    identity = json.loads((out / "run.json").read_text())
    assert [e["from"] for e in identity["resumes"]] == [str(out / "final")]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_overwrite_replaces_the_old_run(tmp_path):
    out = tmp_path / "run"
    run_sft(recipe(out, checkpoint={"every": 1, "keep_last": 2}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    (out / "mine.txt").write_text("kept")  # not ours: --overwrite leaves it
    run_sft(recipe(out, train={"max_steps": 2}), overwrite=True)
    assert not (out / "checkpoints").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "final" / "trainer_state" / "state.json").read_text())["step"] == 2
    assert (out / "mine.txt").read_text() == "kept"


def test_real_disk_full_names_the_directory(tmp_path, no_compile):
    """On a 160 KiB tmpfs the first checkpoint cannot be written (needs root to mount; skipped otherwise)."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        recipe_file = tmp_path / "r.yaml"
        recipe_file.write_text(json.dumps(json.loads(recipe(small / "run", checkpoint={"every": 1}).model_dump_json())))
        result = CliRunner().invoke(app, ["sft", str(recipe_file)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"disk full: no space left on device in {small / 'run' / 'checkpoints'}" in result.stderr
        assert not [p for p in (small / "run" / "checkpoints").iterdir() if not p.name.startswith(".")]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_disk_full_detection():
    from bitnet_rl.models.io import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), "/")
    assert not disk_full(OSError(errno.EACCES, "Permission denied"), "/")
    torch_error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert disk_full(torch_error, "/", low_bytes=shutil.disk_usage("/").free + 1)
    assert not disk_full(torch_error, "/", low_bytes=0)
    assert not disk_full(ValueError("bad value"), "/", low_bytes=shutil.disk_usage("/").free + 1)


def test_ppo_resume_latest_continues_after_a_reward_error(sft_dir, tmp_path):
    from bitnet_rl.rewards import RewardError
    from bitnet_rl.train.ppo import run_ppo

    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "from pathlib import Path\n"
        "def reward(prompts, completions, **meta):\n"
        f"    if Path({str(tmp_path / 'broken')!r}).exists():\n"
        "        raise RuntimeError('reward server down')\n"
        "    return [1.0] * len(completions)\n"
    )

    def ppo(iterations):
        ppo_cfg = {"prompts": "demo", "num_prompts": 32, "iterations": iterations, "prompts_per_iteration": 4, "epochs": 1,
                   "minibatch_size": 4, "micro_batch_size": 4, "rewards": [{"source": f"python:{flaky}:reward"}]}  # fmt: skip
        data = {"out": str(tmp_path / "run"), "model": {"path": str(sft_dir)}, "rollout": {"max_new_tokens": 4}, "ppo": ppo_cfg,
                "checkpoint": {"every": 1}, "logging": {"progress": False, "health_every": 0}}  # fmt: skip
        return validate(Recipe, data, "test")

    run_ppo(ppo(1))  # a finished first run
    (tmp_path / "broken").touch()
    with pytest.raises(RewardError):
        run_ppo(ppo(3), resume="latest")  # resumes at iteration 1, the reward fails there
    saved = find_checkpoint(tmp_path / "run", "latest")
    assert saved.name == "iter-000001-before-reward-error"
    (tmp_path / "broken").unlink()
    run_ppo(ppo(3), resume="latest")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    identity = json.loads((tmp_path / "run" / "run.json").read_text())
    assert identity["command"] == "ppo" and [e["from"].rsplit("/", 1)[1] for e in identity["resumes"]] == ["final", saved.name]
