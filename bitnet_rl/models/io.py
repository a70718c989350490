"""Load BitNet policies from master weights (or convert dense causal LMs) and save checkpoints.

A checkpoint is a Hugging Face model directory whose `config.json` carries
`quantization_config = {"quant_method": "bitnet", "linear_class": "autobitlinear",
"quantization_mode": "online"}`: plain `transformers` loads it as a quantized BitNet model
(AutoBitLinear, online absmean/absmax) and computes what our BitLinear computes at λ = 1 with
per-tensor scales. Our own settings (granularity, group size, activation quantization) ride
along under `config.json`'s `bitnet_rl` key, with the directory's kind (`policy`,
`reward_model` or `critic`) and the prompt format it was trained on (`chat` or `plain`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from bitnet_rl.errors import UserError
from bitnet_rl.models.convert import quantize_model
from bitnet_rl.quant.bitlinear import BitLinear, bitlinear_modules, check_lambda
from bitnet_rl.quant.pack import unpack_hf
from bitnet_rl.recipe import QuantConfig

ONLINE_QUANT_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
OUR_KEY = "bitnet_rl"
KINDS = {"policy": "a policy (causal LM)", "reward_model": "a reward model", "critic": "a critic (value model)"}


def read_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of a model directory, with user errors for a missing dir, file or bad JSON."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: invalid JSON ({err.msg}, line {err.lineno})") from None


def clean_config(path: Path, raw: dict[str, Any]):
    """The model config without its quantization settings (we load master weights ourselves)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{path / 'config.json'}: model_type {model_type!r} is not a causal language model")
    clean = {k: v for k, v in raw.items() if k not in ("quantization_config", OUR_KEY)}
    config_class = type(AutoConfig.for_model(model_type))
    return config_class.from_dict(clean)


def model_kind(raw_config: dict[str, Any]) -> str:
    """`policy`, `reward_model` or `critic`: recorded by bitnet-rl, else read from `architectures`."""
    saved = (raw_config.get(OUR_KEY) or {}).get("kind")
    if saved in KINDS:
        return saved
    archs = raw_config.get("architectures") or []
    return "reward_model" if any(a.endswith("ForSequenceClassification") for a in archs) else "policy"


def require_kind(path: Path, raw_config: dict[str, Any], allowed: tuple[str, ...], hint: str) -> str:
    """The directory's kind, or a one-line error when it is not one of `allowed`."""
    kind = model_kind(raw_config)
    if kind not in allowed:
        raise UserError(f"{path} is {KINDS[kind]}, not {' or '.join(KINDS[a] for a in allowed)}: {hint}")
    return kind


def carry_record(model: nn.Module, raw_config: dict[str, Any]) -> nn.Module:
    """Keep what a checkpoint recorded about its training data on the loaded model, so the next save keeps it."""
    record = {k: v for k, v in (raw_config.get(OUR_KEY) or {}).items() if k == "prompt_format"}
    model.config.bitnet_rl = record
    return model


def prompt_format_of(model_or_config: Any) -> str | None:
    """`chat` or `plain` as recorded in a checkpoint (raw config dict or loaded model), None if unknown."""
    if isinstance(model_or_config, dict):
        return (model_or_config.get(OUR_KEY) or {}).get("prompt_format")
    return (getattr(model_or_config.config, "bitnet_rl", None) or {}).get("prompt_format")


def set_prompt_format(model: nn.Module, prompt_format: str) -> None:
    """Record the prompt format (`chat` / `plain`) a model is being trained on; saved with its checkpoints."""
    model.config.bitnet_rl = {**(getattr(model.config, "bitnet_rl", None) or {}), "prompt_format": prompt_format}


def check_weight_files(path: Path) -> list[Path]:
    """The directory's `*.safetensors` files, each with a readable header (truncated files fail here)."""
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: unreadable safetensors file, truncated or corrupted ({str(err).splitlines()[0]})") from None
    return files


def read_weight_files(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's `*.safetensors` files, with a one-line error for a broken file."""
    from safetensors.torch import load_file

    files = check_weight_files(path)
    if not files:
        raise UserError(f"{path}: no .safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: unreadable safetensors file, truncated or corrupted ({str(err).splitlines()[0]})") from None
    return state


def saved_quant(raw_config: dict[str, Any]) -> QuantConfig:
    """The quantization a bitnet-rl checkpoint was trained with (per-tensor int8 when it records none)."""
    saved = raw_config.get(OUR_KEY, {}).get("quant")
    return QuantConfig(**saved) if saved else QuantConfig()


def has_adapter(checkpoint: str | Path) -> bool:
    """True when `checkpoint` holds `adapter/` (written by a LoRA run with `lora.merge: false`)."""
    return (Path(checkpoint) / "adapter" / "adapter_config.json").is_file()


def load_policy(
    path: str | Path,
    *,
    quant: QuantConfig | None = None,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A causal LM whose decoder projections are BitLinear modules holding master weights.

    Accepts (a) a `BitNetForCausalLM` directory of BF16 master weights, (b) a BitNet directory
    with a bitnet `quantization_config` (online: master weights; offline: 2-bit packed codes,
    unpacked to master weights whose requantization gives back the same codes and scale), and
    (c) a dense Llama/Mistral/Qwen-style causal LM, converted to BitLinear.
    A directory with `adapter/` (a LoRA run with `lora.merge: false`) loads with the adapter merged
    in: for pre_quant adapters that is exactly the adapted ternary model.
    `quant` defaults to the settings recorded in the checkpoint, else per-tensor int8.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    raw = read_config(path)
    require_kind(path, raw, ("policy",), "give a policy directory (a base model or OUT/final of sft, dpo or ppo)")
    lam = check_lambda(lam)
    config = clean_config(path, raw)
    check_weight_files(path)
    quant = quant or saved_quant(raw)
    qcfg = raw.get("quantization_config") or {}
    if qcfg and qcfg.get("quant_method") != "bitnet":
        raise UserError(f"{path / 'config.json'}: quantization method {qcfg.get('quant_method')!r} is not supported (only bitnet)")

    if qcfg.get("quantization_mode") == "offline":
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _load_offline_packed(model, path, linear_class=qcfg.get("linear_class", "bitlinear"))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        except (OSError, SafetensorError) as err:
            raise UserError(f"{path}: cannot load weights ({str(err).splitlines()[0]})") from None
    carry_record(model, raw)
    quantize_model(model, quant, lam)
    if not bitlinear_modules(model):
        raise UserError(f"{path}: no q/k/v/o/gate/up/down projections found to quantize in {type(model).__name__}")
    if has_adapter(path):  # written by lora.merge: false: the model is base + adapter
        from bitnet_rl.lora.merge import merge_saved_adapter

        model = merge_saved_adapter(model, path)
    return model.to(device)


def _load_offline_packed(model: nn.Module, path: Path, linear_class: str) -> None:
    """Read transformers' offline bitnet format: uint8 packed codes plus `weight_scale` per layer.

    `BitLinear` (offline) divides its output by `weight_scale`; `AutoBitLinear` (offline) multiplies.
    The dequantized weight is `codes · a`; we store master weights `codes · a / p` (p = share of
    nonzero codes) so that absmean requantization returns exactly `codes` and scale `a`.
    """
    tensors = read_weight_files(path)
    params = dict(model.named_parameters())
    state = {}
    for key, value in tensors.items():
        if key.endswith(".weight_scale"):
            continue
        scale_key = key[: -len("weight")] + "weight_scale"
        if value.dtype == torch.uint8 and scale_key in tensors:
            out_features = params[key].shape[0]
            codes = unpack_hf(value, out_features, dtype=torch.float32)
            scale = tensors[scale_key].float()
            dequant_factor = 1.0 / scale if linear_class == "bitlinear" else scale
            nonzero = (codes != 0).float().mean().clamp(min=1e-12)
            value = codes * dequant_factor / nonzero
        state[key] = value
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quant_config_from_model(model: nn.Module) -> QuantConfig:
    modules = bitlinear_modules(model)
    if not modules:
        return QuantConfig()
    first: BitLinear = modules[0][1]
    return QuantConfig(
        granularity=first.granularity,
        group_size=first.group_size,
        activations="int8" if first.quantize_activations else "none",
    )


def atomic_dir(out_dir: str | Path) -> tuple[Path, Path]:
    """(temporary sibling directory to write into, final path). Call `commit_dir` when done."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp, out_dir


def commit_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a fully written `tmp` into place; an existing `out_dir` is replaced, never half-written."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_checkpoint(
    model: nn.Module, tokenizer, out_dir: str | Path, extra: dict[str, Any] | None = None, kind: str | None = None, state_dict: dict[str, Any] | None = None
) -> Path:
    """Write a Hugging Face directory (safetensors, config, tokenizer, generation config) atomically.

    `extra` maps relative file names to callables `fn(path)` that write more files into the
    temporary directory before it is moved into place (e.g. `trainer_state/`). `kind` (policy,
    reward_model, critic; default from the model class) is recorded in `config.json`. `state_dict`
    replaces the model's own (the full weights gathered from an FSDP2-sharded model). A full
    disk or a read-only directory is a one-line `UserError` naming the directory.
    """
    tmp, final = atomic_dir(out_dir)
    kind = kind or ("reward_model" if type(model).__name__.endswith("ForSequenceClassification") else "policy")
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        quant = quant_config_from_model(model)
        ours = {**(config.get(OUR_KEY) or {}), **(getattr(model.config, OUR_KEY, None) or {}), "kind": kind}
        if bitlinear_modules(model):
            config["quantization_config"] = dict(ONLINE_QUANT_CONFIG)
            ours["quant"] = quant.layer_settings()
            if quant.granularity != "per_tensor" or quant.activations != "int8":
                warnings.warn(
                    f"{final}: plain transformers applies per-tensor scales and int8 activations; this model was trained "
                    f"with {quant.granularity}/{quant.activations}, so only bitnet-rl reproduces its exact function",
                    stacklevel=2,
                )
        config[OUR_KEY] = ours
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, write in (extra or {}).items():
            write(tmp / name)
    except BaseException as err:
        full = disk_full(err, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise UserError(f"disk full: no space left on device in {final.parent} while writing {final.name} (free space, then --resume latest)") from None
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"cannot write {final}: {err.strerror}") from None
        raise
    return commit_dir(tmp, final)


def disk_full(err: BaseException, directory: Path, low_bytes: int = 64 * 2**20) -> bool:
    """Whether `err` means the disk is full: ENOSPC/EDQUOT anywhere in its chain, or an OSError /
    RuntimeError while under `low_bytes` are free (torch's zip writer reports a full disk as
    `inline_container.cc` "unexpected pos" or "file write failed", without an errno)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, (OSError, RuntimeError)):  # e.g. "[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3476"
        try:
            return shutil.disk_usage(directory).free < low_bytes
        except OSError:
            return False
    return False
