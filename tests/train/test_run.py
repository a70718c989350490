"""The run object (`train/run.py`) driving a stage whose step takes several optimizer steps, as PPO's
iteration does: λ per optimizer step, health and evaluation at the right stage steps, checkpoints
that hold the run's and the stage's state, and a resume that continues bit-exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.quant.bitlinear import get_lambda
from bitnet_rl.recipe import Recipe, validate
from bitnet_rl.train.run import Run

OPT_STEPS = 3  # optimizer steps per stage step
WARMUP = 8  # linear λ: λ(s) = min(s / 8, 1)


class ToyStage:
    """Each stage step draws a random batch (global RNG, so a resume must restore it) and takes
    `OPT_STEPS` optimizer steps of next-token loss on it; it counts its steps as its own state."""

    command = "toy"
    total_key = "toy.steps"
    baseline_eval = False

    def __init__(self, total: int, eval_every: int) -> None:
        self.total, self.eval_every = total, eval_every
        self.steps_seen = 0
        self.evaluated_at: list[int] = []
        self.began_with_steps: int | None = None

    def begin(self, run) -> None:
        self.began_with_steps = run.state.step

    def step(self, run) -> dict:
        lambda_at_start = get_lambda(run.unwrapped)  # what the stage sees before its first optimizer step
        ids = torch.randint(3, 100, (4, 12))
        lambdas, losses = [], []
        for _ in range(OPT_STEPS):
            lambdas.append(run.set_lambda())
            loss = run.model(input_ids=ids, labels=ids).loss
            run.accelerator.backward(loss)
            run.optimizer_step()
            losses.append(loss.item())
        self.steps_seen += 1
        return {"loss": losses[-1], "losses": losses, "lambdas": lambdas, "lambda_at_start": lambda_at_start, "optimizer_step": run.state.step}

    def evaluate(self, model) -> dict:
        self.evaluated_at.append(self.steps_seen)
        return {"eval/steps_seen": self.steps_seen}

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = state["steps_seen"]

    def final_files(self, model) -> dict:
        return {"toy.txt": lambda path: path.write_text(str(self.steps_seen))}

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.3f}"}


def toy_recipe(out, every: int = 0) -> Recipe:
    return validate(
        Recipe,
        {
            "out": str(out),
            "quant": {"schedule": {"kind": "linear", "warmup_steps": WARMUP}},
            "optimizer": {"lr": 1e-3},
            "checkpoint": {"every": every, "keep_last": 5},
            "logging": {"progress": False, "health_every": 4},
        },
        "test",
    )


def run_toy(out, model_dir, total=5, eval_every=2, every=0, resume=None):
    recipe = toy_recipe(out, every)
    run = Run(recipe, "toy")
    run.add_model(load_policy(model_dir), load_tokenizer(model_dir), total_steps=total * OPT_STEPS)
    stage = ToyStage(total, eval_every)
    final = run.train(stage, resume=resume)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return final, stage, rows


def test_run_drives_a_stage_of_several_optimizer_steps(sft_dir, tmp_path):
    final, stage, rows = run_toy(tmp_path / "a", sft_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # one record per stage step
    assert [r["optimizer_step"] for r in rows] == [3, 6, 9, 12, 15]
    # λ per optimizer step: stage step k runs optimizer steps 3(k-1) .. 3k-1, λ(s) = min(s / 8, 1)
    expected = [[min(s / 8, 1.0) for s in range(3 * k, 3 * k + 3)] for k in range(5)]
    assert [r["lambdas"] for r in rows] == expected
    assert [r["lambda_at_start"] for r in rows] == [e[0] for e in expected]  # set before the stage's step
    # health when the optimizer step passes a multiple of 4: 0→3 no, 3→6 (4), 6→9 (8), 9→12 (12), 12→15 no
    assert ["flip_rate" in r for r in rows] == [False, True, True, True, False]
    # evaluation every 2 stage steps and after the last
    assert stage.evaluated_at == [2, 4, 5] and ["eval/steps_seen" in r for r in rows] == [False, True, False, True, True]
    assert (final / "toy.txt").read_text() == "5"
    state = json.loads((final / "trainer_state" / "state.json").read_text())
    assert state["step"] == 15 and state["extra"] == {"iteration": 5, "steps_seen": 5}
    if not torch.cuda.is_available():
        assert not any("memory/peak_gib" in r for r in rows)  # a CUDA figure only


@pytest.mark.gpu
def test_peak_memory_per_step_on_cuda(sft_dir, tmp_path):
    """`memory/peak_gib` every step: at least the weights, gradients and AdamW's two moments."""
    final, _, rows = run_toy(tmp_path / "a", sft_dir, total=2, eval_every=0)
    weights = sum(p.numel() * p.element_size() for p in load_policy(final).parameters()) / 2**30
    assert all(r["memory/peak_gib"] >= 3 * weights for r in rows) and rows[1]["memory/peak_gib"] >= rows[0]["memory/peak_gib"]


def test_resume_of_a_multi_step_stage_is_bit_exact(sft_dir, tmp_path):
    _, _, rows_a = run_toy(tmp_path / "a", sft_dir)
    run_toy(tmp_path / "b", sft_dir, every=2)
    checkpoint = tmp_path / "b" / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "trainer_state" / "state.json").read_text())
    assert state["step"] == 6 and state["extra"] == {"iteration": 2, "steps_seen": 2}
    final, stage, rows_b = run_toy(tmp_path / "b", sft_dir, every=2, resume=str(checkpoint))
    assert stage.began_with_steps == 6 and stage.steps_seen == 5  # the run's position and the stage's own state
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert [r["losses"] for r in rows_b] == [r["losses"] for r in rows_a]  # the same batches (RNG) and weights
    assert [r["lambdas"] for r in rows_b] == [r["lambdas"] for r in rows_a]
    a, b = load_file(str(tmp_path / "a" / "final" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_nothing_left_names_the_stage_key(sft_dir, tmp_path):
    from bitnet_rl.errors import UserError

    run_toy(tmp_path / "a", sft_dir, total=2, eval_every=0, every=1)
    with pytest.raises(UserError, match=r"at step 2 and toy.steps=2"):
        run_toy(tmp_path / "a", sft_dir, total=2, eval_every=0, every=1, resume=str(tmp_path / "a" / "final"))


def test_an_sft_checkpoint_in_the_older_layout_resumes_exactly(tmp_path):
    """Checkpoints written before the run object have no `iteration` in state.json (SFT/DPO/RM:
    stage steps are optimizer steps); they still resume, bit-exactly."""
    from bitnet_rl.train.sft import run_sft

    from .test_sft import recipe as sft_recipe

    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(sft_recipe(a, train={"max_steps": 6}))
    run_sft(sft_recipe(b, train={"max_steps": 6}, checkpoint={"every": 3}))
    state_file = b / "checkpoints" / "step-0000003" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["extra"] == {"iteration": 3}
    state_file.write_text(json.dumps({**state, "extra": {}}))  # the older layout
    final = run_sft(sft_recipe(b, train={"max_steps": 6}, checkpoint={"every": 3}), resume=str(state_file.parents[1]))
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))
