"""The top-level API: every documented name resolves, and `import bitnet_rl` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import bitnet_rl

ISSUE_NAMES = [
    "load_policy", "save_checkpoint", "prepare", "BitLinear", "set_lambda", "lambda_at", "ternary_health",
    "PackedGenerator", "load_recipe", "run_sft", "run_dpo", "run_rm", "run_ppo",
]  # fmt: skip


def test_import_does_not_load_heavy_libraries():
    code = "import sys, json, bitnet_rl; print(json.dumps(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'accelerate') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_every_public_name_resolves_to_its_definition():
    from bitnet_rl.models.io import load_policy
    from bitnet_rl.quant.bitlinear import BitLinear
    from bitnet_rl.rollout import PackedGenerator
    from bitnet_rl.train.ppo import run_ppo

    assert set(ISSUE_NAMES) <= set(bitnet_rl.__all__) <= set(dir(bitnet_rl))
    for name in bitnet_rl.__all__:
        assert getattr(bitnet_rl, name) is not None, name
    assert bitnet_rl.load_policy is load_policy
    assert bitnet_rl.BitLinear is BitLinear
    assert bitnet_rl.PackedGenerator is PackedGenerator
    assert bitnet_rl.run_ppo is run_ppo
    from bitnet_rl import lambda_at, prepare  # noqa: F401  (the `from` form works too)


def test_unknown_name_is_an_attribute_error():
    try:
        bitnet_rl.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")
