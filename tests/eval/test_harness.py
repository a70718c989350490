"""lm-evaluation-harness on our BitLinear model with a task defined here (no hub download)."""

import json
import math

import pytest
import torch

from bitnet_rl.errors import UserError
from bitnet_rl.eval.harness import parse_tasks

DOCS = [
    {"question": "sort: 3 1 2 =", "choices": [" 1 2 3", " 3 2 1 1 1"], "label": 0},
    {"question": "sort: 9 4 =", "choices": [" 9 4 4 4", " 4 9"], "label": 1},
    {"question": "sort: 5 0 7 =", "choices": [" 0 5 7", " 7"], "label": 0},
    {"question": "sort: 8 2 =", "choices": [" 8", " 2 8"], "label": 1},
]


def _task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = tmp_path / "tiny_sort.yaml"
    task.write_text(
        "task: tiny_sort\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task


def test_parse_tasks_reads_names_from_local_files(tmp_path):
    task = _task(tmp_path)
    assert parse_tasks(f"hellaswag,{task}") == (["hellaswag", "tiny_sort"], [str(tmp_path.resolve())])
    with pytest.raises(UserError, match="task file not found"):
        parse_tasks(str(tmp_path / "missing.yaml"))


def test_lm_eval_on_a_local_task_scores_our_quantized_model(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from bitnet_rl.eval.harness import prepare_tasks, run_lm_eval
    from bitnet_rl.models.io import load_policy, load_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = load_policy(tiny_dir).eval(), load_tokenizer(tiny_dir)
    results = run_lm_eval(model, tokenizer, prepare_tasks(str(_task(tmp_path))), limit=None, batch_size=4)
    accuracy = results["tiny_sort"]["acc,none"]
    # the harness picks the choice of highest summed log-likelihood: recompute that with our model
    expected = []
    for doc in DOCS:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole))))
        expected.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    assert math.isclose(accuracy, sum(expected) / len(expected))


def test_missing_extra_is_one_clear_line(monkeypatch, tiny_dir):
    import builtins

    from typer.testing import CliRunner

    from bitnet_rl.cli import app

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--lm-eval", "hellaswag", "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --lm-eval needs lm-evaluation-harness: pip install 'bitnet-rl[eval]'"
