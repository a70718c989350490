import torch

from bitnet_rl.train.onpolicy_prefs import best_worst_pairs


def test_best_worst_pairs_by_hand():
    prompts = ["a", "b", "c"]
    samples = [[" 1", " 2", ""], [" 3", " 2", " 5"], [" 4", " 2", " 6"]]
    scores = torch.tensor([[0.5, 1.0, 9.0], [0.2, 1.0, 0.1], [0.9, 1.0, 0.3]])  # (k, N)
    pairs = best_worst_pairs(prompts, samples, scores)
    # prompt a: best " 4" (0.9), worst " 3" (0.2); b: all tie → no pair; c: the empty sample is skipped
    assert pairs == [{"prompt": "a", "chosen": " 4", "rejected": " 3"}, {"prompt": "c", "chosen": " 6", "rejected": " 5"}]
