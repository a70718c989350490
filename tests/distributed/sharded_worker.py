"""Worker of test_sharded.py (2 gloo processes): gradient sync through `forward_through` under DDP,
and the FSDP2 helpers on a tiny BitNet sharded with torch's `fully_shard` (accelerate enables its
FSDP2 plugin only for GPU workers). Writes what the test compares to OUT (argv[1])."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from bitnet_rl.distributed.fsdp import full_model_state, full_optimizer_state, gathered_params, is_sharded
from bitnet_rl.models.build import build_policy
from bitnet_rl.models.io import save_checkpoint
from bitnet_rl.models.value import _token_values, token_values
from bitnet_rl.recipe import ModelConfig, QuantConfig, TinyModelConfig
from bitnet_rl.rollout import make_generator

out = Path(sys.argv[1])
state = PartialState(cpu=True)
rank, world = state.process_index, state.num_processes
report: dict = {"world": world}


def model_and_tokenizer():
    return build_policy(ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)), QuantConfig(), lam=1.0, seed=0)


def grads_agree(module) -> bool:
    flat = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.allclose(gathered[0], g) for g in gathered[1:])


# 1. DDP: a head-on-backbone forward (the critic's / reward model's token values) on different data per rank
def scalar_ddp():
    policy, _ = model_and_tokenizer()
    policy.score = torch.nn.Linear(policy.config.hidden_size, 1)  # a scalar head, as models.value builds it
    return DistributedDataParallel(policy, find_unused_parameters=True)  # (the LM head is unused here)


ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(rank))
mask = torch.ones_like(ids)
bypass = scalar_ddp()
_token_values(bypass.module, ids, mask).sum().backward()  # the old way: parts of the inner module, no DDP forward
report["ddp_bypassing_forward_synced"] = grads_agree(bypass.module)
through = scalar_ddp()
token_values(through, ids, mask).sum().backward()
report["ddp_through_forward_synced"] = grads_agree(through.module)

# 2. FSDP2: shard, train a step, then full weights for the generator, the checkpoint and the optimizer
model, tokenizer = model_and_tokenizer()
reference_generator = make_generator(model, backend="packed", max_batch_size=2, max_seq_len=32)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
report["sharded"] = is_sharded(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
optimizer.step()
generator = reference_generator  # built from the unsharded model, synced from the sharded one
with gathered_params(model):
    generator.sync_from(model)  # what PPO does after each step
    report["gathered_is_full"] = tuple(model.model.layers[0].mlp.gate_proj.weight.shape) == (64, 32)
prompt = [[5, 6, 7, 8]]
completion = generator.generate(prompt, max_new_tokens=6, temperature=0.0, stop_token_ids=[]).completion_ids[0].tolist()
weights, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)  # collective
if rank == 0:
    save_checkpoint(model, tokenizer, out / "checkpoint", state_dict=weights)
    torch.save(optimizer_state, out / "optimizer.pt")
    report["generator_completion"] = completion
    (out / "report.json").write_text(json.dumps(report))
state.wait_for_everyone()
