"""Every directory we write says what it is, and a reward model loads in plain transformers."""

import json

import pytest
import torch
from typer.testing import CliRunner

from bitnet_rl.cli import app
from bitnet_rl.errors import UserError
from bitnet_rl.models.io import load_policy, load_tokenizer, model_kind, save_checkpoint
from bitnet_rl.models.value import load_scalar_model, register_auto_classes, sequence_scores


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    model = load_scalar_model(tiny_dir, seed=3)
    return save_checkpoint(model, load_tokenizer(tiny_dir), tmp_path_factory.mktemp("kinds") / "rm")


def kind_in(path):
    return json.loads((path / "config.json").read_text())["bitnet_rl"]["kind"]


def test_kinds_are_recorded(tiny_dir, rm_dir, tmp_path, no_compile):
    policy = save_checkpoint(load_policy(tiny_dir), load_tokenizer(tiny_dir), tmp_path / "policy")
    critic = save_checkpoint(load_scalar_model(tiny_dir, head="zero"), None, tmp_path / "critic", kind="critic")
    assert (kind_in(policy), kind_in(rm_dir), kind_in(critic)) == ("policy", "reward_model", "critic")
    # directories written elsewhere: the kind follows from `architectures`
    assert model_kind({"architectures": ["LlamaForSequenceClassification"]}) == "reward_model"
    assert model_kind({"architectures": ["LlamaForCausalLM"]}) == "policy"


def test_wrong_kind_is_refused(tiny_dir, rm_dir):
    with pytest.raises(UserError, match="is a reward model, not a policy"):
        load_policy(rm_dir)
    with pytest.raises(UserError, match="is a policy \\(causal LM\\), not a reward model"):
        load_scalar_model(tiny_dir, kinds=("reward_model",))


def test_reward_model_loads_in_plain_transformers(rm_dir, no_compile):
    """`register_auto_classes()` then AutoModelForSequenceClassification: same score as our loader (AutoBitLinear = BitLinear at λ=1)."""
    from transformers import AutoModelForSequenceClassification

    register_auto_classes()
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ours = load_scalar_model(rm_dir).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = sequence_scores(ours, ids, mask)
        got = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert type(plain.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert expected.abs().item() > 1e-3  # a real score, not a zero head


def test_info_reports_a_reward_model(rm_dir):
    result = CliRunner().invoke(app, ["info", str(rm_dir)])
    assert result.exit_code == 0, result.output
    assert "kind:         a reward model" in result.output and "BitNetForSequenceClassification" in result.output
