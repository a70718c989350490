"""Pre-rollout prompt skipping for dynamic sampling (GRESO, Zheng et al. 2025, "Act Only When It Pays").

Dynamic sampling throws away the groups that carry no (or little) signal: all rewards tie, or the
policy mostly solves the prompt (`ppo.dynamic_sampling_max_mean`). A prompt whose latest group was
thrown away is likely to be thrown away again, and sampling it costs a whole group of generations.
With `ppo.skip_dropped_prompts = p`, each time the prompt sampler draws such a prompt it is skipped
with probability p (the draw moves on to the next prompt), until it is sampled again and its new
group decides its flag. Prompts are never skipped for good: a skipped prompt comes back with
probability 1 − p at every later draw, so prompts that become learnable (or forgotten) return.

Deterministic and resumable: the skip decisions come from a generator seeded by (seed, iteration,
round), and the flags are part of the trainer's checkpointed state. Every process holds the same
flags (the rounds' outcomes are gathered), so their prompt samplers stay in step.
"""

from __future__ import annotations

from typing import Any

import torch


class PromptSkipper:
    """Per-prompt "latest group dropped" flags and the seeded skip decisions."""

    def __init__(self, num_prompts: int, probability: float, seed: int) -> None:
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"skip probability {probability} is outside [0, 1)")
        self.probability, self.seed = probability, seed
        self.dropped = torch.zeros(num_prompts, dtype=torch.bool)
        self.skipped = 0  # prompts skipped since the last `take_skipped`

    def pick(self, sampler, size: int, iteration: int, round_index: int) -> list[int]:
        """`size` prompt indices from `sampler` (an EpochSampler), skipping flagged ones with probability p."""
        if self.probability == 0.0:
            return sampler.next(size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration * 7_919 + round_index)
        picked: list[int] = []
        while len(picked) < size:
            for index in sampler.next(size - len(picked)):
                if self.dropped[index] and float(torch.rand((), generator=generator)) < self.probability:
                    self.skipped += 1
                    continue
                picked.append(index)
        return picked

    def record(self, picked: list[int], dropped: torch.Tensor) -> None:
        """Set the flags of `picked` prompts from their groups' outcome. `dropped`: (len(picked),) bool."""
        if len(picked) != dropped.numel():
            raise ValueError(f"{len(picked)} prompts but {dropped.numel()} group outcomes")
        self.dropped[torch.tensor(picked, dtype=torch.long)] = dropped.flatten().cpu().bool()

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def state_dict(self) -> dict[str, Any]:
        return {"dropped": self.dropped.nonzero().flatten().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dropped.zero_()
        self.dropped[torch.tensor(state.get("dropped", []), dtype=torch.long)] = True


def rank_major_to_pick_order(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """Reorder per-group values gathered rank by rank into the order of the global pick.

    Rank r samples picks r, r + world, r + 2·world, … (`picked[r::world]`), so its j-th group is
    pick r + world·j; `gathered` holds rank 0's groups, then rank 1's, … (each rank the same count).
    (world · P,) -> (world · P,)
    """
    per_rank = gathered.numel() // world
    return gathered.reshape(world, per_rank).t().reshape(-1)
