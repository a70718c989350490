"""Build the policy a recipe names: a tiny random BitNet, or `load_policy` of a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from bitnet_rl.errors import UserError
from bitnet_rl.models.convert import quantize_model
from bitnet_rl.models.io import load_policy, load_tokenizer, read_config
from bitnet_rl.recipe import ModelConfig, QuantConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory (`OUT/`) stands for its final model (`OUT/final`)."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def model_source(model_cfg: ModelConfig) -> Path | None:
    """The model directory the recipe's `model` section names, checked without loading anything
    (None for a tiny model): `build_policy`'s path errors, for commands that check inputs first."""
    if model_cfg.tiny is not None:
        return None
    if not model_cfg.path:
        raise UserError("model.path is not set (give --model DIR, model.path=DIR or model.tiny)")
    path = resolve_model_dir(model_cfg.path)
    read_config(path)  # a missing directory or config.json, or bad JSON: one line
    return path


def build_policy(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    lam: float,
    device: str | torch.device = "cpu",
    seed: int = 0,
    texts: Iterable[str] | None = None,
):
    """(policy with BitLinear projections, tokenizer) as the recipe's `model` section says.

    A tiny model's tokenizer is trained on `model.tiny.tokenizer_data` if set, else on `texts`
    (the run's own data), else on the demo corpus.
    """
    dtype = resolve_dtype(model_cfg.dtype, device)
    if model_cfg.tiny is not None:
        from bitnet_rl.models.tiny import tiny_bitnet, tiny_tokenizer

        tiny = model_cfg.tiny
        if tiny.tokenizer_data:
            from bitnet_rl.data.load import corpus_texts

            texts = corpus_texts(tiny.tokenizer_data, "model.tiny.tokenizer_data")
        tokenizer = tiny_tokenizer(list(texts) if texts is not None else None, vocab_size=tiny.tokenizer_vocab_size)
        model, tokenizer = tiny_bitnet(shape=tiny, seed=seed, tokenizer=tokenizer)
        return quantize_model(model, quant, lam).to(device=device, dtype=dtype), tokenizer
    path = model_source(model_cfg)
    return load_policy(path, quant=quant, lam=lam, dtype=dtype, device=device), load_tokenizer(path)
