"""Helpers of the distributed tests: launching 2 gloo workers, the RL recipes both process counts run."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GROUP, PROMPTS = 4, 4


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of processes started by `accelerate launch` from a test: this checkout first
    on the path (the reward module lives at its root), one thread each, no inherited rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **extra)
    return env


def launch(script: str, *args: str, timeout: int = 400) -> None:
    """Run tests/distributed/SCRIPT in 2 gloo processes through `accelerate launch`."""
    import subprocess

    from bitnet_rl.distributed.launch import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(Path(__file__).parent / script), *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=worker_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def rl_recipe(advantage: str, model: Path, out: Path, processes: int, eval_prompts: int = 0):
    """GRPO (groups of 4, KL as a loss) or PPO with a critic (GAE, whitened advantages), same global
    batch; with `eval_prompts`, greedy held-out evaluation every 2 iterations (each rank its share)."""
    from bitnet_rl.recipe import load_recipe

    group = GROUP if advantage == "grpo" else 1
    prompts = PROMPTS if advantage == "grpo" else 16
    per_rank = prompts // processes
    base = "recipes/tiny/grpo.yaml" if advantage == "grpo" else "recipes/tiny/ppo.yaml"
    return load_recipe(base, [
        f"out={out}", f"model.path={model}", "rollout.max_new_tokens=8", f"ppo.prompts_per_iteration={per_rank}",
        f"ppo.samples_per_prompt={group}", f"ppo.minibatch_size={per_rank * group}", f"ppo.micro_batch_size={per_rank * group // 2}",
        "ppo.iterations=3", f"ppo.eval_prompts={eval_prompts}", "ppo.eval_every=2", "ppo.num_prompts=64", "logging.progress=false", "logging.health_every=2",
        "scheduler.warmup_steps=0", "optimizer.lr=0.001", "checkpoint.every=0",
        # pinned, whatever the shipped recipe says: one round per iteration (refill rounds draw other prompts
        # per rank than one process would) and the partial-credit reward (a tiny policy's exact matches barely move)
        # (and with it no group ceiling or prompt skipping), the policy's own old-log-prob pass with the default
        # correction (the shipped CPU recipe takes π_old from the rollout; the pass is what DDP must get right)
        "ppo.dynamic_sampling=false", 'ppo.rewards=[{"source": "reward_models.demo_task:reward"}]',
        "ppo.dynamic_sampling_max_mean=null", "ppo.skip_dropped_prompts=0", "ppo.old_logprobs=policy", "ppo.rollout_correction=token_tis",
    ], stage="ppo")  # fmt: skip
