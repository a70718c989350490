"""KL and perplexity from the eval's batched teacher-forced passes, against one-sequence-at-a-time
computations over the whole vocabulary with the plain model."""

import copy
import math

import pytest
import torch

from bitnet_rl.eval.core import kl_metrics, perplexity_metrics
from bitnet_rl.eval.scoring import paired_logprobs
from bitnet_rl.eval.task import sample
from bitnet_rl.models.io import load_policy, load_tokenizer
from bitnet_rl.rollout import make_generator


@pytest.fixture(scope="module")
def models(tiny_dir):
    torch.manual_seed(0)
    policy = load_policy(tiny_dir).eval()
    perturbed = copy.deepcopy(policy)
    with torch.no_grad():
        perturbed.lm_head.weight.add_(0.5 * torch.randn_like(perturbed.lm_head.weight))
    return policy, perturbed, load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def drawn(models):
    policy, _, tokenizer = models
    generator = make_generator(policy, "packed", max_batch_size=16, max_seq_len=32)
    prompts = ["sort: 3 1 2 =", "sort: 9 =", "sort: 5 5 0 1 ="] * 4
    return sample(generator, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=3, batch_size=5)


def _direct(policy, reference, prompt_ids, completion_ids):
    """Per completion token: log π(y), log π_ref(y), and Σ_v π(v)(log π(v) − log π_ref(v)); one sequence, no padding."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
        logq = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
    rows = []
    for t, token in enumerate(completion_ids):
        position = len(prompt_ids) - 1 + t  # the logits that predict completion token t
        p, q = logp[position], logq[position]
        rows.append((float(p[token]), float(q[token]), float((p.exp() * (p - q)).sum())))
    return rows


def test_kl_of_a_model_against_itself_is_zero(models, drawn):
    policy, _, tokenizer = models
    kl = kl_metrics(policy, policy, drawn, tokenizer.pad_token_id, batch_size=4)
    for key in ("k1_token", "k1_seq", "k3_token", "k3_seq", "exact_token", "exact_seq"):
        assert kl[key] == 0.0, key


def test_kl_against_a_perturbed_copy_matches_a_direct_computation(models, drawn):
    policy, perturbed, tokenizer = models
    scored = paired_logprobs(policy, perturbed, drawn.prompt_ids, drawn.completion_ids, tokenizer.pad_token_id, batch_size=5)
    k1_seq, k3_seq, exact_seq, tokens = [], [], [], 0
    for i, (prompt_ids, completion_ids) in enumerate(zip(drawn.prompt_ids, drawn.completion_ids)):
        direct = _direct(policy, perturbed, prompt_ids, completion_ids)
        assert scored.policy[i].tolist() == pytest.approx([d[0] for d in direct], abs=1e-4)
        assert scored.reference[i].tolist() == pytest.approx([d[1] for d in direct], abs=1e-4)
        assert scored.exact_kl[i].tolist() == pytest.approx([d[2] for d in direct], abs=1e-4)
        k1_seq.append(sum(p - q for p, q, _ in direct))
        k3_seq.append(sum(math.exp(q - p) - (q - p) - 1 for p, q, _ in direct))
        exact_seq.append(sum(e for _, _, e in direct))
        tokens += len(direct)
    kl = kl_metrics(policy, perturbed, drawn, tokenizer.pad_token_id)
    assert kl["k1_seq"] == pytest.approx(sum(k1_seq) / len(k1_seq), abs=1e-4)
    assert kl["k1_token"] == pytest.approx(sum(k1_seq) / tokens, abs=1e-4)
    assert kl["k3_seq"] == pytest.approx(sum(k3_seq) / len(k3_seq), abs=1e-4)
    assert kl["exact_seq"] == pytest.approx(sum(exact_seq) / len(exact_seq), abs=1e-4)
    assert kl["exact_token"] > 0 and kl["k3_token"] > 0 and kl["k1_seq_se"] > 0


def test_perplexity_counts_completion_tokens_only(models):
    from bitnet_rl.data.sft import tokenize_sft

    policy, _, tokenizer = models
    records = [{"prompt": "sort: 3 1 2 =", "completion": " 1 2 3"}, {"prompt": "sort: 4 0 =", "completion": " 0 4"}]
    examples = tokenize_sft(records, tokenizer, "prompt_completion", max_length=64)
    nll, count = 0.0, 0
    for record in records:
        prompt_ids = list(tokenizer(record["prompt"])["input_ids"])
        completion_ids = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
        for t, token in enumerate(completion_ids):
            nll -= float(logp[len(prompt_ids) - 1 + t, token])
            count += 1
    out = perplexity_metrics(policy, examples, tokenizer.pad_token_id)
    assert out["tokens"] == count
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
