"""Bad inputs a new user makes: each is one line on stderr naming the culprit, exit code 2, no traceback,
and nothing written to --out. Run in-process through typer's CliRunner, so the battery takes seconds.

Each case is (name, setup) where `setup(env)` returns (argv, culprit): `culprit` must appear in the
error line. `env` holds the shared fixtures (paths) and a fresh `tmp` directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from bitnet_rl.cli import app

runner = CliRunner()
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
REWARD = "python:reward_models/demo_task.py:reward"
ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path, tiny: dict | None = None, **extra) -> Path:
    lines = ["model:", "  tiny:"] + [f"    {k}: {v}" for k, v in (tiny or TINY).items()]
    lines += ["data:", "  path: demo", "  demo_size: 64", "  max_length: 32", "  val_fraction: 0"]
    lines += ["train:", "  max_steps: 2", "  batch_size: 4", "checkpoint:", "  every: 1", "  keep_last: 2"]
    lines += ["logging:", "  progress: false", "  health_every: 0"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Env:
    tmp: Path
    tiny_dir: Path  # a policy
    rm_dir: Path  # a reward model
    run_dir: Path  # a finished sft run (checkpoints/step-1, final at step 2)
    recipe: Path  # tiny sft recipe (2 steps)
    mounts: list[Path]  # read-only tmpfs mounted by this test (root only), unmounted after it


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_dir):
    from bitnet_rl.models.io import load_tokenizer, save_checkpoint
    from bitnet_rl.models.value import load_scalar_model

    root = tmp_path_factory.mktemp("bad_inputs")
    rm_dir = save_checkpoint(load_scalar_model(tiny_dir), load_tokenizer(tiny_dir), root / "rm")
    recipe = tiny_recipe(root / "sft.yaml")
    run_dir = root / "run"
    result = runner.invoke(app, ["sft", str(recipe), "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    return root, rm_dir, run_dir, recipe


@pytest.fixture
def env(shared, tiny_dir, tmp_path):
    root, rm_dir, run_dir, recipe = shared
    env = Env(tmp=tmp_path, tiny_dir=tiny_dir, rm_dir=rm_dir, run_dir=run_dir, recipe=recipe, mounts=[])
    yield env
    for mount in env.mounts:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_UTF8 = b'{"text": "caf\xe9"}\n'


# ---- the cases -----------------------------------------------------------------------------
def utf8_jsonl(e):
    data = write(e.tmp / "bad.jsonl", b'{"text": "ok"}\n' + BAD_UTF8)
    return ["sft", str(e.recipe), "--data", str(data), "--out", str(e.tmp / "out")], "bad.jsonl:2: not valid UTF-8"


def utf8_json(e):
    data = write(e.tmp / "bad.json", b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n')
    return ["sft", str(e.recipe), "--data", str(data), "--out", str(e.tmp / "out")], "bad.json:3: not valid UTF-8"


def utf8_csv(e):
    data = write(e.tmp / "bad.csv", b"text\nok\ncaf\xe9\n")
    return ["sft", str(e.recipe), "--data", str(data), "--out", str(e.tmp / "out")], "bad.csv:3: not valid UTF-8"


def utf8_recipe(e):
    recipe = write(e.tmp / "bad.yaml", b"# r\xe9cipe\nout: x\n")
    return ["sft", str(recipe)], "bad.yaml:1: not valid UTF-8"


def utf8_prefs_rm(e):
    data = write(e.tmp / "prefs.jsonl", b'{"prompt": "p", "chosen": "\xff", "rejected": "b"}\n')
    return ["rm", "--prefs", str(data), "--model", str(e.tiny_dir), "--out", str(e.tmp / "out")], "prefs.jsonl:1: not valid UTF-8"


def utf8_prompts_generate(e):
    data = write(e.tmp / "prompts.jsonl", b'{"prompt": "\xc3("}\n')
    return ["generate", str(e.tiny_dir), "--prompts", str(data)], "prompts.jsonl:1: not valid UTF-8"


def truncated_weights_sft(e):
    model = copy_model(e.tiny_dir, e.tmp / "model")
    truncate(model / "model.safetensors")
    return ["sft", str(e.recipe), "--model", str(model), "--out", str(e.tmp / "out")], "model.safetensors: unreadable safetensors"


def truncated_weights_info(e):
    model = copy_model(e.tiny_dir, e.tmp / "model")
    truncate(model / "model.safetensors")
    return ["info", str(model)], "model.safetensors: unreadable safetensors"


def garbage_weights_generate(e):
    model = copy_model(e.tiny_dir, e.tmp / "model")
    write(model / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    return ["generate", str(model), "--prompt", "sort: 1 ="], "model.safetensors: unreadable safetensors"


def truncated_weights_reward(e):
    model = copy_model(e.rm_dir, e.tmp / "rm")
    truncate(model / "model.safetensors")
    return ["ppo", "--reward", str(model), "--model", str(e.tiny_dir), "--out", str(e.tmp / "out")], "rm/model.safetensors: unreadable"


def truncated_weights_resume(e):
    ckpt = copy_model(e.run_dir / "checkpoints" / "step-0000001", e.tmp / "step-0000001")
    truncate(ckpt / "model.safetensors")
    return ["sft", str(e.recipe), "--resume", str(ckpt), "--out", str(e.tmp / "out")], "step-0000001/model.safetensors: unreadable"


def truncated_optimizer_resume(e):
    ckpt = copy_model(e.run_dir / "checkpoints" / "step-0000001", e.tmp / "step-0000001")
    truncate(ckpt / "trainer_state" / "optimizer.pt")
    return ["sft", str(e.recipe), "--resume", str(ckpt), "--out", str(e.tmp / "out")], "optimizer.pt: cannot read the checkpoint's trainer state"


def out_is_file(e):
    target = write(e.tmp / "out.txt", "notes")
    return ["sft", str(e.recipe), "--out", str(target)], "out.txt: exists and is a file"


def out_under_file(e):
    write(e.tmp / "file", "x")
    return ["dpo", "--prefs", "demo", "--model", str(e.tiny_dir), "--out", str(e.tmp / "file" / "run")], "file is a file, not a directory"


def out_read_only(e):
    return ["sft", str(e.recipe), "--out", str(read_only_dir(e) / "run")], "is not writable"


def generate_out_read_only(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n')
    return ["generate", str(e.tiny_dir), "--prompts", str(prompts), "--out", str(read_only_dir(e) / "o.jsonl")], "is not writable"


def generate_out_is_dir(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n')
    return ["generate", str(e.tiny_dir), "--prompts", str(prompts), "--out", str(e.tmp)], "is a directory, not a file"


def resume_other_shape(e):
    other = tiny_recipe(e.tmp / "wide.yaml", tiny={**TINY, "hidden_size": 48})
    ckpt = e.run_dir / "checkpoints" / "step-0000001"
    return ["sft", str(other), "--resume", str(ckpt), "--out", str(e.tmp / "out")], "size mismatch for model.embed_tokens.weight"


def disk_full(e, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    out = e.tmp / "out"
    return ["sft", str(e.recipe), "--out", str(out)], f"disk full: no space left on device in {out / 'checkpoints'}"


def disk_full_torch_writer(e, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError without errno: the free space tells."""

    def writer_failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", writer_failed)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    out = e.tmp / "out"
    return ["sft", str(e.recipe), "--out", str(out)], f"disk full: no space left on device in {out / 'checkpoints'}"


def policy_as_reward(e):
    return ["ppo", "--reward", str(e.tiny_dir), "--model", str(e.tiny_dir), "--out", str(e.tmp / "out")], "is a policy (causal LM), not a reward model"


def reward_as_policy_ppo(e):
    return ["ppo", "--reward", REWARD, "--model", str(e.rm_dir), "--out", str(e.tmp / "out")], f"{e.rm_dir} is a reward model, not a policy"


def reward_as_policy_dpo(e):
    return ["dpo", "--prefs", "demo", "--model", str(e.rm_dir), "--out", str(e.tmp / "out")], f"{e.rm_dir} is a reward model, not a policy"


def reward_as_policy_sft(e):
    return ["sft", str(e.recipe), "--model", str(e.rm_dir), "--out", str(e.tmp / "out")], f"{e.rm_dir} is a reward model, not a policy"


def reward_as_policy_generate(e):
    return ["generate", str(e.rm_dir), "--prompt", "sort: 2 1 ="], f"{e.rm_dir} is a reward model, not a policy"


def critic_as_reward(e):
    critic = copy_model(e.rm_dir, e.tmp / "critic")
    config = json.loads((critic / "config.json").read_text())
    config["bitnet_rl"]["kind"] = "critic"
    (critic / "config.json").write_text(json.dumps(config))
    return ["ppo", "--reward", str(critic), "--model", str(e.tiny_dir), "--out", str(e.tmp / "out")], "critic is a critic (value model), not a reward model"


def long_prompt_generate(e):
    return ["generate", str(e.tiny_dir), "--prompt", "sort:" + " 7" * 600], "--prompt: prompt is 60"


def empty_prompt_generate(e):
    return ["generate", str(e.tiny_dir), "--prompt", ""], "--prompt: prompt is empty"


def blank_prompt_in_file(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n{"prompt": "   "}\n')
    return ["generate", str(e.tiny_dir), "--prompts", str(prompts)], "p.jsonl:2: prompt is empty"


def long_prompt_in_file(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n' + json.dumps({"prompt": "sort:" + " 3" * 700}) + "\n")
    return ["generate", str(e.tiny_dir), "--prompts", str(prompts)], "p.jsonl:2: prompt is 70"


def new_tokens_over_context(e):
    return ["generate", str(e.tiny_dir), "--prompt", "sort: 1 =", "--max-new-tokens", "600"], "--max-new-tokens=600 does not fit the model's context of 512"


def long_prompt_ppo(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n' + json.dumps({"prompt": "sort:" + " 3" * 700}) + "\n")
    args = ["ppo", "--reward", REWARD, "--model", str(e.tiny_dir), "--prompts", str(prompts), "--out", str(e.tmp / "out")]
    return args, "p.jsonl: prompt 2: prompt is 70"


def empty_prompt_ppo(e):
    prompts = write(e.tmp / "p.jsonl", '{"prompt": "sort: 1 ="}\n{"messages": [{"role": "user", "content": " "}]}\n')
    args = ["ppo", "--reward", REWARD, "--model", str(e.tiny_dir), "--prompts", str(prompts), "--out", str(e.tmp / "out")]
    return args, "p.jsonl:2: prompt is empty"


def reuse_finished_run(e):
    out = copy_model(e.run_dir, e.tmp / "run")
    return ["sft", str(e.recipe), "--out", str(out)], "is not empty: it holds a `bitnet-rl sft` run started"


def reuse_foreign_dir(e):
    write(e.tmp / "notes.txt", "mine")
    return ["sft", str(e.recipe), "--out", str(e.tmp)], "is not empty: it holds 1 entry (notes.txt)"


def resume_and_overwrite(e):
    return ["sft", str(e.recipe), "--out", str(e.tmp / "o"), "--resume", "latest", "--overwrite"], "--resume and --overwrite contradict"


def resume_finished(e):
    out = copy_model(e.run_dir, e.tmp / "run")
    return ["sft", str(e.recipe), "--out", str(out), "--resume", "latest"], "checkpoint is at step 2 and train.max_steps=2"


def resume_past_max_steps(e):
    out = copy_model(e.run_dir, e.tmp / "run")
    ckpt = out / "checkpoints" / "step-0000001"
    return ["sft", str(e.recipe), "--out", str(out), "--resume", str(ckpt), "train.max_steps=1"], "checkpoint is at step 1 and train.max_steps=1"


def resume_other_command(e):
    out = copy_model(e.run_dir, e.tmp / "run")
    return ["dpo", "--prefs", "demo", "--model", str(e.tiny_dir), "--out", str(out), "--resume", "latest"], "holds a `bitnet-rl sft` run; it cannot be resumed by `bitnet-rl dpo`"


def resume_latest_nothing(e):
    return ["sft", str(e.recipe), "--out", str(e.tmp / "new"), "--resume", "latest"], "--resume latest: no checkpoints in"


def resume_not_a_checkpoint(e):
    return ["sft", str(e.recipe), "--out", str(e.tmp / "new"), "--resume", str(e.tiny_dir)], "not a bitnet-rl checkpoint (no trainer_state/state.json)"


def tiny_and_path(e):
    return ["sft", str(e.recipe), f"model.path={e.tiny_dir}", "--out", str(e.tmp / "out")], "model.tiny and model.path="


def chat_never_with_messages(e):
    data = write(e.tmp / "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    args = ["sft", str(e.recipe), "--data", str(data), "data.chat_template=never", "--out", str(e.tmp / "out")]
    return args, "chat.jsonl: data.chat_template=never, but the records hold chat messages"


def chat_always_with_text(e):
    data = write(e.tmp / "text.jsonl", '{"text": "plain words"}\n')
    args = ["sft", str(e.recipe), "--data", str(data), "data.chat_template=always", "--out", str(e.tmp / "out")]
    return args, "text.jsonl: data.chat_template=always, but the records are plain text"


def chat_template_bad_value(e):
    return ["sft", str(e.recipe), "data.chat_template=sometimes", "--out", str(e.tmp / "out")], "data.chat_template: Input should be 'auto', 'always' or 'never'"


def tokenizer_data_missing(e):
    return ["sft", str(e.recipe), "model.tiny.tokenizer_data=/nonexistent/corpus.txt", "--out", str(e.tmp / "out")], "model.tiny.tokenizer_data=/nonexistent/corpus.txt: no such file"


def examples_over_context(e):
    data = write(e.tmp / "long.jsonl", json.dumps({"text": "sort:" + " 4" * 700}) + "\n")
    args = ["sft", str(e.recipe), "--model", str(e.tiny_dir), "--data", str(data), "data.max_length=2048", "--out", str(e.tmp / "out")]
    return args, "long.jsonl: examples reach 70"


def quickstart_out_is_file(e):
    target = write(e.tmp / "qs", "a file")
    return ["quickstart", "--out", str(target), "--no-progress"], "qs: exists and is a file"


def disk_full_metrics(e, monkeypatch):
    """A full disk outside a checkpoint write (here: metrics.jsonl) still says so and names the file."""
    import bitnet_rl.train.loop as loop

    def no_space(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(loop.MetricsLog, "write", no_space)
    return ["sft", str(e.recipe), "--out", str(e.tmp / "out")], "disk full: no space left on device writing"


def generate_bad_backend(e):
    return ["generate", str(e.tiny_dir), "--prompt", "x", "--backend", "vllm"], "--backend 'vllm': use packed or policy"


def eval_out_under_file(e):
    """Checked before sampling (it used to fail with a traceback after the whole evaluation)."""
    write(e.tmp / "file", "x")
    return ["eval", str(e.tiny_dir), "--prompts", "demo", "--reward", REWARD, "--out", str(e.tmp / "file" / "ev")], "file is a file, not a directory"


def export_out_under_file(e):
    write(e.tmp / "file", "x")
    return ["export", str(e.tiny_dir), "--format", "bf16", "--out", str(e.tmp / "file" / "bf16")], "file is a file, not a directory"


def generate_out_under_file(e):
    write(e.tmp / "file", "x")
    return ["generate", str(e.tiny_dir), "--prompt", "x", "--out", str(e.tmp / "file" / "o.jsonl")], "file is a file, not a directory"


def reward_wrong_signature_ppo(e):
    fn = write(e.tmp / "one_arg.py", "def reward(completions):\n    return [0.0] * len(completions)\n")
    args = ["ppo", "--model", str(e.tiny_dir), "--reward", f"python:{fn}:reward", "--out", str(e.tmp / "out")]
    return args, "cannot be called as reward(prompts, completions)"


def recipe_as_override_dpo(e):
    return ["dpo", str(e.recipe), "--model", str(e.tiny_dir), "--out", str(e.tmp / "out")], "a recipe file is passed with --recipe FILE"


def unknown_recipe_key(e):
    return ["sft", str(e.recipe), "data.chat_templates=auto", "--out", str(e.tmp / "out")], "unknown key data.chat_templates"


CASES: dict[str, Callable] = {f.__name__: f for f in [
    utf8_jsonl, utf8_json, utf8_csv, utf8_recipe, utf8_prefs_rm, utf8_prompts_generate,
    truncated_weights_sft, truncated_weights_info, garbage_weights_generate, truncated_weights_reward,
    truncated_weights_resume, truncated_optimizer_resume,
    out_is_file, out_under_file, out_read_only, generate_out_read_only, generate_out_is_dir,
    resume_other_shape, disk_full, disk_full_torch_writer,
    policy_as_reward, reward_as_policy_ppo, reward_as_policy_dpo, reward_as_policy_sft, reward_as_policy_generate, critic_as_reward,
    long_prompt_generate, empty_prompt_generate, blank_prompt_in_file, long_prompt_in_file, new_tokens_over_context,
    long_prompt_ppo, empty_prompt_ppo,
    reuse_finished_run, reuse_foreign_dir, resume_and_overwrite, resume_finished, resume_past_max_steps,
    resume_other_command, resume_latest_nothing, resume_not_a_checkpoint,
    tiny_and_path, chat_never_with_messages, chat_always_with_text, chat_template_bad_value, tokenizer_data_missing,
    examples_over_context, generate_bad_backend, unknown_recipe_key, quickstart_out_is_file, disk_full_metrics,
    eval_out_under_file, export_out_under_file, generate_out_under_file, reward_wrong_signature_ppo, recipe_as_override_dpo,
]}  # fmt: skip


def read_only_dir(e: Env) -> Path:
    """A directory this process cannot write: chmod 555 for a normal user, a read-only tmpfs for root."""
    ro = e.tmp / "ro"
    ro.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    e.mounts.append(ro)
    return ro


def snapshot(path: Path) -> list[str] | None:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, env, monkeypatch, no_compile):
    setup = CASES[case]
    args, culprit = setup(env, monkeypatch) if "monkeypatch" in setup.__code__.co_varnames else setup(env)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    before = snapshot(out) if out is not None else None
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    print(f"CASE {case}: {errors[0] if errors else result.output[-300:]}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(errors) == 1 and culprit in errors[0], result.stderr
    if out is not None and not case.startswith("disk_full"):
        assert snapshot(out) == before, f"{out} changed before validation passed"


def test_battery_is_large_enough():
    assert len(CASES) >= 40
