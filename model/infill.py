"""Text in, text out: the engine behind a tokenizer. What the worker and `dlm-ls fill` call.

`Infiller` loads a checkpoint folder (model, tokenizer, sampler defaults), turns the text
around k holes into the layout's context, starts engine jobs, and turns their tokens back into
text. Prefix, middle and suffix are tokenized separately, exactly as in training, so a prefix
may end inside a word. Mode "line" stops a middle at its first newline (and stops refining once
a newline is committed); "block" and "auto" leave the cut to the caller.

Knows text and token ids; knows nothing of LSP, documents or editors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import layout
from . import tokens as T
from .config import SamplerConfig
from .engine import Engine, EngineError, InfillJob, TokenResult
from .load import DEFAULT_MODEL_DIR, load_model, load_sampler_config, read_tokenizer
from .train.tokenizer import encode_plain

MASK_GLYPH = "\u2591"  # how an undecided slot looks in a streamed refinement state
MODES = ("line", "block", "auto")
DEFAULT_MAX_CONTEXT_TOKENS = 2048  # for a model that does not say how long its training rows were


def default_context_tokens(model_config, sampler: SamplerConfig) -> int:
    """The context budget to use when none is asked for: the trained row length, less room for the
    middle (committed blocks and the canvas), or DEFAULT_MAX_CONTEXT_TOKENS when it is not known."""
    trained = model_config.trained_context
    if not trained:
        return DEFAULT_MAX_CONTEXT_TOKENS
    room = max(sampler.max_tokens, max(sampler.canvas_lengths))
    return max(64, trained - room)


class InfillError(ValueError):
    """A request that cannot be served as asked; the message says why."""


@dataclass
class InfillResult:
    middles: list[str]  # one per hole, in document order
    nfe: int
    steps: int
    ms: float
    canvas_length: int
    score: float
    prefill_tokens: int
    tokens: list[list[int]]
    candidates: list[list[str]]  # every candidate length's middles, best first

    def to_dict(self) -> dict:
        return {"middles": self.middles, "candidates": self.candidates, "nfe": self.nfe, "steps": self.steps, "ms": round(self.ms, 3),
                "canvas_length": self.canvas_length, "score": self.score, "prefill_tokens": self.prefill_tokens}


class NaturalOrderJob:
    """A Dream/LLaDA request: natural-order infill `[prefix][mask x N][suffix]` with the dual cache.

    Those models were trained with full attention in document order, so our suffix-first cached
    layout does not apply; `model/dual_cache.py` refines the slots with a prefix/suffix cache that
    is refreshed at each block boundary. It is not batched with other jobs: its first step runs it
    to the end (a later version can interleave its blocks with the scheduler's steps).
    """

    def __init__(self, model, prefix: list[int], suffix: list[int], opts: SamplerConfig):
        self.model, self.prefix, self.suffix, self.options = model, prefix, suffix, opts
        self.cancelled = self.finished = False
        self.tokens: list[int] = []
        self.nfe, self.ms = 0, 0.0

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        from .dual_cache import refine_natural_order

        cfg, o = self.model.config, self.options
        t0 = time.perf_counter()
        self.tokens, self.nfe = refine_natural_order(
            self.model, self.prefix, self.suffix, o.max_tokens, o.block_size, o.threshold, o.max_steps,
            cfg.mask_id, cfg.logits_shift, temperature=o.temperature)
        self.ms = (time.perf_counter() - t0) * 1000.0
        self.finished = True

    def _middle(self) -> list[int]:
        ends = {self.model.config.pad_id, self.model.config.special_ids.get(T.ENDOFTEXT, -1)}
        cut = next((i for i, t in enumerate(self.tokens) if t in ends), len(self.tokens))
        return self.tokens[:cut]

    def preview(self) -> list[list[int]]:
        return [self._middle()]

    def result(self) -> TokenResult:
        return TokenResult([self._middle()], self.nfe, self.nfe, 0.0, self.options.max_tokens, self.ms, 0,
                           [[self._middle()]])


class InfillTextJob:
    """An engine job plus what is needed to turn its tokens into text."""

    def __init__(self, infiller: "Infiller", job: InfillJob, mode: str):
        self.infiller, self.job, self.mode = infiller, job, mode

    @property
    def done(self) -> bool:
        return self.job.done

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def cancel(self) -> None:
        self.job.cancel()

    def snapshot(self) -> list[str]:
        return [self.infiller.render(ids, self.mode) for ids in self.job.preview()]

    def result(self) -> InfillResult:
        r = self.job.result()
        middles = [self.infiller.render(ids, self.mode) for ids in r.middles]
        candidates = [[self.infiller.render(ids, self.mode) for ids in c] for c in r.candidates]
        return InfillResult(middles, r.nfe, r.steps, r.ms, r.canvas_length, r.score, r.prefill_tokens, r.middles,
                            candidates)


class Infiller:
    def __init__(self, model_dir: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                 max_context_tokens: int | None = None, cache_budget_bytes: int | None = None,
                 captured_step: bool = False):
        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        if not (self.model_dir / "config.json").exists():
            raise InfillError(f"no model at {self.model_dir}: expected a checkpoint folder with config.json")
        self.model = load_model(self.model_dir, device, dtype)
        # The `tokenizers` package directly: transformers' wrapper costs a second of import and adds nothing here.
        self._backend = read_tokenizer(self.model_dir)
        self.defaults = load_sampler_config(self.model_dir)
        kwargs = {"cache_budget_bytes": cache_budget_bytes} if cache_budget_bytes else {}
        if max_context_tokens is None:
            max_context_tokens = default_context_tokens(self.model.config, self.defaults)
        self.engine = Engine(self.model, max_context_tokens=max_context_tokens, captured_step=captured_step, **kwargs)
        self.max_context_tokens = self.engine.max_context_tokens
        vocab = self._backend.get_vocab_size(with_added_tokens=True)
        self.newline_ids = frozenset(i for i in range(vocab) if "\n" in self._decode([i]))

    # ---- text <-> tokens --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode_plain(self._backend, text)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def render(self, ids: list[int], mode: str) -> str:
        """Tokens to text, undecided slots as MASK_GLYPH; in line mode, up to the first newline."""
        parts, run = [], []
        for i in ids:
            if i == T.MASK_ID:
                if run:
                    parts.append(self._decode(run))
                    run = []
                parts.append(MASK_GLYPH)
            else:
                run.append(i)
        if run:
            parts.append(self._decode(run))
        text = "".join(parts)
        return text.split("\n", 1)[0] if mode == "line" else text

    def context_for(self, segments: list[str]) -> list[int]:
        if len(segments) < 2:
            raise InfillError("need the text around at least one hole: [prefix, suffix]")
        if len(segments) - 1 > T.MAX_HOLES:
            raise InfillError(f"at most {T.MAX_HOLES} holes per request, got {len(segments) - 1}")
        ids = [self.encode(s) for s in segments]
        budget = self.max_context_tokens
        inner = sum(len(s) for s in ids[1:-1]) + 2 * (len(ids) - 2)
        if inner > budget // 2:
            raise InfillError(f"the text between the holes is {inner} tokens; at most {budget // 2} fit the context")
        first, last = layout.truncate_context(ids[0], ids[-1], budget - inner)
        return layout.multi_hole_context([first, *ids[1:-1], last])

    # ---- jobs -------------------------------------------------------------------------------------

    def options(self, mode: str = "auto", **overrides) -> SamplerConfig:
        if mode not in MODES:
            raise InfillError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        try:
            return self.defaults.replace(**overrides)
        except (TypeError, ValueError) as exc:
            raise InfillError(f"bad sampler option: {exc}") from None

    def start(self, segments: list[str], *, mode: str = "auto", cache_key: str | None = None, **overrides) -> InfillTextJob:
        opts = self.options(mode, **overrides)
        holes = len(segments) - 1
        if self.model.config.layout != "dlm":
            if holes != 1:
                raise InfillError("natural-order models (Dream, LLaDA) fill one hole per request")
            prefix, suffix = layout.truncate_context(self.encode(segments[0]), self.encode(segments[1]),
                                                     self.max_context_tokens)
            return InfillTextJob(self, NaturalOrderJob(self.model, prefix, suffix, opts), mode)
        context = self.context_for(segments)
        hole_lengths = [max(opts.canvas_lengths)] * holes if holes > 1 else None
        stop = self.newline_ids if mode == "line" and holes == 1 else frozenset()
        try:
            job = self.engine.start(context, opts, cache_key, hole_lengths, stop)
        except EngineError as exc:
            raise InfillError(str(exc)) from None
        return InfillTextJob(self, job, mode)

    def step(self, jobs: list[InfillTextJob]) -> None:
        self.engine.step([j.job for j in jobs if isinstance(j.job, InfillJob)])
        for j in jobs:
            if isinstance(j.job, NaturalOrderJob) and not j.job.done:
                j.job.run()

    def complete(self, segments: list[str], *, mode: str = "auto", cache_key: str | None = None,
                 on_step: Callable[[InfillTextJob], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, **overrides) -> InfillResult:
        job = self.start(segments, mode=mode, cache_key=cache_key, **overrides)
        while not job.done:
            if should_cancel is not None and should_cancel():
                job.cancel()
                break
            self.step([job])
            if on_step is not None:
                on_step(job)
        return job.result()

    def score_middle(self, segments: list[str], middle: str) -> dict:
        """The log-likelihood of `middle` in the one hole, as the `ar` strategy factors it: each token a
        one-slot canvas after the tokens before it, then the PAD that ends the middle. An exact
        likelihood (not a bound), with the engine's banned ids excluded as when sampling.

        One forward pass: the context, the middle as committed tokens, and one MASK slot per target
        that sees only the context, the middle before it, and itself.
        """
        if self.model.config.layout != "dlm" or len(segments) != 2:
            raise InfillError("scoring takes one hole and a model in dlm-ls's own layout")
        context = self.context_for(segments)
        target = self.encode(middle) + [T.PAD_ID]
        n_ctx, n = len(context), len(target)
        committed = n_ctx + n - 1  # context + every middle token but the last target (PAD)
        tokens = torch.tensor(context + target[:-1] + [T.MASK_ID] * n)
        positions = torch.cat([torch.arange(committed), n_ctx + torch.arange(n)])
        width = committed + n
        mask = torch.ones(width, width, dtype=torch.bool).tril()
        mask[committed:, n_ctx:] = False
        for i in range(n):  # slot i: the context, the first i middle tokens, itself
            mask[committed + i, n_ctx: n_ctx + i] = True
            mask[committed + i, committed + i] = True
        dev = self.engine.device
        with torch.inference_mode():
            logits, _ = self.model(tokens[None].to(dev), positions[None].to(dev), mask[None, None].to(dev), None,
                                   logits_from=committed)
            logits = logits[0].float()
            logits.index_fill_(-1, self.engine.banned_ids, float("-inf"))
            logp = torch.log_softmax(logits, -1)[torch.arange(n), torch.tensor(target, device=dev)]
        return {"tokens": n, "nll": float(-logp.sum()), "token_nll": [round(float(-x), 4) for x in logp]}

    def score_middle_by_context_head(self, segments: list[str], middle: str) -> dict:
        """The log-likelihood of `middle`'s tokens as the causal context's own next-token head reads them:
        the middle appended to the context, each token predicted at the position before it (the
        head that training's context loss teaches). No closing PAD: that head never predicts layout
        tokens. One forward pass; for comparing with `score_middle` on the same tokens."""
        if self.model.config.layout != "dlm" or len(segments) != 2:
            raise InfillError("scoring takes one hole and a model in dlm-ls's own layout")
        context, target = self.context_for(segments), self.encode(middle)
        if not target:
            return {"tokens": 0, "nll": 0.0, "token_nll": []}
        width = len(context) + len(target)
        tokens = torch.tensor(context + target)
        mask = torch.ones(width, width, dtype=torch.bool).tril()
        dev = self.engine.device
        with torch.inference_mode():
            logits, _ = self.model(tokens[None].to(dev), torch.arange(width)[None].to(dev), mask[None, None].to(dev),
                                   None, logits_from=len(context) - 1)
            logits = logits[0, : len(target)].float().clone()
            logits[:, : T.NUM_SPECIAL] = float("-inf")
            logp = torch.log_softmax(logits, -1)[torch.arange(len(target)), torch.tensor(target, device=dev)]
        return {"tokens": len(target), "nll": float(-logp.sum()), "token_nll": [round(float(-x), 4) for x in logp]}

    def warm(self, cache_key: str, segments: list[str]) -> None:
        """Compute a context's cache ahead of the request that will need it (document opened, cursor settled)."""
        self.engine.prefill(cache_key, self.context_for(segments))

    def cache_stats(self) -> dict:
        return self.engine.cache.summary()

    def info(self) -> dict:
        cfg = self.model.config
        return {"model": self.model_dir.name, "model_dir": str(self.model_dir), "device": str(self.engine.device),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "parameters": sum(p.numel() for p in self.model.parameters()), "vocab_size": cfg.vocab_size,
                "layout": cfg.layout, "max_context_tokens": self.max_context_tokens,
                "sampler": self.defaults.to_dict(),
                "captured_step": self.engine.captured.stats() if self.engine.captured is not None else None}
