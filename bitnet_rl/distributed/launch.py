"""`bitnet-rl CMD --num-processes N`: validate, then re-run the same command in N workers via `accelerate launch`.

The parent process validates the recipe (a bad value is one line and exit 2 before anything
starts), then runs `python -m accelerate.commands.launch ... -m bitnet_rl.cli CMD ARGS` with the
same arguments minus `--num-processes`, plus `distributed.num_processes=N` so the workers'
`recipe.json` records it. Workers are recognised by the `LOCAL_RANK` torchrun gives them and
never launch again. On a machine without CUDA the workers run on CPU over gloo
(`ACCELERATE_USE_CPU`). NVLink multicast stays off in every worker environment.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from bitnet_rl.errors import UserError

# NVLink SHARP / multicast objects have hung and crashed NCCL and symmetric-memory collectives on
# the machines we use; every worker environment we build turns them off.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FLAG = "--num-processes"


LAUNCHED = "BITNET_RL_LAUNCHED"  # set in every process `--num-processes` starts


def is_worker(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a process started by torchrun / `accelerate launch` (it must not launch again).

    Besides torchrun's `LOCAL_RANK`, the launcher marks its children, so a child `accelerate launch`
    started without a rank (its single-process launcher) never launches again."""
    return "LOCAL_RANK" in env or env.get(LAUNCHED) == "1"


def check_launch(recipe, command: str, num_processes: int, gpus: int) -> None:
    """UserErrors for a launch that cannot work, before any worker starts."""
    accelerate_config = recipe.distributed.accelerate_config
    if num_processes < 1:
        raise UserError(f"{FLAG} {num_processes}: needs at least 1 process")
    if accelerate_config is not None:
        check_accelerate_config(accelerate_config, recipe.distributed.strategy)
    if gpus and num_processes > gpus and accelerate_config is None:
        raise UserError(f"{FLAG} {num_processes}: only {gpus} GPU{'s' if gpus != 1 else ''} visible (one process per GPU)")
    check_strategy(recipe, command, gpus)


def check_strategy(recipe, command: str, gpus: int) -> None:
    """UserErrors for a `distributed.strategy` the run cannot use: checked by the launching process
    and again in every worker (workers a user starts with `accelerate launch` directly included)."""
    if recipe.distributed.strategy != "fsdp2":
        return
    if not gpus:
        raise UserError(
            "distributed.strategy=fsdp2 needs GPUs: accelerate runs CPU workers with DDP only (it ignores the FSDP plugin); use strategy ddp on CPU"
        )
    if recipe.lora.enabled:
        raise UserError("distributed.strategy=fsdp2 with lora.enabled is not supported (the adapters' merge reads whole weights); use strategy ddp")
    rollout = getattr(recipe, "rollout", None)
    if command == "ppo" and rollout is not None and rollout.backend == "policy":
        raise UserError(
            "rollout.backend=policy cannot sample a sharded (fsdp2) policy: ranks stop generating at different steps; use rollout.backend=packed"
        )


SUPPORTED_TYPES = ("MULTI_GPU", "FSDP")


def check_accelerate_config(path: str, strategy: str) -> None:
    """UserErrors for an `accelerate config` file this package cannot run: missing or unreadable,
    a `distributed_type` other than MULTI_GPU (DDP) or FSDP (NO and MULTI_CPU make accelerate start
    one plain process; DeepSpeed, Megatron-LM, ...), or FSDP while the recipe says
    `distributed.strategy: ddp` (the recipe's FSDP2 settings are the ones applied)."""
    import yaml

    where = f"distributed.accelerate_config={path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: no such file (write one with `accelerate config`)")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: not a readable YAML or JSON file ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: not an accelerate config (a mapping of keys, as `accelerate config` writes)")
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind in ("NO", "MULTI_CPU"):  # accelerate starts one plain process for these: the run would silently use 1
        raise UserError(f"{where}: distributed_type {kind} starts a single process; on CPU use --num-processes N (gloo workers) without a config file")
    if kind not in SUPPORTED_TYPES:
        raise UserError(f"{where}: distributed_type {kind} is not supported; use MULTI_GPU (DDP) or distributed.strategy: fsdp2")
    if kind == "FSDP" and strategy != "fsdp2":
        raise UserError(f"{where}: distributed_type FSDP needs distributed.strategy=fsdp2 in the recipe (its FSDP2 settings replace the file's fsdp_config)")


def check_worker_env(strategy: str, env: Mapping[str, str] = os.environ) -> None:
    """The same rules for workers a user started with `accelerate launch` directly (the launcher
    passes the config to them as ACCELERATE_USE_* variables)."""
    for variable, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if env.get(variable, "").lower() == "true":
            raise UserError(f"accelerate launch turned on {name}, which is not supported: use DDP or distributed.strategy=fsdp2")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy != "fsdp2":
        raise UserError("accelerate launch turned on FSDP: set distributed.strategy=fsdp2 in the recipe (its FSDP2 settings replace the launcher's)")


def strip_flag(argv: Sequence[str], flag: str = FLAG) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The range the OS hands out for outgoing connections and `bind(0)` (Linux: from `path`;
    elsewhere, and when unreadable, the IANA range 49152-65535)."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port(tries: int = 64) -> int:
    """A TCP port free right now on this host, drawn at random below the ephemeral range.

    Not `bind(0)`, whose ephemeral port the OS may hand to another socket (NCCL's, another
    launch's) before the launched TCP store listens on it: on a 4-GPU host two concurrent launches
    failed that way (EADDRINUSE). Ports below the range are only taken by explicit binds, and a
    random draw keeps concurrent launchers apart (not torchrun's fixed 29500)."""
    low = min(ephemeral_ports()[0], 65536)
    rng = random.SystemRandom()
    for _ in range(tries if low > 20001 else 0):
        port = rng.randrange(20000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no free port there: fall back to the OS's choice
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def launch_command(command_argv: Sequence[str], num_processes: int | None, mixed_precision: str, accelerate_config: str | None, port: int) -> list[str]:
    """The `accelerate launch` command line that runs `bitnet-rl COMMAND_ARGV` in each worker.

    With an accelerate config file and `num_processes` None, the file says how many processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--mixed_precision", mixed_precision, "-m", "bitnet_rl.cli", *command_argv]
    return cmd + ([f"distributed.num_processes={num_processes}"] if num_processes is not None else [])


def worker_env(base: Mapping[str, str], cuda: bool, workers: int = 1, cpus: int | None = None) -> dict[str, str]:
    """The workers' environment: `base`, NVLink multicast off, the launched mark, CPU workers (gloo)
    without CUDA, and unless OMP_NUM_THREADS is set, this machine's `cpus` shared out among the
    `workers` as torch threads (at least 1 each).

    Not torchrun's default of 1 thread per worker, which leaves a GPU machine's cores idle: on 2
    H200s (32 cores) GRPO workers with 1 thread each spent 3.3 s and 4.6 s in the updates of the
    first two iterations, with 16 threads each 1.8 s and 1.2 s, and 1.2-1.4 s from the third
    iteration on either way (one A/B, the 16-thread run second on the same machine, so with a warm
    Triton cache: the thread count alone is not isolated).
    """
    env = {**base, **MULTICAST_OFF, LAUNCHED: "1"}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (cpus or usable_cpus()) // max(workers, 1))))
    return env


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def maybe_launch(recipe, command: str, flag_value: int | None, argv: Sequence[str] | None = None) -> int | None:
    """Start the workers when more than one process is asked for and this is not a worker.

    Returns the workers' exit code, or None when this process should train itself.
    """
    dist = recipe.distributed
    num_processes = flag_value if flag_value is not None else dist.num_processes
    if is_worker():
        return None
    gpus = visible_gpus()
    check_launch(recipe, command, num_processes, gpus)
    if num_processes == 1 and dist.accelerate_config is None:
        return None
    command_argv = strip_flag(list(argv if argv is not None else sys.argv[1:]))
    explicit = flag_value is not None or "num_processes" in dist.model_fields_set
    count = num_processes if explicit or dist.accelerate_config is None else None  # else the config file's
    cmd = launch_command(command_argv, count, recipe.train.mixed_precision, dist.accelerate_config, free_port())
    workers = count or gpus or 1  # an accelerate config file's count: one worker per visible GPU, the usual layout
    return subprocess.run(cmd, env=worker_env(os.environ, cuda=gpus > 0, workers=workers)).returncode


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_device() -> str:
    """This process's device before an accelerator exists: its own GPU (`cuda:LOCAL_RANK`, so N
    workers do not all build their model on GPU 0 first), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
