"""The engine: a resident model, its context caches, and batched refinement steps.

`Engine.start` turns a context (token ids, built by model/layout.py) into an `InfillJob`: it
reuses or computes the context's cached keys/values and lays out one canvas row per candidate
length. `Engine.step(jobs)` runs ONE forward pass over every live row of every job given
(several candidate lengths, several requests, several editors) and applies the sampler's commit
rule to each row, in named steps: assemble -> forward -> constrain -> extend the row caches ->
commit. A job can be cancelled between any two steps. `run_to_end` is the one run loop.

Each row attends to [its context (shared, cached)] [its committed blocks (cached per row)]
[its pending block + current canvas]; masks come from `layout.step_mask`.

Token ids in, token ids out: the engine knows nothing of text, tokenizers, files or LSP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..kernels import select_commit as select_commit_module
from . import layout
from . import tokens as T
from .cache import DEFAULT_BUDGET_BYTES, ContextCacheStore, ContextKV
from .config import SamplerConfig
from .network import token_logits
from .sampler import Row

KV = tuple[Tensor, Tensor]
PREFILL_CHUNK = 512  # context tokens per prefill pass: bounds the (chunk x context) mask's memory


@dataclass
class StepBatch:
    """One step's live rows laid out as a batch: what the named steps of `Engine.step` share."""

    live: list[tuple["InfillJob", int]]  # (job, row index) per batch row
    rows: list[Row]
    n_pending: list[int]  # per batch row: tokens of its pending block (committed last step, not cached yet)
    n_canvas: list[int]
    tokens: Tensor
    positions: Tensor
    past: list[list[KV]]
    mask: Tensor


class EngineError(ValueError):
    """A request the engine cannot serve as asked (too long, too many holes, ...)."""


@dataclass
class TokenResult:
    middles: list[list[int]]  # per hole in document order
    nfe: int  # refinement forward passes this job took part in (context prefill not included)
    steps: int
    score: float
    canvas_length: int  # first-block length of the winning row
    ms: float
    prefill_tokens: int  # context tokens computed (not reused from the cache)
    candidates: list[list[list[int]]]  # every row's middles, best first (callers may re-rank, e.g. by parse)


@dataclass
class InfillJob:
    rows: list[Row]
    entry: ContextKV
    context_length: int
    options: SamplerConfig
    generator: torch.Generator | None
    canvas_lengths: list[int]
    prefill_tokens: int = 0
    nfe: int = 0
    steps: int = 0
    cancelled: bool = False
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    row_cache: list[list[KV] | None] = field(default_factory=list)  # per row, per layer: committed blocks

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self._release()

    def ranked_rows(self) -> list[int]:
        """Rows best first: a non-empty middle before an empty one, then by mean log-confidence.

        A canvas that is all pad is the easiest thing to be confident about (every tail slot of
        every training canvas is pad), so pure confidence would too often pick "nothing".
        """
        def key(i: int) -> tuple[bool, float]:
            row = self.rows[i]
            return any(row.middles()), row.score
        return sorted(range(len(self.rows)), key=key, reverse=True)

    def best_row(self) -> int:
        return self.ranked_rows()[0]

    def preview(self) -> list[list[int]]:
        """The leading row's tokens so far (MASK where undecided), per hole."""
        return self.rows[self.best_row()].preview()

    def result(self) -> TokenResult:
        ranked = self.ranked_rows()
        best, row = ranked[0], self.rows[ranked[0]]
        end = self.ended if self.ended is not None else time.perf_counter()
        return TokenResult(row.middles(), self.nfe, self.steps, row.score, self.canvas_lengths[best],
                           (end - self.started) * 1000.0, self.prefill_tokens,
                           [self.rows[i].middles() for i in ranked])

    def _finish_if_done(self) -> None:
        if not self.done and all(r.done for r in self.rows):
            self.finished = True
            self._release()

    def _release(self) -> None:
        self.ended = time.perf_counter()
        self.entry.pins -= 1


class Engine:
    def __init__(self, model: torch.nn.Module, cache_budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 max_context_tokens: int | None = None, captured_step: bool = False):
        self.model = model
        # The step at bucketed fixed shapes, replayed as a CUDA graph on a GPU (model/captured.py);
        # off by default until it has been timed and checked on a GPU.
        self.captured = None
        if captured_step:
            from .captured import CapturedStep

            self.captured = CapturedStep(model)
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache = ContextCacheStore(cache_budget_bytes)
        # A canvas slot may become any text token or <|pad|>, never a mask or a layout marker.
        banned = [i for i in self.config.special_ids.values() if i != self.config.pad_id] \
            if self.config.layout == "dlm" else [self.config.mask_id]
        self.banned_ids = torch.tensor(sorted(banned), dtype=torch.long, device=self.device)
        limit = self.config.max_position - 2 * 256  # leave room for the canvas and committed blocks
        self.max_context_tokens = min(max_context_tokens or limit, limit)

    # ---- context ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, key: str | None, context: list[int], pin: bool = False) -> tuple[ContextKV, int]:
        """Make the cache entry for `key` hold `context`; returns it and how many tokens were computed.

        `pin` marks the entry as read by a job before the store evicts to its budget, so the
        entry a job is about to use is never the one evicted.
        """
        if len(context) > self.max_context_tokens:
            raise EngineError(f"context of {len(context)} tokens exceeds the limit of {self.max_context_tokens}")
        entry, reused = self.cache.claim(key, context)
        for start in range(reused, len(context), PREFILL_CHUNK):
            chunk = context[start : start + PREFILL_CHUNK]
            n = len(chunk)
            tokens = torch.tensor([chunk], device=self.device)
            positions = torch.arange(start, start + n, device=self.device)[None]
            past_valid = torch.ones(1, start, dtype=torch.bool, device=self.device)
            mask = layout.step_mask(past_valid, torch.tensor([n], device=self.device),
                                    torch.tensor([0], device=self.device), n)
            past = [[seg] for seg in entry.segments(start)] if start else None
            _, new_kv = self.model(tokens, positions, mask, past, logits_from=n)
            entry.append(chunk, new_kv)
        entry.pins += int(pin)
        self.cache.evict()
        return entry, len(context) - reused

    # ---- jobs -------------------------------------------------------------------------------------

    def start(self, context: list[int], options: SamplerConfig, cache_key: str | None = None,
              hole_lengths: list[int] | None = None, stop_ids: frozenset[int] = frozenset()) -> InfillJob:
        """A job for one context. One hole: a row per candidate length. k holes: one row, `hole_lengths`."""
        options = options.validated()
        entry, computed = self.prefill(cache_key, context, pin=True)
        if hole_lengths is not None and len(hole_lengths) > 1:
            region, starts = layout.canvas_region(hole_lengths)
            rows = [Row(region, list(zip(starts, hole_lengths)), options.block_size, sum(hole_lengths),
                        options.max_steps)]
            lengths = [max(hole_lengths)]
        elif options.strategy == "ar":
            ar = options.replace(block_size=1, max_steps=1)
            rows = [Row.single(1, ar, stop_ids)]
            lengths = [1]
        else:
            lengths = sorted({min(n, options.max_tokens) for n in options.canvas_lengths})
            rows = [Row.single(n, options, stop_ids) for n in lengths]
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        job = InfillJob(rows, entry, len(context), options, generator, lengths, prefill_tokens=computed)
        job.row_cache = [None] * len(rows)
        return job

    @torch.inference_mode()
    def step(self, jobs: list[InfillJob]) -> None:
        """One forward pass over all live rows of `jobs`, then each row's commits."""
        live = [(job, i) for job in jobs if not job.done for i, row in enumerate(job.rows) if not row.done]
        if not live:
            return
        batch = self._assemble(live)
        logits, new_kv = self._forward(batch)
        self._constrain(batch, logits)
        self._extend_row_caches(batch, new_kv)
        self._commit(batch, logits)

    def _assemble(self, live: list[tuple[InfillJob, int]]) -> "StepBatch":
        """Every live row's pending block + canvas as one padded batch, its positions, past and mask."""
        rows = [job.rows[i] for job, i in live]
        n_pending = [len(r.pending) for r in rows]
        n_canvas = [len(r.region) for r in rows]
        ext_len = [_cached_length(job.row_cache[i]) for job, i in live]
        width = max(p + c for p, c in zip(n_pending, n_canvas))
        B, dev = len(rows), self.device
        tokens = torch.full((B, width), T.PAD_ID, dtype=torch.long)
        positions = torch.zeros((B, width), dtype=torch.long)
        for b, ((job, _), row) in enumerate(zip(live, rows)):
            seq = row.pending + row.region
            base = job.context_length + ext_len[b]
            tokens[b, : len(seq)] = torch.tensor(seq)
            positions[b, : len(seq)] = torch.arange(base, base + len(seq))
        past, past_valid = self._batched_past(live, ext_len)
        mask = layout.step_mask(past_valid, torch.tensor(n_pending, device=dev), torch.tensor(n_canvas, device=dev),
                                width)
        return StepBatch(live, rows, n_pending, n_canvas, tokens, positions, past, mask)

    def _forward(self, batch: "StepBatch") -> tuple[Tensor, list[KV]]:
        """The network over the batch; logits aligned so that position i predicts token i."""
        if self.captured is not None:
            logits, new_kv = self.captured(batch.tokens, batch.positions, batch.mask, batch.past)
        else:
            logits, new_kv = self.model(batch.tokens.to(self.device), batch.positions.to(self.device), batch.mask,
                                        batch.past, logits_from=0)
        return token_logits(logits, self.config), new_kv

    def _constrain(self, batch: "StepBatch", logits: Tensor) -> None:
        """What a slot may become: never a layout id; not pad before a row has `min_tokens` of its middle."""
        logits.index_fill_(-1, self.banned_ids, float("-inf"))
        no_pad = torch.zeros(logits.shape[:2], dtype=torch.bool)
        for b, ((job, _), row) in enumerate(zip(batch.live, batch.rows)):
            need = job.options.min_tokens - len(row.committed)
            if need <= 0:
                continue
            for start, length in row.spans:
                first = batch.n_pending[b] + start
                no_pad[b, first: first + min(length, need)] = True
        logits[..., self.config.pad_id].masked_fill_(no_pad.to(logits.device), float("-inf"))

    def _extend_row_caches(self, batch: "StepBatch", new_kv: list[KV]) -> None:
        """A row's pending block (committed last step) joins its cached keys/values."""
        for b, (job, i) in enumerate(batch.live):
            n = batch.n_pending[b]
            if n:
                fresh = [(k[b: b + 1, :, :n], v[b: b + 1, :, :n]) for k, v in new_kv]
                old = job.row_cache[i]
                job.row_cache[i] = fresh if old is None else [
                    (torch.cat([ok, nk], dim=2), torch.cat([ov, nv], dim=2)) for (ok, ov), (nk, nv) in zip(old, fresh)]
                batch.rows[b].pending = []

    def _commit(self, batch: "StepBatch", logits: Tensor) -> None:
        """Per job, one selection over its rows' slots (kernels/select_commit), then each row's commit rule."""
        for job in {id(j): j for j, _ in batch.live}.values():
            members = [b for b, (j, _) in enumerate(batch.live) if j is job]
            slot_logits = torch.cat([logits[b, batch.n_pending[b]: batch.n_pending[b] + batch.n_canvas[b]]
                                     for b in members])
            token, conf, above = select_commit_module.select_commit(
                slot_logits, job.options.threshold, job.options.temperature, job.generator)
            token, conf, above = token.tolist(), conf.float().tolist(), above.tolist()
            offset = 0
            for b in members:
                n = batch.n_canvas[b]
                batch.rows[b].commit(token[offset: offset + n], conf[offset: offset + n], above[offset: offset + n])
                offset += n
            job.nfe += 1
            job.steps += 1
            job._finish_if_done()

    def _batched_past(self, live: list[tuple[InfillJob, int]], ext_len: list[int]) -> tuple[list[list[KV]], Tensor]:
        """Per layer, the key/value segments each row may attend to, and which keys are valid per row."""
        B, dev = len(live), self.device
        entries = {(id(job.entry), job.context_length) for job, _ in live}
        n_layers = self.config.n_layers
        if len(entries) == 1:  # one context (the common case): broadcast it, copy nothing
            job0 = live[0][0]
            ctx = job0.entry.segments(job0.context_length)
            ctx_valid = torch.ones(B, job0.context_length, dtype=torch.bool, device=dev)
        else:  # several requests in one batch: stack their contexts, padded to the longest
            L = max(job.context_length for job, _ in live)
            ctx_valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
            ctx = []
            views = [job.entry.segments(job.context_length) for job, _ in live]  # per row, per layer
            for layer in range(n_layers):
                k0, v0 = views[0][layer]
                ks = k0.new_zeros((B, k0.shape[1], L, k0.shape[3]))
                vs = v0.new_zeros((B, v0.shape[1], L, v0.shape[3]))
                for b, (job, _) in enumerate(live):
                    k, v = views[b][layer]
                    ks[b, :, : job.context_length], vs[b, :, : job.context_length] = k[0], v[0]
                ctx.append((ks, vs))
            for b, (job, _) in enumerate(live):
                ctx_valid[b, : job.context_length] = True
        E = max(ext_len)
        if E == 0:
            return [[seg] for seg in ctx], ctx_valid
        ext_valid = torch.zeros(B, E, dtype=torch.bool, device=dev)
        past = []
        for layer in range(n_layers):
            k0, v0 = ctx[layer]
            ks = k0.new_zeros((B, k0.shape[1], E, k0.shape[3]))
            vs = v0.new_zeros((B, v0.shape[1], E, v0.shape[3]))
            for b, (job, i) in enumerate(live):
                if ext_len[b]:
                    k, v = job.row_cache[i][layer]
                    ks[b, :, : ext_len[b]], vs[b, :, : ext_len[b]] = k[0], v[0]
            past.append([ctx[layer], (ks, vs)])
        for b, n in enumerate(ext_len):
            ext_valid[b, :n] = True
        return past, torch.cat([ctx_valid, ext_valid], dim=1)

    def run(self, job: InfillJob, should_cancel: Callable[[], bool] | None = None,
            on_step: Callable[[InfillJob], None] | None = None) -> TokenResult:
        """Step one job until it finishes or `should_cancel()` says so."""
        return run_to_end(job, lambda: self.step([job]), should_cancel, on_step)


def run_to_end(job: Any, step: Callable[[], None], should_cancel: Callable[[], bool] | None = None,
               on_step: Callable[[Any], None] | None = None) -> Any:
    """The one run loop: `step()` until `job` is done or `should_cancel()` says so; then its result."""
    while not job.done:
        if should_cancel is not None and should_cancel():
            job.cancel()
            break
        step()
        if on_step is not None:
            on_step(job)
    return job.result()


def _cached_length(cache: list[KV] | None) -> int:
    return 0 if cache is None else cache[0][0].shape[2]
