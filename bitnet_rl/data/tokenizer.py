"""A tiny tokenizer trained locally, so tests and the CPU demo never touch a model hub."""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bitnet_rl.data.chat import DEFAULT_CHAT_TEMPLATE

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `transformers`.

    Byte-level BPE never produces <unk> and keeps spaces, so decode(encode(s)) == s. Its
    pre-tokenizer keeps a leading space with the following digit run, so on the demo corpus
    (single digits separated by spaces) every " 7" is one token and prompt/completion
    boundaries tokenize the same alone or together. BOS is prepended by the post-processor;
    the role markers of the default chat template are special tokens.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def pad_id(tokenizer: Any) -> int:
    """The id to right-pad with: the pad token, else EOS (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0
