"""The per-token bookkeeping of a generation, on static buffers (so it can live in a CUDA graph).

After each decode step the drawn tokens are written into the output rows (`origin`), lengths
and stop flags are updated, and the decode state moves on (position, fed token, live flag).
Everything reads and writes device tensors that never move, including the column `step`, so
for greedy decoding the generator captures "decode step + argmax + `advance`" as one graph
per batch bucket and the host only replays it (`PackedGenerator`); other sampling settings
run the same `advance` eagerly after the decode graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitnet_rl.rollout.forward import DecodeState


@dataclass
class Outputs:
    """Static output rows of one generation batch: rows `0 … B−1` are the prompts, row B is a
    dummy that absorbs the writes of padding rows; columns are new tokens."""

    ids: torch.Tensor  # (R, T) long
    logprobs: torch.Tensor  # (R, T) float32, under the sampling distribution
    logprobs_t1: torch.Tensor  # (R, T) float32, under the plain softmax
    lengths: torch.Tensor  # (R,) long
    stopped: torch.Tensor  # (R,) bool
    step: torch.Tensor  # () long, the column the next `advance` writes
    stop_ids: torch.Tensor  # (S,) long, padded with -1 (matches no token)

    @classmethod
    def empty(cls, rows: int, width: int, device: torch.device, stops: int = 8) -> "Outputs":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            ids=torch.zeros((rows, width), dtype=torch.long, device=device),
            logprobs=torch.zeros((rows, width), **f32),
            logprobs_t1=torch.zeros((rows, width), **f32),
            lengths=torch.zeros(rows, dtype=torch.long, device=device),
            stopped=torch.zeros(rows, dtype=torch.bool, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            stop_ids=torch.full((stops,), -1, dtype=torch.long, device=device),
        )

    def start(self, batch: int, pad: int, stops: torch.Tensor, first: tuple) -> torch.Tensor:
        """Reset rows `0 … batch` for a new call, write column 0 (`first` = the prefill's
        `(tokens, logprobs, logprobs_t1)`) and return which rows stopped at once."""
        tokens, logprobs, logprobs_t1 = first
        rows = batch + 1
        self.ids[:rows].fill_(pad)
        self.logprobs[:rows].zero_()
        self.logprobs_t1[:rows].zero_()
        self.lengths[:rows].zero_()
        self.stopped[:rows].zero_()
        self.step.fill_(1)
        self.stop_ids.fill_(-1)
        self.stop_ids[: stops.numel()] = stops
        self.ids[:batch, 0] = tokens
        if logprobs is not None:
            self.logprobs[:batch, 0], self.logprobs_t1[:batch, 0] = logprobs, logprobs_t1
        self.lengths[:batch] = 1
        hit = is_stop(tokens, self.stop_ids)
        self.stopped[:batch] = hit
        return hit


def is_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """`tokens (b,)` ∈ `stop_ids (S,)` (no host sync, unlike `torch.isin` on some paths)."""
    return (tokens[:, None] == stop_ids[None, :]).any(-1)


def advance(state: DecodeState, outs: Outputs, b: int, sampled: tuple, pad: int) -> None:
    """Record the tokens `sampled = (tokens, logprobs, logprobs_t1)` drawn for rows `0 … b−1`
    at column `outs.step` and move the decode state on by one token (graph-safe)."""
    tokens, logprobs, logprobs_t1 = sampled
    active, origin = state.active[:b], state.origin[:b]
    flat = origin * outs.ids.shape[1] + outs.step
    outs.ids.view(-1).index_copy_(0, flat, torch.where(active, tokens, pad))
    if logprobs is not None:
        outs.logprobs.view(-1).index_copy_(0, flat, torch.where(active, logprobs, 0.0))
        outs.logprobs_t1.view(-1).index_copy_(0, flat, torch.where(active, logprobs_t1, 0.0))
    outs.lengths.index_add_(0, origin, active.long())
    hit = active & is_stop(tokens, outs.stop_ids)
    outs.stopped.index_copy_(0, origin, outs.stopped.index_select(0, origin) | hit)
    state.positions[:b] += active.to(torch.int32)
    state.tokens[:b] = tokens
    state.active[:b] = active & ~hit
    outs.step += 1
