"""The refinement step at fixed shapes, captured once per shape bucket as a CUDA graph.

On a GPU a small model's step is hundreds of short kernel launches, and launching them costs more
than running them. A CUDA graph replays the whole step with one launch, but it needs the same shapes
and the same memory addresses every time. So the step's inputs (tokens, positions, mask, and the
cached keys/values it reads) are copied into static buffers padded up to buckets: rows to a power
of two, width (pending + canvas tokens) to a power of two of at least 8, each key/value segment to
a multiple of 256 positions. Padding is inert: padded keys are masked out, padded query rows attend
only to themselves, and their outputs are dropped.

On a CPU, or with capture off, the same padded step runs eagerly: that is how the tests check, on
any machine, that padding changes no logit. The capture itself runs only on CUDA and has not yet
been checked on a GPU by this project (see docs/design-notes.md, "Captured step").

Knows the network's forward signature and the past-segment layout the engine passes; knows nothing
of rows, commits or the cache store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KV = tuple[Tensor, Tensor]

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_WIDTH = 8
PAST_BUCKET = 256
MAX_GRAPHS = 64  # beyond this many shapes, new shapes run eagerly (each graph holds its own buffers)


def _pow2_at_least(n: int, floor: int = 1) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclass
class _Static:
    tokens: Tensor  # (Bb, Wb)
    positions: Tensor  # (Bb, Wb)
    mask: Tensor  # (Bb, 1, Wb, sum Sb + Wb)
    past: list[list[KV]]  # per layer, per segment: (1 or Bb, Hkv, Sb_i, D)
    out: tuple[Tensor, list[KV]] | None = None
    graph: object | None = None


class CapturedStep:
    """Call it like the network's forward for a step: (tokens, positions, mask, past) -> (logits, new_kv)."""

    def __init__(self, model: torch.nn.Module, capture: bool | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.capture = (self.device.type == "cuda") if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("a CUDA graph needs the model on a CUDA device")
        self.pad_id = model.config.pad_id
        self._static: dict[tuple, _Static] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far
        self.replays = 0
        self.eager = 0  # padded steps run without a graph (CPU, capture off, or past MAX_GRAPHS)

    # ---- shapes -----------------------------------------------------------------------------------

    @staticmethod
    def bucket(B: int, T: int, segments: list[KV]) -> tuple:
        rows = next((b for b in ROW_BUCKETS if b >= B), _pow2_at_least(B))
        width = _pow2_at_least(T, MIN_WIDTH)
        segs = tuple((k.shape[0] == 1 and B > 1, _round_up(k.shape[2], PAST_BUCKET)) for k, _ in segments)
        return rows, width, segs

    def _buffers(self, key: tuple, like_past: list[list[KV]]) -> _Static:
        rows, width, segs = key
        dev = self.device
        total = sum(s for _, s in segs)
        past = []
        for layer in like_past:
            segments = []
            for (shared, s), (k, v) in zip(segs, layer):
                shape = (1 if shared else rows, k.shape[1], s, k.shape[3])
                segments.append((torch.zeros(shape, dtype=k.dtype, device=dev), torch.zeros(shape, dtype=v.dtype, device=dev)))
            past.append(segments)
        return _Static(tokens=torch.full((rows, width), self.pad_id, dtype=torch.long, device=dev),
                       positions=torch.zeros((rows, width), dtype=torch.long, device=dev),
                       mask=torch.zeros((rows, 1, width, total + width), dtype=torch.bool, device=dev), past=past)

    # ---- the step ---------------------------------------------------------------------------------

    def _fill(self, st: _Static, tokens: Tensor, positions: Tensor, mask: Tensor, past: list[list[KV]]) -> None:
        B, T = tokens.shape
        width = st.tokens.shape[1]
        st.tokens.fill_(self.pad_id)
        st.tokens[:B, :T] = tokens
        st.positions.zero_()
        st.positions[:B, :T] = positions
        st.mask.zero_()
        src = dst = 0
        for i, (k, _) in enumerate(past[0]):  # segment by segment: real keys to the front of their bucket
            n, cap = k.shape[2], st.past[0][i][0].shape[2]
            st.mask[:B, :, :T, dst: dst + n] = mask[:, :, :, src: src + n]
            src, dst = src + n, dst + cap
        st.mask[:B, :, :T, dst: dst + T] = mask[:, :, :, src: src + T]
        pad_rows = torch.arange(width, device=self.device)
        st.mask[:, 0, pad_rows, dst + pad_rows] = True  # no query row without a key: every row sees itself
        for layer, static_layer in zip(past, st.past):
            for (k, v), (sk, sv) in zip(layer, static_layer):
                n = k.shape[2]
                sk[: k.shape[0], :, :n].copy_(k)
                sv[: v.shape[0], :, :n].copy_(v)

    def _forward(self, st: _Static) -> tuple[Tensor, list[KV]]:
        return self.model(st.tokens, st.positions, st.mask, st.past, logits_from=0)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, past: list[list[KV]] | None):
        if not past:  # a step always has a context; the engine never sends none
            raise ValueError("CapturedStep needs the cached context segments")
        B, T = tokens.shape
        key = self.bucket(B, T, past[0])
        st = self._static.get(key)
        if st is None:
            st = self._buffers(key, past)
            if len(self._static) < MAX_GRAPHS:  # past that, a fresh eager buffer set per step
                self._static[key] = st
        self._fill(st, tokens.to(self.device), positions.to(self.device), mask, past)
        if self.capture and key in self._static:
            if st.graph is None:
                self._capture(st)
            st.graph.replay()
            self.replays += 1
            logits, new_kv = st.out
        else:
            logits, new_kv = self._forward(st)
            self.eager += 1
        # Copies: the static outputs are overwritten by the next replay, and the engine keeps new_kv.
        return logits[:B, :T].clone(), [(k[:B, :, :T].clone(), v[:B, :, :T].clone()) for k, v in new_kv]

    def _capture(self, st: _Static) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy tables, autotuning, allocator pools
                self._forward(st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            st.out = self._forward(st)
        st.graph = graph
        self.captures += 1

    def stats(self) -> dict:
        return {"capture": self.capture, "shapes": len(self._static), "captures": self.captures,
                "replays": self.replays, "eager": self.eager}
