"""SIGKILL a checkpointing SFT run at seeded random moments; every visible checkpoint must be complete
and `--resume latest` must finish bit-identically to an uninterrupted run.

Each attempt is forked from a warm fork server (modules imported once), so a kill costs no
interpreter start. Every run uses one intra-op thread, like the uninterrupted reference run, so
the floating point summation order (and so every bit) is the same.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet_rl.recipe import Recipe, validate

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
KILLS = 12
MAX_STEPS = 30


def recipe(out: Path) -> Recipe:
    return validate(
        Recipe,
        {
            "out": str(out),
            "model": {"tiny": TINY},
            "quant": {"schedule": {"kind": "linear", "warmup_steps": 10}},
            "data": {"path": "demo", "demo_size": 200, "max_length": 32, "val_fraction": 0},
            "optimizer": {"lr": 3e-3},
            "train": {"max_steps": MAX_STEPS, "batch_size": 8},
            "checkpoint": {"every": 1, "keep_last": 2},
            "logging": {"progress": False, "health_every": 0},
        },
        "kill test",
    )


PRELOAD = ["bitnet_rl.train.sft", "bitnet_rl.models.tiny", "bitnet_rl.data.demo", "accelerate", "transformers.models.bitnet.modeling_bitnet"]


def forkserver():
    """A fresh, single-threaded process with our modules imported; every run is forked from it.

    Forking pytest itself is not safe: once torch has run OpenMP regions with several threads,
    a forked child can hang in its first parallel region (libgomp is not fork-safe).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start(context, out: Path, resume: str | None, overwrite: bool):
    """Start a process that runs the SFT stage into `out`."""
    from bitnet_rl.train.sft import run_sft

    process = context.Process(target=run_sft, args=(recipe(out),), kwargs={"resume": resume, "overwrite": overwrite, "device": "cpu"})
    process.start()
    return process


def wait(process) -> int:
    process.join()
    return process.exitcode


def assert_complete(checkpoint: Path) -> None:
    """A visible checkpoint holds everything a resume reads, and every file parses."""
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["bitnet_rl"]["kind"] == "policy"
    assert load_file(str(checkpoint / "model.safetensors"))
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "generation_config.json").is_file()
    trainer = checkpoint / "trainer_state"
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(trainer / name, weights_only=True)
    torch.load(trainer / "rng.pt", weights_only=False)
    step = json.loads((trainer / "state.json").read_text())["step"]
    if checkpoint.name.startswith("step-"):
        assert step == int(checkpoint.name.split("-")[1])


def visible_checkpoints(out: Path) -> list[Path]:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return found + ([out / "final"] if (out / "final").exists() else [])


def hidden_leftovers(out: Path) -> list[str]:
    dirs = [out, out / "checkpoints"]
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fork server and every run: one intra-op thread
    context = forkserver()
    warm = context.Process(target=time.sleep, args=(0,))  # starts the fork server (imports) outside the timing
    warm.start()
    warm.join()
    reference = tmp_path / "reference"
    assert wait(start(context, reference, None, False)) == 0
    # The kills land at fractions of a warm run: the first run in a fork server can take 4-5x
    # longer (3.2 s vs 0.7 s measured), which put every kill after the end of later runs.
    started = time.perf_counter()
    assert wait(start(context, tmp_path / "timing", None, False)) == 0
    full_run = time.perf_counter() - started

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = checked = with_leftovers = 0
    attempts = 0
    fresh = True
    while kills < KILLS:
        attempts += 1
        assert attempts < 4 * KILLS, "the run keeps finishing before it is killed"
        resumable = not fresh and any((p / "trainer_state" / "state.json").is_file() for p in visible_checkpoints(out))
        process = start(context, out, "latest" if resumable else None, overwrite=not resumable)
        fresh = False
        time.sleep(rng.uniform(0.15, 0.6) * full_run)
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited between the check and the kill: a finished run, handled below
                pass
        code = wait(process)
        if (out / "final").exists():  # finished before the kill landed: start over for more kills
            # exit 0, or killed between the atomic rename of final/ and the interpreter's exit (seen under load)
            assert code in (0, -signal.SIGKILL), f"child exited with {code}"
            for checkpoint in visible_checkpoints(out):
                assert_complete(checkpoint)
                checked += 1
            fresh = True
            continue
        assert code == -signal.SIGKILL, f"child exited with {code} before it was killed"
        kills += 1
        with_leftovers += bool(hidden_leftovers(out))
        for checkpoint in visible_checkpoints(out):
            assert_complete(checkpoint)
            checked += 1

    resumable = any((p / "trainer_state" / "state.json").is_file() for p in visible_checkpoints(out))
    assert wait(start(context, out, "latest" if resumable else None, overwrite=not resumable)) == 0
    assert hidden_leftovers(out) == [], "a restarted run removes the temp / trash directories of killed ones"
    ours, theirs = load_file(str(out / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    opt_ours = torch.load(out / "final" / "trainer_state" / "optimizer.pt", weights_only=True)["state"]
    opt_ref = torch.load(reference / "final" / "trainer_state" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt_ours[i]["exp_avg_sq"], opt_ref[i]["exp_avg_sq"]) for i in opt_ref)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    print(f"kills {kills} (attempts {attempts}), visible checkpoints checked {checked}, kills leaving hidden temp dirs {with_leftovers}, "
          f"uninterrupted run {full_run:.1f} s, resumed final bit-identical")  # fmt: skip
