"""`bitnet-rl generate`: completions for one prompt or a file of prompts.

Prompts are rendered the way the model was trained (the chat template or not, as its
checkpoint records; `--chat` / `--no-chat` decide otherwise, with a warning when that differs)
and refused when empty or too long for the model's context.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from bitnet_rl.data.prompts import check_prompt, encode_prompts, load_prompts_with_where
from bitnet_rl.models.build import resolve_model_dir
from bitnet_rl.models.io import load_policy, load_tokenizer, prompt_format_of


def prompt_chat(recorded: str | None, chat: bool | None, model_dir: Path) -> bool | None:
    """`--chat/--no-chat` if given (warning when it differs from the recorded training format), else the record."""
    if chat is None:
        return {"chat": True, "plain": False}.get(recorded)  # None: chat only for message lists
    if recorded is not None and recorded != ("chat" if chat else "plain"):
        flag = "--chat" if chat else "--no-chat"
        warnings.warn(f"{model_dir} was trained on {recorded} prompts; {flag} renders them differently", stacklevel=2)
    return chat


def generate_to_records(
    model_dir: str | Path,
    prompts: list[Any] | None,
    prompts_file: str | Path | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    batch_size: int,
    backend: str = "packed",
    chat: bool | None = None,
) -> list[dict[str, Any]]:
    from bitnet_rl.rollout import make_generator

    path = resolve_model_dir(model_dir)
    if prompts is None:
        prompts, wheres = load_prompts_with_where(str(prompts_file))
    else:
        wheres = ["--prompt"] * len(prompts)
        for prompt, where in zip(prompts, wheres):
            check_prompt(prompt, where)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = load_policy(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device).eval()
    tokenizer = load_tokenizer(path)
    chat = prompt_chat(prompt_format_of(policy), chat, path)
    context = getattr(policy.config, "max_position_embeddings", None)
    ids = encode_prompts(tokenizer, prompts, chat=chat, context=context, new_tokens=max_new_tokens, where=wheres, new_tokens_key="--max-new-tokens")
    longest = max(len(i) for i in ids)
    generator = make_generator(policy, backend, max_batch_size=min(batch_size, len(ids)), max_seq_len=longest + max_new_tokens)
    out = generator.generate(
        ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_token_ids=[tokenizer.eos_token_id], seed=seed,
    )  # fmt: skip
    records = []
    for row, prompt in enumerate(prompts):
        length = int(out.lengths[row])
        tokens = out.completion_ids[row, :length].tolist()
        records.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(tokens, skip_special_tokens=True),
                "finish_reason": out.finish_reasons[row],
                "tokens": length,
                "logprob": float(out.logprobs_t1[row, :length].sum()),
            }
        )
    return records


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
