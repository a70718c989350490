"""Pre-rollout prompt skipping (GRESO): seeded skips of prompts whose latest group was dropped."""

import pytest
import torch

from bitnet_rl.train.loop import EpochSampler, LoopState
from bitnet_rl.train.prompt_skip import PromptSkipper, rank_major_to_pick_order


def test_off_draws_exactly_what_the_sampler_draws():
    a, b = EpochSampler(50, 3, LoopState()), EpochSampler(50, 3, LoopState())
    skipper = PromptSkipper(50, 0.0, seed=0)
    skipper.dropped[:] = True
    assert skipper.pick(a, 20, iteration=1, round_index=0) == b.next(20)
    assert skipper.take_skipped() == 0


def test_flagged_prompts_are_skipped_at_rate_p_and_unflagged_never():
    n, p = 100, 0.75
    skipper = PromptSkipper(n, p, seed=0)
    skipper.dropped[: n // 2] = True  # prompts 0..49 dropped last time
    sampler = EpochSampler(n, 1, LoopState())
    picks = [i for it in range(200) for i in skipper.pick(sampler, 10, iteration=it, round_index=0)]
    flagged = sum(i < n // 2 for i in picks)
    # every unflagged prompt drawn is kept; a flagged one is kept with probability 1 − p = 0.25:
    # kept flagged / kept unflagged ≈ 0.25 (binomial over ~500 flagged draws: ±0.06 at 3 sigma)
    assert flagged / (len(picks) - flagged) == pytest.approx(1 - p, abs=0.06)
    skipped = skipper.take_skipped()
    assert skipped == pytest.approx(3 * flagged, rel=0.25) and skipper.take_skipped() == 0
    # deterministic: same state, iteration and round give the same picks
    first, second = PromptSkipper(n, p, seed=0), PromptSkipper(n, p, seed=0)
    first.dropped[: n // 2] = second.dropped[: n // 2] = True
    picks = [s.pick(EpochSampler(n, 1, LoopState()), 10, iteration=5, round_index=2) for s in (first, second)]
    assert picks[0] == picks[1] and any(i < n // 2 for i in picks[0]) and len(set(picks[0])) == 10


def test_record_and_state_round_trip():
    skipper = PromptSkipper(8, 0.5, seed=0)
    skipper.record([3, 5, 1], torch.tensor([True, False, True]))
    assert skipper.dropped.nonzero().flatten().tolist() == [1, 3]
    skipper.record([3], torch.tensor([False]))  # sampled again and kept: the flag clears
    state = skipper.state_dict()
    restored = PromptSkipper(8, 0.5, seed=0)
    restored.load_state_dict(state)
    assert restored.dropped.tolist() == skipper.dropped.tolist() == [False, True] + [False] * 6
    with pytest.raises(ValueError):
        skipper.record([1, 2], torch.tensor([True]))
    with pytest.raises(ValueError):
        PromptSkipper(8, 1.0, seed=0)


def test_rank_major_outcomes_map_back_to_pick_order():
    # 2 ranks, 3 groups each: rank r samples picks r, r + 2, r + 4; gathered = rank 0's then rank 1's
    gathered = torch.tensor([10, 12, 14, 11, 13, 15])
    assert rank_major_to_pick_order(gathered, 2).tolist() == [10, 11, 12, 13, 14, 15]
    assert rank_major_to_pick_order(gathered, 1).tolist() == gathered.tolist()
