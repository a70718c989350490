"""Scalar-head models: reward models (one score per sequence) and critics (one value per token).

Both are a causal LM's backbone with a linear `score` head, in the layout of transformers'
`*ForSequenceClassification` (num_labels = 1), so any architecture with such a class works
and a saved reward model is a normal HF directory. transformers has no BitNet class for it:
`BitNetForSequenceClassification` below is its generic implementation on the BitNet backbone
(load saved BitNet reward models with `load_scalar_model`, or in plain transformers after
`register_auto_classes()`).

We pool scores ourselves from the attention mask (the last real token), not from
`pad_token_id`, which breaks when pad and EOS share an id.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.models.convert import quantize_model
from bitnet_rl.models.io import carry_record, check_weight_files, clean_config, load_policy, read_config, require_kind, saved_quant
from bitnet_rl.recipe import QuantConfig


from transformers import BitNetPreTrainedModel  # noqa: E402
from transformers.modeling_layers import GenericForSequenceClassification  # noqa: E402


class BitNetForSequenceClassification(GenericForSequenceClassification, BitNetPreTrainedModel):
    """BitNet backbone + linear `score` head (transformers' generic sequence classifier)."""


def register_auto_classes() -> None:
    """Let `AutoModelForSequenceClassification.from_pretrained(DIR)` load a BitNet reward model.

    transformers has no BitNet sequence classifier; this registers ours for `BitNetConfig`.
    Reward models of other architectures (Llama, Qwen, ...) load without it.
    """
    from transformers import AutoModelForSequenceClassification, BitNetConfig

    AutoModelForSequenceClassification.register(BitNetConfig, BitNetForSequenceClassification, exist_ok=True)


def classifier_class(model_type: str):
    from transformers import AutoModelForSequenceClassification

    return BitNetForSequenceClassification if model_type == "bitnet" else AutoModelForSequenceClassification


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output at every position, float32 `(B, T)` (through a DDP / FSDP2 wrapper's forward)."""
    from bitnet_rl.distributed.collective import forward_through

    return forward_through(model, _token_values, input_ids=input_ids, attention_mask=attention_mask)


def _token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row `(B,)`."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One score per sequence, read at its last real token, `(B,)`."""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def load_scalar_model(
    path: str | Path,
    *,
    quant: QuantConfig | None = None,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    head: str = "normal",
    kinds: tuple[str, ...] = ("policy", "reward_model"),
) -> nn.Module:
    """A scalar-head model with BitLinear projections.

    From a saved reward model (`*ForSequenceClassification`), or from a causal LM directory
    (SFT policy, base model): its backbone plus a fresh head (`head`: small random for reward models, zero for critics).
    """
    path = Path(path)
    raw = read_config(path)
    hint = "give OUT/final of `bitnet-rl rm`" if kinds == ("reward_model",) else "give a policy or a reward-model directory"
    require_kind(path, raw, kinds, hint)
    archs = raw.get("architectures") or []
    config = clean_config(path, raw)
    config.num_labels = 1
    quant = quant or saved_quant(raw)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        if (raw.get("quantization_config") or {}).get("quantization_mode") == "offline":
            raise UserError(f"{path}: offline-packed reward models are not supported; save it with master weights")
        check_weight_files(path)
        try:
            model = classifier_class(config.model_type).from_pretrained(path, config=config, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot load a reward model ({str(err).splitlines()[0]})") from None
        return carry_record(quantize_model(model, quant, lam), raw).to(device)
    causal = load_policy(path, quant=quant, lam=lam, dtype=dtype, device="cpu")
    try:
        cls = classifier_class(config.model_type)
        model = cls(config).to(dtype) if cls is BitNetForSequenceClassification else cls.from_config(config, dtype=dtype)
    except ValueError as err:
        raise UserError(f"{path}: {raw.get('model_type')} has no sequence-classification head ({err})") from None
    setattr(model, model.base_model_prefix, backbone(causal))
    carry_record(model, raw)
    if head == "zero":  # a critic starts at V = 0, so its first advantages are the returns themselves
        nn.init.zeros_(model.score.weight)
    else:  # a reward model needs a random head (std 1/sqrt(H+1)): a zero head passes no gradient to the backbone
        torch.manual_seed(seed)
        nn.init.normal_(model.score.weight, std=1.0 / (model.score.in_features + 1) ** 0.5)
    return model.to(device)
