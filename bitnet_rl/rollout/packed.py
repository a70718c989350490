"""PackedGenerator: rollouts from 2-bit packed weights and int8 activations.

The generator owns its own copy of the policy in inference form: every projection packed to
2 bits (fused q|k|v and gate|up), embeddings, norms and `lm_head` in bf16 (float32 on CPU), a
static KV cache of `max_batch_size × max_seq_len`, and preallocated decode buffers.
`sync_from(policy)` re-packs the training policy into those same tensors (no reallocation, so
captured CUDA graphs stay valid).

It always samples from the fully quantized model (ternary weights, int8 activations): at
λ < 1 the training policy computes a blend of full-precision and quantized weights, which this
generator does not reproduce. Use `PolicyGenerator` (backend "policy") when rollouts must come
from the λ-blended policy itself, e.g. during λ warm-up.

Prompts keep their own lengths: prefill runs right-padded (every token at its true position),
and each decode row carries its own position and cache slot, so a ragged batch produces the
same tokens as one prompt at a time. Decode runs in batch buckets (1, 2, 4, …): when enough rows
have finished, the live rows are moved to the front and the next smaller bucket runs, so
finished rows stop costing compute. On CUDA each bucket's decode step is one CUDA graph
(`rollout/capture.py`), built from Triton kernels (`quant/kernels`); for greedy decoding the
graph also holds the argmax and the per-token bookkeeping (`rollout/loop.py`), so the host only
replays it. Elsewhere the same code runs eagerly on torch reference ops.

Layout: `arch.py` (which policies qualify), `weights.py` (packing and sync), `forward.py` (the
packed forward pass), `tuning.py` (kernel tiles, attention tiles, graph capture) and this file
(the generation loop).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from bitnet_rl.errors import UserError
from bitnet_rl.quant.kernels.backend import use_triton
from bitnet_rl.rollout import forward
from bitnet_rl.rollout.arch import Arch, inspect_policy
from bitnet_rl.rollout.forward import DecodeState, Work
from bitnet_rl.rollout.loop import Outputs, advance
from bitnet_rl.rollout.output import RolloutOutput, concat_rollouts
from bitnet_rl.rollout.sampling import checked_request, prompt_lists, sample_tokens
from bitnet_rl.rollout.tuning import Tuner
from bitnet_rl.rollout.weights import PackedModel


class PackedGenerator:
    """Batched sampling from a 2-bit packed copy of a BitNet/Llama-style BitLinear policy.

    Build with `from_model`; refresh after optimizer steps with `sync_from`. See the module
    docstring for what is computed (always the fully quantized model, also at λ < 1).
    """

    def __init__(
        self,
        arch: Arch,
        *,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool,
        autotune: bool,
        prefill_tokens: int,
        pdl: bool = True,
    ) -> None:
        self.arch = arch
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = device
        self.dtype = dtype
        self.use_triton = use_triton(torch.empty(0, device=device))
        self.cuda_graphs = cuda_graphs and self.use_triton
        self.tuner = Tuner(autotune=autotune and self.use_triton, pdl=pdl)
        self.prefill_tokens = prefill_tokens
        self.poll_every = 8 if device.type == "cuda" else 1
        self.outs: Outputs | None = None  # static output rows (`rollout/loop.py`), allocated on first use
        self.greedy_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    # ---------------------------------------------------------------- building and syncing
    @classmethod
    def from_model(
        cls,
        policy: nn.Module,
        max_batch_size: int = 64,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        autotune: bool = True,
        prefill_tokens: int = 16384,
        pdl: bool = True,
    ) -> "PackedGenerator":
        """Allocate every buffer for `policy`'s shapes and pack its current weights.

        `device` defaults to the policy's; `dtype` (embeddings, norms, lm_head, KV cache) to
        bf16 on CUDA and float32 elsewhere. `prefill_tokens` bounds the rows of one prefill pass.
        `pdl`: the Triton kernels launch with programmatic dependent launch where the GPU supports
        it (Hopper and newer; same tokens, batch-1 decode 1.07x on an H200); `False` turns it off.
        """
        arch = inspect_policy(policy)
        device = torch.device(device) if device is not None else next(policy.parameters()).device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.bfloat16, torch.float32):
            raise UserError(f"rollout dtype must be bfloat16 or float32, got {dtype}")
        gen = cls(
            arch, max_batch_size=max_batch_size, max_seq_len=max_seq_len, device=device, dtype=dtype,
            cuda_graphs=cuda_graphs, autotune=autotune, prefill_tokens=prefill_tokens, pdl=pdl,
        )
        gen.model = PackedModel(arch, policy, device=device, dtype=dtype, max_seq_len=max_seq_len)
        cache_shape = (arch.n_layers, max_batch_size, arch.n_kv_heads, max_seq_len, arch.head_dim)
        gen.k_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        gen.v_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        gen.state = DecodeState.empty(max_batch_size, arch, dtype, device)
        gen.work = Work.empty(max_batch_size, arch, dtype, device)
        gen.sync_from(policy)
        return gen

    def sync_from(self, policy: nn.Module) -> None:
        """Re-pack `policy`'s current weights into this generator's buffers, in place.

        No buffer is reallocated (their `data_ptr`s stay), so captured graphs remain valid.
        """
        self.model.sync_from(policy)

    def buffers(self) -> list[torch.Tensor]:
        """Every weight buffer `sync_from` writes (for checking that none moved)."""
        return self.model.buffers()

    def weight_bytes(self) -> dict[str, int]:
        """Bytes read per decode step: packed projections (codes + scales) and the lm_head."""
        return self.model.weight_bytes()

    # ---------------------------------------------------------------- forward passes
    def _decode_step(self, b: int) -> None:
        forward.decode_step(
            self.model, self.state, self.work, self.k_cache, self.v_cache, b,
            kernels=self.tuner.kernels, attention_tile=self.tuner.attention_tile(b),
        )

    def _prefill(self, ids: torch.Tensor, slot_offset: int = 0, last: torch.Tensor | None = None) -> torch.Tensor:
        return forward.prefill(
            self.model, ids, self.k_cache, self.v_cache, slot_offset=slot_offset, last=last,
            prefill_tokens=self.prefill_tokens, tuner=self.tuner,
        )

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Float32 logits `(B, P, V)` of a full forward pass (for tests); ragged lists are right-padded."""
        prompts = prompt_lists(input_ids)
        ids = self._padded(prompts)
        outs = [self._prefill(ids[i : i + self.max_batch_size]) for i in range(0, len(prompts), self.max_batch_size)]
        return torch.cat(outs)

    @torch.inference_mode()
    def token_logprobs(self, input_ids: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
        """Log-probs `(B, L-1)` float32 of `input_ids[:, 1:]` under the packed model (prefill path).

        `input_ids (B, L)` right-padded (every real token at its true position; values after a
        row's end are don't-cares), any number of rows. The LM head runs `chunk_rows` positions
        at a time, so no `(B, L, V)` logits exist, and the KV cache is left alone. This is the
        fully quantized model (λ = 1), the one rollouts sample from.
        """
        ids = input_ids.to(self.device)
        if ids.shape[1] > self.max_seq_len:
            raise UserError(f"token_logprobs: sequences of {ids.shape[1]} tokens exceed max_seq_len={self.max_seq_len}")
        return forward.prefill_logprobs(self.model, ids, prefill_tokens=self.prefill_tokens, tuner=self.tuner, chunk_rows=chunk_rows)

    # ---------------------------------------------------------------- CUDA graphs
    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Tune and capture the decode graphs of `buckets` (default: all) ahead of time (the greedy
        graphs, which add the argmax and bookkeeping, are captured on their first use)."""
        for b in buckets or self.buckets():
            self._graph(b)

    def reset_graphs(self) -> None:
        """Drop every captured decode graph (the next step captures again, with the kernels' current
        settings, e.g. `tuner.kernels.pdl`); tiles stay tuned."""
        self.greedy_graphs.clear()
        self.tuner.reset_graphs()

    def _graph(self, b: int) -> torch.cuda.CUDAGraph:
        return self.tuner.graph(b, b, self.model, self.max_seq_len, lambda: self._decode_step(b))

    def _step(self, b: int) -> None:
        if self.cuda_graphs:
            self._graph(b).replay()
        else:
            self.tuner.prepare(self.model, b)
            self._decode_step(b)

    def buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.max_batch_size:
            sizes.append(b)
            b *= 2
        return sizes + [self.max_batch_size]

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets() if b >= n)

    # ---------------------------------------------------------------- generation
    def _padded(self, prompts: list[list[int]]) -> torch.Tensor:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        length = max(len(p) for p in prompts)
        if length > self.max_seq_len:
            raise UserError(f"generate: a prompt has {length} tokens, more than max_seq_len={self.max_seq_len}")
        ids = torch.full((len(prompts), length), self.arch.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        return ids.to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        return_logprobs: bool = True,
    ) -> RolloutOutput:
        """Sample up to `max_new_tokens` per prompt (ragged prompts allowed, no left padding).

        `temperature == 0` is greedy. `stop_token_ids` (default: the policy's eos ids) end a
        row with finish reason "stop"; the stop token is part of the completion. A `seed`
        makes sampling reproducible (a private torch.Generator; the global RNG is untouched).
        """
        prompts = checked_request(input_ids, max_new_tokens, temperature, top_k, top_p)
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > self.max_seq_len:
            raise UserError(
                f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.max_seq_len}"
            )
        stops = self.arch.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, with_logprobs=return_logprobs)
        parts = [
            self._generate_batch(prompts[i : i + self.max_batch_size], max_new_tokens, stop_ids, sampling)
            for i in range(0, len(prompts), self.max_batch_size)
        ]
        return concat_rollouts(parts)

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: torch.Tensor, sampling: dict) -> RolloutOutput:
        pad, dev = self.arch.pad_token_id, self.device
        batch = len(prompts)
        ids = self._padded(prompts)
        lengths_in = torch.tensor([len(p) for p in prompts], device=dev)
        first = sample_tokens(self._prefill(ids, last=lengths_in - 1), **sampling)
        outs = self._outputs(stop_ids.numel())
        hit = outs.start(batch, pad, stop_ids, first)

        s, b = self.state, self._bucket(batch)
        s.tokens[:b].fill_(pad)
        s.tokens[:batch] = first[0]
        s.positions[:b].zero_()
        s.positions[:batch] = lengths_in.to(torch.int32)
        s.slots[:b] = torch.arange(b, dtype=torch.int32, device=dev)
        s.origin[:b].fill_(batch)
        s.origin[:batch] = torch.arange(batch, device=dev)
        s.active[:b].zero_()
        s.active[:batch] = ~hit

        # Greedy on CUDA graphs: argmax and bookkeeping are captured with the decode step.
        in_graph = self.cuda_graphs and sampling["temperature"] == 0
        count = _ActiveCount(dev)
        for t in range(1, max_new_tokens):
            if (t - 1) % self.poll_every == 0:
                n = count.read(s.active[:b])
                if n == 0:
                    break
                if n is not None and self._bucket(n) < b:
                    self._compact(b)
                    b = self._bucket(n)
                count.start(s.active[:b])
            if in_graph:
                self._greedy_graph(b, sampling["with_logprobs"]).replay()
                continue
            self._step(b)
            advance(s, outs, b, sample_tokens(s.logits[:b], **sampling), pad)

        lengths, stopped = outs.lengths[:batch].clone(), outs.stopped[:batch]
        width = int(lengths.max())
        return RolloutOutput(
            prompt_ids=ids,
            prompt_lengths=lengths_in,
            completion_ids=outs.ids[:batch, :width].clone(),
            logprobs=outs.logprobs[:batch, :width].clone(),
            logprobs_t1=outs.logprobs_t1[:batch, :width].clone(),
            lengths=lengths,
            finish_reasons=["stop" if x else "length" for x in stopped.tolist()],
            pad_token_id=pad,
        )

    def _outputs(self, stops: int) -> Outputs:
        """The static output rows (reallocated, and greedy graphs dropped, only for more stop ids)."""
        if self.outs is None or self.outs.stop_ids.numel() < stops:
            self.outs = Outputs.empty(self.max_batch_size + 1, self.max_seq_len, self.device, stops=max(8, stops))
            for key in self.greedy_graphs:  # they read the old buffers
                self.tuner.graphs.pop(key, None)
            self.greedy_graphs.clear()
        return self.outs

    def _greedy_graph(self, b: int, with_logprobs: bool) -> torch.cuda.CUDAGraph:
        """Decode step + argmax + `advance` of bucket `b` as one CUDA graph (captured on first use).

        Warm-up runs of the step move the state on, so the state and outputs are saved before
        capturing and put back after (the k/v written meanwhile lie beyond every row's position,
        where the real steps overwrite them before any row reads them)."""
        key = (b, with_logprobs)
        graph = self.greedy_graphs.get(key)
        if graph is None:
            s, outs, pad = self.state, self.outs, self.arch.pad_token_id

            def step() -> None:
                self._decode_step(b)
                advance(s, outs, b, sample_tokens(s.logits[:b], 0.0, with_logprobs=with_logprobs), pad)

            kept = (s.tokens, s.positions, s.active, outs.ids, outs.logprobs, outs.logprobs_t1, outs.lengths, outs.stopped, outs.step)
            saved = [t.clone() for t in kept]
            graph = self.tuner.graph(key, b, self.model, self.max_seq_len, step)
            for t, v in zip(kept, saved):
                t.copy_(v)
            self.greedy_graphs[key] = graph
        return graph

    def _compact(self, b: int) -> None:
        """Move the live rows of bucket `b` to the front (their slots move with them)."""
        s = self.state
        order = torch.argsort((~s.active[:b]).to(torch.int8), stable=True)
        for buf in (s.tokens, s.positions, s.slots, s.origin, s.active):
            buf[:b] = buf[:b][order]


class _ActiveCount:
    """Number of live rows, read one poll late so the GPU queue never drains (CPU: at once)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: torch.cuda.Event | None = None
        self.host = torch.zeros((), dtype=torch.long, pin_memory=device.type == "cuda")

    def start(self, active: torch.Tensor) -> None:
        if self.device.type != "cuda":
            return
        self.host.copy_(active.sum(), non_blocking=True)
        self.pending = torch.cuda.Event()
        self.pending.record()

    def read(self, active: torch.Tensor) -> int | None:
        if self.device.type != "cuda":
            return int(active.sum())
        if self.pending is None:
            return None
        self.pending.synchronize()
        return int(self.host)
