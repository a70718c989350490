"""TRL's own trainers train a `prepare`d tiny BitNet model with `BitNetCallback` (CPU, seconds).

Checked: λ in TRL's logs equals `lambda_at` of the update's step, the model ends at the last
step's λ, ternary health and flip rates are logged, SFT and DPO losses fall, GRPO's reward rises.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from bitnet_rl import BitNetCallback, lambda_at, prepare  # noqa: E402
from bitnet_rl.data.demo import make_sft_records  # noqa: E402
from bitnet_rl.quant.bitlinear import get_lambda  # noqa: E402
from bitnet_rl.recipe import TinyModelConfig  # noqa: E402

SHAPE = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True)


@pytest.fixture(autouse=True)
def one_thread_fresh_accelerate():
    """One torch thread; and drop the process-wide accelerate state the trainers create, so later
    tests (our own loops) can build their `Accelerator` with other settings."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_prepared(tokenizer, lam: float = 0.0):
    from bitnet_rl.models.tiny import tiny_bitnet

    model, _ = tiny_bitnet(shape=SHAPE, seed=0, tokenizer=tokenizer)
    return prepare(model, quant={"granularity": "per_tensor"}, lam=lam)


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def expected_lambda(callback: BitNetCallback, step: int) -> float:
    return lambda_at(step, callback.kind, callback.warmup_steps, callback.k, callback.value)


def check_lambda_logs(logs: list[dict], callback: BitNetCallback, model, steps: int) -> None:
    """Each log's λ is the schedule at the update it reports (`step` counts updates done)."""
    assert [entry["step"] for entry in logs] == list(range(1, steps + 1))
    for entry in logs:
        assert entry["bitnet/lambda"] == pytest.approx(expected_lambda(callback, entry["step"] - 1))
        for key in ("frac_neg", "frac_zero", "frac_pos", "weight_std", "flip_rate"):
            assert f"bitnet/{key}" in entry
        assert entry["bitnet/frac_neg"] + entry["bitnet/frac_zero"] + entry["bitnet/frac_pos"] == pytest.approx(1.0)
    assert get_lambda(model) == pytest.approx(expected_lambda(callback, steps - 1))
    print(f"{callback.kind}: logged λ {[round(e['bitnet/lambda'], 4) for e in logs]}, flip rate "
          f"{[round(e['bitnet/flip_rate'], 4) for e in logs]}, loss {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f}")  # fmt: skip


def test_sft_trainer_schedule_and_health(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    records = make_sft_records(256, seed=0)
    data = datasets.Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in records])
    model = tiny_prepared(tokenizer)
    callback = BitNetCallback("linear", warmup_steps=4)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, learning_rate=1e-2, max_length=32, **COMMON)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    logs = train_logs(trainer)
    check_lambda_logs(logs, callback, model, steps=8)
    assert [e["bitnet/lambda"] for e in logs[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert any(e["bitnet/flip_rate"] > 0 for e in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_dpo_trainer_schedule(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from bitnet_rl.data.demo import make_pref_records

    data = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pref_records(128, seed=0)]
    )
    model = tiny_prepared(tokenizer, lam=1.0)
    reference = tiny_prepared(tokenizer, lam=1.0).eval()
    args = DPOConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=16, learning_rate=5e-3, max_length=48, **COMMON)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    cb = BitNetCallback("sigmoid", warmup_steps=3)
    cb.attach(trainer)  # registered first, so report_to integrations see its keys
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    logs = train_logs(trainer)
    check_lambda_logs(logs, cb, model, steps=6)
    assert get_lambda(reference) == 1.0  # the reference is left as built
    assert logs[-1]["loss"] < logs[0]["loss"]


def digit_share(completions, **kwargs):
    """Share of characters that are digits (task 1)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def small_digit_share(completions, **kwargs):
    """Share of the digits that are 0-4 (task 2); 0 without digits."""
    scores = []
    for text in completions:
        digits = [c for c in text if c.isdigit()]
        scores.append(sum(c in "01234" for c in digits) / len(digits) if digits else 0.0)
    return scores


def sampled_reward(model, tokenizer, prompts, reward_fn) -> float:
    """Mean reward of one sampled completion (T = 1, 8 tokens) per held-out prompt, fixed seed."""
    torch.manual_seed(123)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return sum(reward_fn(texts)) / len(texts)


@pytest.mark.parametrize("reward_fn", [digit_share, small_digit_share])
def test_grpo_trainer_reward_rises(tokenizer, tmp_path, reward_fn):
    from trl import GRPOConfig, GRPOTrainer

    from bitnet_rl.data.demo import make_prompts

    model = tiny_prepared(tokenizer, lam=1.0)
    held_out = make_prompts(64, seed=0)
    data = datasets.Dataset.from_list([{"prompt": p} for p in make_prompts(256, seed=1)])
    before = sampled_reward(model, tokenizer, held_out, reward_fn)
    callback = BitNetCallback("exponential", warmup_steps=10, k=3.0)
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16, num_generations=8, max_completion_length=8,
        learning_rate=1e-2, beta=0.0, temperature=1.0, **COMMON,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    logs = train_logs(trainer)
    check_lambda_logs(logs, callback, model, steps=20)
    after = sampled_reward(model, tokenizer, held_out, reward_fn)
    print(f"{reward_fn.__name__}: held-out sampled reward {before:.3f} -> {after:.3f}; "
          f"train reward {logs[0]['reward']:.3f} -> {logs[-1]['reward']:.3f}")  # fmt: skip
    assert after > before + 0.15


def test_callback_drops_cached_quantized_weights_each_step(tokenizer):
    """Under FSDP a trainer refills weights in place where the Q(W) cache's key cannot see it; the
    callback clears the cache at every step, as bitnet-rl's own loop does after each update."""
    from bitnet_rl.quant.bitlinear import bitlinear_modules, quantize_weight

    model = tiny_prepared(tokenizer, lam=1.0)
    layers = [m for _, m in bitlinear_modules(model)]
    stale = [m.quantized_weight() for m in layers]
    for module in layers:
        module.weight.data.copy_(-module.weight.detach())  # same storage, same version counter
    assert all(m.quantized_weight() is s for m, s in zip(layers, stale))
    from transformers import TrainerState

    BitNetCallback().on_step_begin(None, TrainerState(global_step=3), None, model=model)
    assert all(torch.equal(m.quantized_weight(), quantize_weight(m.weight, m.granularity, m.group_size)) for m in layers)
