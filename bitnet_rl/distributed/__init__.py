"""Several processes (GPUs, or gloo workers on CPU) through accelerate.

`launch` starts the workers for `bitnet-rl CMD --num-processes N`; `reduce` holds the pure
cross-rank statistics (whitening with global moments, weighted means, loss denominators), each
taking an all-reduce callable so one process can test them; `collective` binds those callables
to an accelerator and holds the run-directory barriers; `fsdp` the FSDP2 pieces (full weights
for the generator and for checkpoints).

Conventions (as TRL's `per_device_*` sizes): `train.batch_size`, `ppo.prompts_per_iteration`,
`ppo.minibatch_size` and `ppo.micro_batch_size` are per process; the global batch is N times
larger. Whole GRPO/RLOO groups stay on the rank that sampled them.
"""
