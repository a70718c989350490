"""Forward passes the trainers share: per-token log-probs of a batch under a causal LM.

`chunked_head_logprobs` is the memory-lean way: it applies the LM head to `chunk_rows` hidden
states at a time and never holds the `(B, T, V)` logits (a 128k vocabulary at 64 × 256 tokens
is 8.4 GB in float32); its backward recomputes each chunk's logits from the saved hidden states.
`causal_lm_logprobs` runs a Hugging Face causal LM's backbone and that head.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.rl.losses import logprobs_from_logits

COMPILED_HEAD = "bitnet_rl_compiled_logprobs"  # attribute `compile_decoder_layers` sets on the output embedding


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T-1, float32 `(B, T-1)`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], chunk_size=chunk_size)


class _ChunkedHead(torch.autograd.Function):
    """Log-probs (and entropies) of `labels` under `softmax(h Wᵀ + b)`, chunk by chunk.

    For z = logits of one row, p = softmax(z), label y:
      log p_y = z_y − lse(z);                 ∂/∂z = onehot(y) − p
      H = lse(z) − Σ p·z;                     ∂H/∂z = −p ⊙ (z − Σ p·z)
    Backward recomputes z per chunk and returns ∂h = ∂z W and ∂W = ∂zᵀ h (float32 accumulation).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int, with_entropy: bool, compute_dtype, compiled: bool):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        stats, _ = _chunk_fns(compiled)
        for i in range(0, n, chunk_rows):
            z = F.linear(hidden[i : i + chunk_rows].to(compute_dtype), w, b)
            logps[i : i + chunk_rows], entropy[i : i + chunk_rows], lse[i : i + chunk_rows] = stats(z, labels[i : i + chunk_rows], with_entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_rows, ctx.with_entropy, ctx.compute_dtype, ctx.compiled = chunk_rows, with_entropy, compute_dtype, compiled
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        cd, step = ctx.compute_dtype, ctx.chunk_rows
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        _, grad_fn = _chunk_fns(ctx.compiled)
        with_entropy = ctx.with_entropy and grad_entropy is not None
        for i in range(0, hidden.shape[0], step):
            h = hidden[i : i + step].to(cd)
            z = F.linear(h, w, b)
            ge = grad_entropy[i : i + step] if with_entropy else None
            dz = grad_fn(z, labels[i : i + step], lse[i : i + step], grad_logps[i : i + step], ge, cd)
            if need_h:
                grad_h[i : i + step] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_w.add_((dz.T @ h).float())
            if need_b:
                grad_b.add_(dz.float().sum(0))
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None,
        )


def chunk_logprob_stats(z: torch.Tensor, labels: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log p_y, H, lse)`, float32 `(n,)` each, of logits `z (n, V)` (any float dtype) and labels `(n,)`.

    `lse = logsumexp(z)`, `log p_y = z_y − lse`, `H = lse − Σ p·z` (zeros without entropy); softmax in float32.
    """
    z = z.float()
    lse = torch.logsumexp(z, dim=-1)
    logps = z.gather(1, labels[:, None]).squeeze(1) - lse
    if not with_entropy:
        return logps, torch.zeros_like(lse), lse
    p = torch.exp(z - lse[:, None])
    return logps, lse - (p * z).sum(-1), lse


def chunk_logprob_grad(
    z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor, grad_entropy: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """∂loss/∂z `(n, V)` in `dtype` from the upstream gradients of `chunk_logprob_stats`' log-probs (and entropies).

    `g·(onehot(y) − p) − g_H·p ⊙ (z − Σ p·z)` with `p = exp(z − lse)`, in float32, cast once.
    """
    z = z.float()
    p = torch.exp(z - lse[:, None])
    g = grad_logps[:, None]
    dz = (-g * p).scatter_add(1, labels[:, None], g)
    if grad_entropy is not None:
        mean_z = (p * z).sum(-1, keepdim=True)
        dz = dz - grad_entropy[:, None] * p * (z - mean_z)
    return dz.to(dtype)


@functools.cache
def _compiled_chunk_fns():
    return torch.compile(chunk_logprob_stats, dynamic=True), torch.compile(chunk_logprob_grad, dynamic=True)


def _chunk_fns(compiled: bool):
    """The softmax math of one chunk: eager, or `torch.compile`d (a few fused passes over the bf16 logits instead of
    a dozen float32 ones; `train.compile` turns it on through `compile_decoder_layers`)."""
    return _compiled_chunk_fns() if compiled else (chunk_logprob_stats, chunk_logprob_grad)


def chunked_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int = 2048,
    with_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log softmax(h Wᵀ + b)[label]` (and the softmax entropy) without materializing all logits.

    Shapes: `hidden (..., D)`, `weight (V, D)`, `bias (V,)`, `labels (...)` → float32 `(...)` each.
    At most `chunk_rows × V` float32 logits exist at a time, forward and backward. The matmul runs
    in `compute_dtype` (default: the autocast dtype when autocast is on, else `hidden.dtype`),
    the softmax in float32: the same numbers as `logprobs_from_logits(F.linear(h, W, b), labels)`.
    `compiled` runs each chunk's softmax math through `torch.compile` (same formulas, fused).
    """
    if compute_dtype is None:
        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    lead = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    with torch.autocast(hidden.device.type, enabled=False):
        logps, entropy = _ChunkedHead.apply(flat_h, weight, bias, flat_labels, chunk_rows, with_entropy, compute_dtype, compiled)
    return logps.view(lead), (entropy.view(lead) if with_entropy else None)


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_rows: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(B, T-1)` log-probs of the next tokens (and entropies) under a Hugging Face causal LM.

    Runs the backbone (`model.base_model`) for the last hidden states, then
    `chunked_head_logprobs` with `model.get_output_embeddings()`: the same numbers as
    `token_logprobs` without the `(B, T, V)` logits. A DDP or FSDP2 model runs it as its forward.
    """
    from bitnet_rl.distributed.collective import forward_through

    return forward_through(
        model, _causal_lm_logprobs, input_ids=input_ids, attention_mask=attention_mask, with_entropy=with_entropy, chunk_rows=chunk_rows
    )


def _causal_lm_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool, chunk_rows: int):
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    compiled = getattr(head, COMPILED_HEAD, False) and hidden.is_cuda
    return chunked_head_logprobs(
        hidden[:, :-1], head.weight, input_ids[:, 1:], getattr(head, "bias", None), chunk_rows=chunk_rows, with_entropy=with_entropy, compiled=compiled
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face model, also through wrappers (peft, scalar heads)."""
    seen = model
    for _ in range(4):  # model → base_model (→ peft's model → its base_model)
        layers = getattr(seen, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
        inner = getattr(seen, "base_model", None)
        if inner is None or inner is seen:
            inner = getattr(seen, "model", None)
        if inner is None:
            break
        seen = inner
    from bitnet_rl.errors import UserError

    raise UserError(f"train.compile: found no decoder layers in {type(model).__name__}")


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile` each decoder layer of a Hugging Face model in place (regional compilation).

    The one place training code turns on compilation (recipe key `train.compile`). Layers share
    their code, so dynamo compiles one graph and reuses it for every layer; norms, RoPE,
    activations and BitLinear's quantizers (traced in torch under compile, see
    `quant.kernels.train`) fuse into few kernels, while the matmuls stay cuBLAS calls. Returns `model`.
    """
    for layer in decoder_layers(model):
        layer.compile(**compile_kwargs)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # the chunked log-prob head's softmax math too (CUDA)
        setattr(head, COMPILED_HEAD, True)
    return model
