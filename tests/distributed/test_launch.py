"""`--num-processes` and the recipe's `distributed:` section: the launch command, the workers'
environment, and one-line errors (exit 2) before any worker starts."""

import socket
import sys

import pytest
from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.distributed import launch
from bitnet_rl.distributed.launch import MULTICAST_OFF, is_worker, launch_command, strip_flag, worker_env

runner = CliRunner()


def test_strip_flag_removes_both_spellings():
    argv = ["sft", "r.yaml", "--num-processes", "2", "train.max_steps=3", "--num-processes=4", "--out", "o"]
    assert strip_flag(argv) == ["sft", "r.yaml", "train.max_steps=3", "--out", "o"]


def test_launch_command_reruns_the_cli_in_workers():
    cmd = launch_command(["sft", "r.yaml", "--out", "o"], 2, "bf16", None, port=29555)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    tail = cmd[cmd.index("-m", 3) :]
    assert tail == ["-m", "bitnet_rl.cli", "sft", "r.yaml", "--out", "o", "distributed.num_processes=2"]
    for flag, value in (("--num_processes", "2"), ("--mixed_precision", "bf16"), ("--main_process_port", "29555")):
        assert cmd[cmd.index(flag) + 1] == value
    with_config = launch_command(["ppo"], 4, "no", "acc.yaml", port=1)
    assert with_config[with_config.index("--config_file") + 1] == "acc.yaml" and "--main_process_port" not in with_config
    from_config = launch_command(["ppo"], None, "no", "acc.yaml", port=1)  # the file says how many
    assert "--num_processes" not in from_config and from_config[-1] == "ppo"


def test_worker_env_turns_multicast_off_and_picks_gloo_on_cpu():
    env = worker_env({"PATH": "/bin", "OMP_NUM_THREADS": "3"}, cuda=False)
    assert all(env[k] == v for k, v in MULTICAST_OFF.items())
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["ACCELERATE_USE_CPU"] == "true" and env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin"
    gpu = worker_env({}, cuda=True, workers=2, cpus=32)  # the cores shared out, not torchrun's 1 thread
    assert "ACCELERATE_USE_CPU" not in gpu and gpu["OMP_NUM_THREADS"] == "16" and gpu["NCCL_NVLS_ENABLE"] == "0"
    assert worker_env({}, cuda=True, workers=4, cpus=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert is_worker({"LOCAL_RANK": "0"}) and not is_worker({})
    # a child `accelerate launch` starts without a rank (config type NO / MULTI_CPU) is a worker too
    assert env["BITNET_RL_LAUNCHED"] == "1" and is_worker({"BITNET_RL_LAUNCHED": "1"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-processes", "0"], "--num-processes 0: needs at least 1 process"),
        (["distributed.num_processes=0"], "distributed.num_processes"),
        (["distributed.strategy=zero3"], "distributed.strategy"),
        (["distributed.strategy=fsdp2", "--num-processes", "2"], "strategy=fsdp2 needs GPUs"),
        (["distributed.accelerate_config=/nonexistent/acc.yaml"], "no such file"),
        (["distributed.launcher=torchrun"], "unknown key distributed.launcher"),
    ],
)
def test_bad_distributed_settings_are_one_line_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = runner.invoke(app, ["sft", "recipes/tiny/sft.yaml", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "o").exists()  # nothing started


def test_fsdp2_refuses_lora_and_policy_sampling(tmp_path, monkeypatch):
    from bitnet_rl.distributed.launch import check_launch
    from bitnet_rl.errors import UserError
    from bitnet_rl.recipe import load_recipe

    recipe = load_recipe(None, ["distributed.strategy=fsdp2", "rollout.backend=policy"], stage="ppo")
    with pytest.raises(UserError, match="rollout.backend=policy cannot sample a sharded"):
        check_launch(recipe, "ppo", 2, gpus=2)
    with pytest.raises(UserError, match="only 2 GPUs visible"):
        check_launch(recipe, "ppo", 4, gpus=2)
    lora = load_recipe(None, ["distributed.strategy=fsdp2", "lora.enabled=true"], stage="sft")
    with pytest.raises(UserError, match="lora"):
        check_launch(lora, "sft", 2, gpus=2)


def test_each_worker_builds_its_model_on_its_own_gpu(monkeypatch):
    import torch

    from bitnet_rl.distributed.launch import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device() == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device() == "cpu"


@pytest.mark.parametrize(
    "text, message",
    [
        ("distributed_type: DEEPSPEED\nnum_processes: 2\n", "distributed_type DEEPSPEED is not supported"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "distributed_type FSDP needs distributed.strategy=fsdp2"),
        ("distributed_type: [MULTI_GPU\n", "not a readable YAML or JSON file"),
        ("- MULTI_GPU\n", "not an accelerate config"),
        ("distributed_type: MULTI_CPU\nnum_processes: 2\n", "distributed_type MULTI_CPU starts a single process"),  # it ran 1, silently
        ("compute_environment: LOCAL_MACHINE\n", "distributed_type NO starts a single process"),
    ],
)
def test_unusable_accelerate_config_is_one_line_exit_2(tmp_path, monkeypatch, text, message):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = tmp_path / "acc.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["sft", "recipes/tiny/sft.yaml", "--out", str(tmp_path / "o"), f"distributed.accelerate_config={config}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(config) in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_usable_accelerate_configs_pass(tmp_path):
    from bitnet_rl.distributed.launch import check_accelerate_config

    ddp, fsdp = tmp_path / "ddp.yaml", tmp_path / "fsdp.json"
    ddp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n")
    fsdp.write_text('{"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}')  # JSON is YAML too
    check_accelerate_config(str(ddp), "ddp")
    check_accelerate_config(str(ddp), "fsdp2")  # the recipe's FSDP2 plugin applies
    check_accelerate_config(str(fsdp), "fsdp2")


def test_workers_started_by_the_user_refuse_deepspeed_and_unasked_fsdp():
    from bitnet_rl.distributed.launch import check_worker_env
    from bitnet_rl.errors import UserError

    with pytest.raises(UserError, match="DeepSpeed, which is not supported"):
        check_worker_env("ddp", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match="Megatron-LM, which is not supported"):
        check_worker_env("fsdp2", {"ACCELERATE_USE_MEGATRON_LM": "true"})
    with pytest.raises(UserError, match="set distributed.strategy=fsdp2"):
        check_worker_env("ddp", {"ACCELERATE_USE_FSDP": "true"})
    check_worker_env("fsdp2", {"ACCELERATE_USE_FSDP": "true"})
    check_worker_env("ddp", {"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "false"})


def test_a_worker_started_without_the_cli_launcher_checks_the_strategy(tmp_path, monkeypatch):
    """`accelerate launch -m bitnet_rl.cli ...` by hand skips the parent's checks: the run object
    repeats them before it builds anything (here: fsdp2 on a machine without GPUs)."""
    from bitnet_rl.errors import UserError
    from bitnet_rl.recipe import load_recipe
    from bitnet_rl.train.run import Run

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = load_recipe(None, ["distributed.strategy=fsdp2", f"out={tmp_path / 'o'}"], stage="sft")
    with pytest.raises(UserError, match="strategy=fsdp2 needs GPUs"):
        Run(recipe, "sft")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="accelerate launch turned on FSDP"):
        Run(load_recipe(None, [f"out={tmp_path / 'o'}"], stage="sft"), "sft")


def test_free_port_is_bindable_and_outside_the_ephemeral_range(tmp_path):
    low, high = launch.ephemeral_ports()
    ports = {launch.free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn at random, not one fixed port that concurrent launches share
    for port in ports:
        assert (20000 <= port < low) if low > 20001 else (low <= port <= high)
        with socket.socket() as sock:
            sock.bind(("", port))  # free: the launched TCP store can listen on it
    ranges = tmp_path / "range"
    ranges.write_text("1024\t65000\n")
    assert launch.ephemeral_ports(str(ranges)) == (1024, 65000)
    assert launch.ephemeral_ports(str(tmp_path / "missing")) == (49152, 65535)
