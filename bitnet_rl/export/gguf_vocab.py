"""A Hugging Face BPE tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`) for llama.cpp.

llama.cpp's "gpt2" tokenizer model is byte-level BPE: the token strings (byte-level alphabet),
their types, the merges, special ids, and the name of the pre-tokenizer regex. We map the two
regexes we can recognise (GPT-2's, used by ByteLevel(use_regex=True), and Llama 3's) to
llama.cpp's names; anything else is refused, since a wrong pre-tokenizer silently changes
the token ids llama.cpp feeds the model.
"""

from __future__ import annotations

import json
from typing import Any

from bitnet_rl.errors import UserError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
LLAMA3_MARKS = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "\\p{N}{1,3}")


def pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer of a `tokenizer.json` (`gpt-2` or `llama-bpe`)."""
    if spec is None:
        raise UserError("gguf: the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    patterns = [json.dumps(p.get("pattern", {})) for p in parts if p.get("type") == "Split"]
    if "ByteLevel" in types and any(all(json.dumps(m)[1:-1] in pat for m in LLAMA3_MARKS) for pat in patterns):
        return "llama-bpe"
    raise UserError(f"gguf: pre-tokenizer {types} is not one llama.cpp is known to reproduce (GPT-2 or Llama 3 byte-level BPE)")


def vocab_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Token strings, types, merges, special ids and flags for `vocab_size` ids (extra ids are unused)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"gguf: only byte-level BPE tokenizers are exported, this one is {model.get('type')}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a").input_ids
    return {
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def add_vocab(writer, meta: dict[str, Any]) -> None:
    """Write `vocab_metadata` into a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if meta[key] is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    if isinstance(meta["chat_template"], str):
        writer.add_chat_template(meta["chat_template"])
