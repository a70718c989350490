"""Tiny random models and a locally trained tokenizer, for tests, the demo and benchmarks.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on the demo corpus (or
given texts), the weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from bitnet_rl.recipe import TinyModelConfig


def tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 384):
    from bitnet_rl.data.demo import demo_corpus
    from bitnet_rl.data.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(texts if texts is not None else demo_corpus(), vocab_size=vocab_size)


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_bitnet(out_dir: str | Path | None = None, shape: TinyModelConfig | None = None, seed: int = 0, tokenizer=None):
    """A random `BitNetForCausalLM` (ReLU², SubLN, RoPE, no biases) and its tokenizer.

    The model holds plain `nn.Linear` projections: it is the BF16-master-weight layout that
    `load_policy` reads. If `out_dir` is given, both are saved there as a normal HF directory.
    """
    from transformers import BitNetConfig, BitNetForCausalLM

    shape = shape or TinyModelConfig()
    tokenizer = tokenizer or tiny_tokenizer()
    config = BitNetConfig(
        **shape.shape(),
        **_special_ids(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def tiny_llama(out_dir: str | Path | None = None, shape: TinyModelConfig | None = None, seed: int = 0, tokenizer=None):
    """A random dense `LlamaForCausalLM` of the same size: the 'bring a dense model to 1.58 bits' path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or TinyModelConfig()
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(**shape.shape(), **_special_ids(tokenizer), max_position_embeddings=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer
