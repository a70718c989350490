"""Two gloo processes through `accelerate launch` train exactly what one process trains on the same
global batch: SFT, DPO and reward models through `bitnet-rl CMD --num-processes 2`, GRPO and PPO with a critic
(GAE) through a worker script with row-seeded sampling (row_seeded.py); a checkpoint written by 2 processes resumes in 1.

Measured (CPU, torch 2.13, `pytest -s` prints every gap): SFT loss and grad norm agree to a relative
7e-7 over 6 steps, the reward model to 1e-7, DPO (with the RPO term, packed or precomputed
reference) to 1e-7 in loss and grad norm and 3e-5 in held-out margin, GRPO's reward, reward std, KL, policy loss, entropy and
grad norm to an absolute 5e-7 over 3 iterations, PPO-GAE's (with value loss and explained variance)
to a relative 3.4e-6; GRPO's greedy held-out evaluation, split 7 + 6 prompts across the ranks, to 0
(without the all-reduce eval/reward was off by 5%). Asserted: relative 1e-4 (absolute 1e-5 near 0). The gaps are float summation
order; ternary rounding of the weights can amplify them step by step, so longer runs drift. For
scale, the naive port (each rank's own token mean, averaged by DDP) was off by a relative 8e-4 in
SFT loss and 1.6e-2 in grad norm within 6 steps, and a reward model whose backbone pass skipped
the DDP forward by 0.45 in its first grad norm.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_rl.recipe import RewardSpec, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from harness import GROUP, launch, rl_recipe  # noqa: E402

from bitnet_rl.distributed.launch import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
SFT = ["train.max_steps=6", "data.demo_size=200", "logging.every=1", "checkpoint.every=3", "logging.progress=false", "logging.health_every=3"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-5, key: str = "") -> bool:
    gap = abs(a - b)
    print(f"gap {key} {gap:.2e} (relative {gap / max(abs(a), abs(b), 1e-12):.2e})")  # pytest -s shows the measured agreement
    return gap <= max(abs_, rel * max(abs(a), abs(b)))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    from bitnet_rl.train.sft import run_sft

    root = tmp_path_factory.mktemp("distributed_sft")
    two = root / "two"
    cmd = [sys.executable, "-m", "bitnet_rl.cli", "sft", "recipes/tiny/sft.yaml", *SFT, "train.batch_size=8", "--num-processes", "2", "--out", str(two)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one = root / "one"
    run_sft(load_recipe("recipes/tiny/sft.yaml", [*SFT, "train.batch_size=16", f"out={one}"], stage="sft"))
    return one, two, done.stdout


def test_sft_two_processes_match_one_process(sft_runs):
    one, two, stdout = sft_runs
    assert stdout.count("saved ") == 1  # one report, from rank 0
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(7))
    for x, y in zip(a[1:], b[1:]):
        assert x["tokens"] == y["tokens"]  # all ranks' tokens counted
        for key in ("loss", "grad_norm", "flip_rate"):
            if key in x:
                assert _close(x[key], y[key], key=key), (key, x["step"], x[key], y[key])
    assert _close(a[-1]["val_loss"], b[-1]["val_loss"])
    assert a[-1]["loss"] < a[1]["loss"] - 0.3  # a curve that moves, not a flat line
    assert json.loads((two / "recipe.json").read_text())["distributed"]["num_processes"] == 2
    assert json.loads((two / "run.json").read_text())["command"] == "sft"  # written once, by the main process


def test_sft_with_summed_token_loss_two_processes_match_one_process(tmp_path):
    """`train.loss_aggregation: sum`: each rank's loss is its micro-batch's sum and DDP averages the
    ranks' gradients, so ranks scale it by the process count to train what one process does."""
    from bitnet_rl.train.sft import run_sft

    steps = ["train.max_steps=3", "data.demo_size=200", "logging.every=1", "checkpoint.every=0", "logging.progress=false",
             "logging.health_every=0", "train.loss_aggregation=sum", "optimizer.lr=1e-4"]  # fmt: skip
    cmd = [sys.executable, "-m", "bitnet_rl.cli", "sft", "recipes/tiny/sft.yaml", *steps, "train.batch_size=8", "--num-processes", "2", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    run_sft(load_recipe("recipes/tiny/sft.yaml", [*steps, "train.batch_size=16", f"out={tmp_path / 'one'}"], stage="sft"))
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) >= 3
    for x, y in zip(a[1:], b[1:]):
        for key in ("loss", "grad_norm"):
            assert _close(x[key], y[key], key=key), (key, x["step"], x[key], y[key])
    assert a[1]["loss"] > 20  # a sum over the batch's tokens, not a mean



def test_an_accelerate_config_file_sets_the_process_count(tmp_path):
    """`distributed.accelerate_config` with `num_processes: 2` and no --num-processes: the file's
    count starts 2 workers, which train the global batch and record the count in recipe.json."""
    config = tmp_path / "acc.yaml"
    config.write_text(f"distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\nmain_process_port: {free_port()}\n")
    steps = ["train.max_steps=1", "data.demo_size=100", "logging.progress=false", "checkpoint.every=0", "train.batch_size=4"]
    cmd = [sys.executable, "-m", "bitnet_rl.cli", "sft", "recipes/tiny/sft.yaml", *steps, f"distributed.accelerate_config={config}", "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert json.loads((tmp_path / "o" / "recipe.json").read_text())["distributed"]["num_processes"] == 2
    one, = [r for r in _metrics(tmp_path / "o") if r["step"] == 1]
    assert one["tokens"] > 0 and done.stdout.count("saved ") == 1

def test_checkpoint_of_two_processes_resumes_in_one(sft_runs, tmp_path):
    from bitnet_rl.train.sft import run_sft

    one, two, _ = sft_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    checkpoint = resumed / "checkpoints" / "step-0000003"
    with pytest.warns(UserWarning, match="recipe that differs"):  # batch size and process count changed, on purpose
        run_sft(load_recipe("recipes/tiny/sft.yaml", [*SFT, "train.batch_size=16", f"out={resumed}"], stage="sft"), resume=str(checkpoint))
    assert len(json.loads((resumed / "run.json").read_text())["resumes"]) == 1
    assert json.loads((resumed / "recipe.json").read_text())["distributed"]["num_processes"] == 1
    a, r = _metrics(one), _metrics(resumed)
    assert [x["step"] for x in r] == list(range(7))
    for x, y in zip(a[4:], r[4:]):  # steps 4-6, trained by one process from the 2-process checkpoint
        assert _close(x["loss"], y["loss"]) and _close(x["grad_norm"], y["grad_norm"]), (x, y)


def test_reward_model_two_processes_match_one_process(sft_runs, tmp_path):
    """A reward model reads its head on its backbone: under DDP that pass must go through the
    wrapper's forward, or the ranks' gradients are never averaged and the runs drift apart."""
    from bitnet_rl.train.rm import run_rm

    one, _, _ = sft_runs
    args = ["--prefs", "demo", "--model", str(one / "final"), "train.max_steps=4", "data.demo_size=120", "logging.progress=false", "logging.every=1"]
    cmd = [sys.executable, "-m", "bitnet_rl.cli", "rm", *args, "train.batch_size=4", "--num-processes", "2", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    overrides = [a for a in args[4:]] + ["train.batch_size=8", f"out={tmp_path / 'one'}", "data.path=demo", f"model.path={one / 'final'}"]
    run_rm(load_recipe(None, overrides, stage="rm"))
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) >= 4
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss", "val_accuracy"):
            if key in x:
                assert _close(x[key], y[key], key=key), (key, x["step"], x[key], y[key])



@pytest.mark.parametrize("reference", ["ternary", "precompute"])
def test_dpo_two_processes_match_one_process(sft_runs, tmp_path, reference):
    """DPO with the RPO NLL term: per-pair means on every rank, so DDP's gradient average over equal
    per-rank batches is the global mean; the packed reference (or the log-probs each rank
    precomputes for all examples) is the same on every rank; validation is split across ranks."""
    from bitnet_rl.train.dpo import run_dpo

    one, _, _ = sft_runs
    common = ["train.max_steps=4", "data.demo_size=120", "logging.progress=false", "logging.every=1", f"dpo.reference={reference}",
              "dpo.rpo_alpha=1.0", "data.val_fraction=0.15", "train.eval_every=2", "optimizer.lr=1e-3"]  # fmt: skip
    args = ["--prefs", "demo", "--model", str(one / "final"), *common]
    cmd = [sys.executable, "-m", "bitnet_rl.cli", "dpo", *args, "train.batch_size=4", "--num-processes", "2", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    run_dpo(load_recipe(None, [*common, "train.batch_size=8", f"out={tmp_path / 'one'}", "data.path=demo", f"model.path={one / 'final'}"], stage="dpo"))
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 5 and sum("val_loss" in x for x in a) == 3  # steps 0, 2 and 4 evaluated
    for x, y in zip(a, b):
        # at step 0 the policy is its reference: margins are float noise (~1e-8) and accuracy counts noise
        for key in ("loss", "grad_norm", "nll/chosen", "rewards/margin", "val_loss") + (("val_margin", "val_accuracy") if x["step"] else ()):
            if key in x:
                assert _close(x[key], y[key], key=key), (key, x["step"], x[key], y[key])
    assert abs(a[-1]["val_margin"]) > 1e-4  # the held-out margins moved off 0

RL_KEYS = {
    "grpo": ("reward", "reward_std", "frac_reward_zero_std", "kl", "loss/policy", "grad_norm", "entropy", "response_length", "clip_ratio", "mismatch/kl_k3"),
    "gae": ("reward", "reward_std", "kl", "loss/value", "grad_norm", "entropy", "explained_variance", "response_length"),
}

EVAL = {"grpo": 13, "gae": 0}  # GRPO also evaluates 13 held-out prompts greedily: 7 on rank 0, 6 on rank 1
EVAL_KEYS = ("eval/reward", "eval/reward_std", "eval/accuracy", "eval/length", "eval/stop_rate")


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory, rl_policy):
    """GRPO and PPO-GAE from one SFT policy, by 2 processes (one launch) and by 1 process (here)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import row_seeded

    import bitnet_rl.train.ppo as ppo

    root = tmp_path_factory.mktemp("distributed_rl")
    sft = rl_policy.parent
    specs = []
    for advantage in RL_KEYS:
        spec = root / f"{advantage}-two.json"
        spec.write_text(rl_recipe(advantage, sft / "final", root / f"{advantage}-two", 2, EVAL[advantage]).model_dump_json())
        specs.append(str(spec))
    failing = rl_recipe("grpo", sft / "final", root / "reward-error", 2)
    failing.ppo.rewards = [RewardSpec(source=f"python:{Path(__file__).parent / 'rank_one_reward.py'}:reward")]
    (root / "reward-error.json").write_text(failing.model_dump_json())
    specs.append(str(root / "reward-error.json"))
    skipping = rl_recipe("grpo", sft / "final", root / "skip", 2)  # dynamic sampling with the ceiling and prompt skipping
    skipping.ppo.dynamic_sampling, skipping.ppo.dynamic_sampling_max_mean, skipping.ppo.skip_dropped_prompts = True, 0.5, 0.8
    skipping.ppo.num_prompts, skipping.ppo.iterations = 8, 4  # few prompts: they come back, flagged or not
    skipping.ppo.rewards = [RewardSpec(source="reward_models.demo_task:exact_match")]  # all-wrong groups tie and are dropped
    (root / "skip.json").write_text(skipping.model_dump_json())
    specs.append(str(root / "skip.json"))
    launch("rl_worker.py", *specs)
    make_generator = ppo.make_generator
    try:
        for advantage in RL_KEYS:
            ppo.make_generator = make_generator
            row_seeded.patch(GROUP if advantage == "grpo" else 1)
            ppo.run_ppo(rl_recipe(advantage, sft / "final", root / f"{advantage}-one", 1, EVAL[advantage]))
    finally:
        ppo.make_generator = make_generator
    return root


@pytest.mark.parametrize("advantage", list(RL_KEYS))
def test_rl_two_processes_match_one_process(rl_runs, advantage):
    a, b = _metrics(rl_runs / f"{advantage}-one"), _metrics(rl_runs / f"{advantage}-two")
    assert len(a) == len(b) == 3
    if advantage == "grpo":
        assert any(x["reward_std"] > 0.05 for x in a)  # groups with spread: the advantages are not all zero
    for x, y in zip(a, b):
        for key in RL_KEYS[advantage] + (EVAL_KEYS if "eval/reward" in x else ()):
            assert _close(x[key], y[key], key=key), (key, x["step"], x[key], y[key])
    if EVAL[advantage]:  # evaluated at iterations 2 and 3 by both, the 2-process run each rank its share
        assert ["eval/reward" in x for x in a] == ["eval/reward" in y for y in b] == [False, True, True]
    assert a[0]["reward"] != a[-1]["reward"]  # the policy changed between iterations


def test_reward_error_in_one_process_stops_both_after_one_checkpoint(rl_runs):
    """The reward fails in rank 1 only: both ranks stop (no hang in the next collective) and the
    main process leaves the usual before-reward-error checkpoint."""
    out = rl_runs / "reward-error"
    assert "rank_one_reward.py:reward: non-finite" in (out / "stopped-1").read_text()
    assert "failed in another process" in (out / "stopped-0").read_text()
    saved = list((out / "checkpoints").glob("*before-reward-error"))
    assert len(saved) == 1 and (saved[0] / "trainer_state" / "state.json").is_file()


def test_prompt_skipping_keeps_every_rank_on_the_same_flags(rl_runs):
    """Each rank records every rank's group outcomes (gathered), so their skip flags, skip decisions
    and prompt samplers stay equal: the logged updates of rank 0 and rank 1 are identical."""
    out = rl_runs / "skip"
    ranks = [(out / f"skip-flags-{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) >= 4  # one update per round, at least one round per iteration
    updates = [json.loads(line) for line in ranks[0]]
    assert all(len(picked) == len(dropped) == 2 * 2 for picked, dropped in updates)  # 2 prompts per rank, 2 ranks
    assert any(any(dropped) for _, dropped in updates)
    rows = _metrics(out)
    assert len(rows) == 4 and sum(r["dynamic/skipped_prompts"] for r in rows) > 0
