"""Forward passes the trainers share: per-token log-probs of a batch under a causal LM.

`chunked_head_logprobs` is the memory-lean way: it applies the LM head to `chunk_rows` hidden
states at a time and never holds the `(B, T, V)` logits (a 128k vocabulary at 64 × 256 tokens
is 8.4 GB in float32); its backward recomputes each chunk's logits from the saved hidden states.
`causal_lm_logprobs` runs a Hugging Face causal LM's backbone and that head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_rl.rl.losses import logprobs_from_logits


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T-1, float32 `(B, T-1)`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], chunk_size=chunk_size)


class _ChunkedHead(torch.autograd.Function):
    """Log-probs (and entropies) of `labels` under `softmax(h Wᵀ + b)`, chunk by chunk.

    For z = logits of one row, p = softmax(z), label y:
      log p_y = z_y − lse(z);                 ∂/∂z = onehot(y) − p
      H = lse(z) − Σ p·z;                     ∂H/∂z = −p ⊙ (z − Σ p·z)
    Backward recomputes z per chunk and returns ∂h = ∂z W and ∂W = ∂zᵀ h (float32 accumulation).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int, with_entropy: bool, compute_dtype):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk_rows):
            z = F.linear(hidden[i : i + chunk_rows].to(compute_dtype), w, b).float()
            lse[i : i + chunk_rows] = torch.logsumexp(z, dim=-1)
            logps[i : i + chunk_rows] = z.gather(1, labels[i : i + chunk_rows, None]).squeeze(1) - lse[i : i + chunk_rows]
            if with_entropy:
                p = torch.exp(z - lse[i : i + chunk_rows, None])
                entropy[i : i + chunk_rows] = lse[i : i + chunk_rows] - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_rows, ctx.with_entropy, ctx.compute_dtype = chunk_rows, with_entropy, compute_dtype
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
        for i in range(0, hidden.shape[0], step):
            h = hidden[i : i + step].to(cd)
            z = F.linear(h, w, b).float()
            p = torch.exp(z - lse[i : i + step, None])
            g = grad_logps[i : i + step, None]
            dz = -g * p
            dz.scatter_add_(1, labels[i : i + step, None], g)
            if ctx.with_entropy and grad_entropy is not None:
                mean_z = (p * z).sum(-1, keepdim=True)
                dz -= grad_entropy[i : i + step, None] * p * (z - mean_z)
            dz = dz.to(cd)
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
            None, None, None, None,
        )


def chunked_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int = 2048,
    with_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log softmax(h Wᵀ + b)[label]` (and the softmax entropy) without materializing all logits.

    Shapes: `hidden (..., D)`, `weight (V, D)`, `bias (V,)`, `labels (...)` → float32 `(...)` each.
    At most `chunk_rows × V` float32 logits exist at a time, forward and backward. The matmul runs
    in `compute_dtype` (default: the autocast dtype when autocast is on, else `hidden.dtype`),
    the softmax in float32: the same numbers as `logprobs_from_logits(F.linear(h, W, b), labels)`.
    """
    if compute_dtype is None:
        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    lead = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    with torch.autocast(hidden.device.type, enabled=False):
        logps, entropy = _ChunkedHead.apply(flat_h, weight, bias, flat_labels, chunk_rows, with_entropy, compute_dtype)
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
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return chunked_head_logprobs(
        hidden[:, :-1], head.weight, input_ids[:, 1:], getattr(head, "bias", None), chunk_rows=chunk_rows, with_entropy=with_entropy
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
    return model
