"""Completion policy: which requests reach the model, which are answered without it, how long they took.

- Cancel-previous: a new request of one kind for a document supersedes the older one still in
  flight (Neovim does not cancel superseded requests itself). The older one is cancelled in the
  worker between two refinement steps and answers an empty result, which every client shows as
  "no suggestion" without an error popup.
- Debounce: wait a few milliseconds before asking the model, so a burst of keystrokes costs one
  request; a request superseded while it waits never reaches the worker.
- `SuggestionCache`: an LRU of finished suggestions keyed by the request's context (the text the
  model would read, the mode, the sampler overrides), not by the document, so the same context in
  two files, or a cursor that comes back, costs no model call. "Nothing to show" is cached too.
- `TypeThrough`: the last suggestion shown in each document. When the user types its first
  characters, the rest is the answer, with no model call and no debounce.
- Speculation: after a suggestion is shown, one background request per document computes the next
  one as if it were accepted and stores it in the cache, so repeated accepts are instant. The
  completion pipeline says what to compute; the policy runs the task, keeps its record
  (`Speculation`) and cancels it when a request for the document needs something else.
- Warm timers: "typing paused" warms a document's context in the worker, unless a request for the
  document comes first (`schedule_warm`, `cancel_warm`).
- Counters (`record(outcome)` for each answer, `count(event)` for the rest) and latency statistics
  for `dlm/status` and the benchmarks; `apply(settings)` takes the settings it reads.

Plain asyncio and strings, no LSP types and no documents: tests drive it directly.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

log = logging.getLogger("dlm_ls.policy")

CACHE_ENTRIES = 256  # suggestions are short strings: a few hundred cost well under a megabyte


@dataclass
class Ticket:
    """One completion request in flight."""

    uri: str
    kind: str  # "inline" | "completion": the two never supersede each other
    request_id: str
    task: asyncio.Task | None
    superseded: bool = False
    finished: bool = False


class LatencyStats:
    """Recent latencies in milliseconds, by name, with nearest-rank percentiles."""

    def __init__(self, window: int = 2048):
        self.samples: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self.count: collections.Counter[str] = collections.Counter()

    def record(self, name: str, ms: float) -> None:
        self.samples[name].append(float(ms))
        self.count[name] += 1

    @staticmethod
    def percentile(sorted_ms: list[float], q: float) -> float:
        if not sorted_ms:
            return 0.0
        rank = math.ceil(q / 100.0 * len(sorted_ms))  # nearest rank: the smallest value with q% at or below it
        return sorted_ms[max(0, min(len(sorted_ms), rank) - 1)]

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, dq in self.samples.items():
            s = sorted(dq)
            out[name] = {"count": self.count[name], "p50": self.percentile(s, 50), "p90": self.percentile(s, 90),
                         "p95": self.percentile(s, 95), "p99": self.percentile(s, 99),
                         "max": s[-1] if s else 0.0, "mean": sum(s) / len(s) if s else 0.0}
        return out


# --------------------------------------------------------------------------- the suggestion cache


def context_key(segments: list[str], mode: str, overrides: dict[str, Any]) -> str:
    """What decides a suggestion, hashed: the text around the hole(s), the mode, the sampler settings.

    No URI: the same context in another file is the same question. Each segment is length-prefixed,
    so ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([mode, overrides], sort_keys=True, default=str).encode())
    for s in segments:
        data = s.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass
class Cached:
    text: str | None  # None: the model had nothing worth showing here
    origin: str  # "model" | "speculative": who computed it, for the hit counters


class SuggestionCache:
    """Least-recently-used suggestions by `context_key`."""

    def __init__(self, capacity: int = CACHE_ENTRIES):
        self.capacity = capacity
        self.entries: collections.OrderedDict[str, Cached] = collections.OrderedDict()

    def get(self, key: str) -> Cached | None:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: str, text: str | None, origin: str = "model") -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = Cached(text, origin)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------- type-through


@dataclass
class Shown:
    """A suggestion as it was shown: where, around which text, and what."""

    offset: int
    prefix: str  # the text window before the cursor (prompt.line_window)
    suffix: str  # and after it
    text: str


class TypeThrough:
    """The last suggestion shown per document, and whether a new cursor is typing through it."""

    def __init__(self) -> None:
        self.shown: dict[str, Shown] = {}

    def show(self, uri: str, offset: int, prefix: str, suffix: str, text: str) -> None:
        self.shown[uri] = Shown(offset, prefix, suffix, text)

    def forget(self, uri: str) -> None:
        self.shown.pop(uri, None)

    def remainder(self, uri: str, offset: int, prefix: str, suffix: str) -> str | None:
        """The rest of the shown suggestion when the text is the old text with its first characters
        typed at the old cursor, and the cursor after them; None otherwise.

        Compares the windows, never whole documents: a keystroke in a 5 MB file stays cheap. The
        prefix windows may start at different lines (each is cut to a budget at a line break), so
        they must agree where they overlap."""
        s = self.shown.get(uri)
        if s is None or offset <= s.offset or suffix != s.suffix:
            return None
        typed_len = offset - s.offset
        if typed_len >= len(s.text) or typed_len > len(prefix):
            return None  # typed all of it (the speculative suggestion takes over), or more
        typed, before = prefix[len(prefix) - typed_len:], prefix[:len(prefix) - typed_len]
        if not s.text.startswith(typed):
            return None
        if not (s.prefix.endswith(before) if len(before) <= len(s.prefix) else before.endswith(s.prefix)):
            return None
        return s.text[typed_len:]


# --------------------------------------------------------------------------- the policy


@dataclass
class Speculation:
    """The background request computing a document's next suggestion as if the shown one were accepted."""

    uri: str
    task: asyncio.Task | None = None
    key: str | None = None  # its context_key, known once it is planned


@dataclass
class CompletionPolicy:
    debounce_ms: int = 0
    cache_entries: int = CACHE_ENTRIES
    latency: LatencyStats = field(default_factory=LatencyStats)
    counters: collections.Counter = field(default_factory=collections.Counter)
    _current: dict[tuple[str, str], Ticket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = SuggestionCache(self.cache_entries)
        self.typed = TypeThrough()
        self.speculations: dict[str, Speculation] = {}
        self.tasks: set[asyncio.Task] = set()  # background work: speculations, warms
        self.warm_timers: dict[str, asyncio.Task] = {}

    def apply(self, settings: Any) -> None:
        """Take the settings the policy reads (debounce, cache size)."""
        self.debounce_ms = settings.debounce_ms
        self.cache.capacity = settings.cache_entries

    def reset(self) -> None:
        """Another model answers from now on: forget what the old one suggested."""
        self.cache.entries.clear()

    # -- accounting

    def count(self, event: str, n: int = 1) -> None:
        self.counters[event] += n

    def record(self, outcome: Any) -> dict[str, Any]:
        """Count one answered request (a completion.Outcome) and time it; returns its `last_request` summary."""
        self.latency.record("total", outcome.ms)
        self.latency.record(f"served_{outcome.source}", outcome.ms)  # how fast each kind of answer is
        r, plan = outcome.result, outcome.plan
        model: dict[str, Any] = {}
        if r is not None:
            self.latency.record("model", r.ms)
            self.counters["nfe"] += r.nfe
            self.counters["prefill_tokens"] += r.prefill_tokens  # context the worker's cache did not hold
            model = {"nfe": r.nfe, "steps": r.steps, "prefill_tokens": r.prefill_tokens,
                     "canvas_length": r.canvas_length}
        self.counters["stale" if outcome.stale else "empty" if outcome.text is None else "suggestions"] += 1
        return {"ms": round(outcome.ms, 2), "cached": outcome.cached, "source": outcome.source,
                "suggested": outcome.text is not None,
                "prefix_chars": len(plan.prefix) if plan else 0, "suffix_chars": len(plan.suffix) if plan else 0,
                "extra_context_chars": len(plan.preamble) if plan else 0, "mode": plan.mode if plan else None,
                **model}

    # -- background work

    def background(self, coro: Awaitable[Any]) -> asyncio.Task:
        """Run work nobody waits for; keep a reference (the loop holds tasks weakly) and log failures."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def reap(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background work failed: %r", t.exception())
        task.add_done_callback(reap)
        return task

    def stop_background(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def schedule_warm(self, uri: str, delay_ms: int, warm: Callable[[], Awaitable[None]]) -> None:
        """Run `warm()` after `delay_ms` unless a request for the document comes first."""
        self.cancel_warm(uri)
        self.warm_timers[uri] = self.background(self._warm_later(uri, delay_ms, warm))

    def cancel_warm(self, uri: str) -> None:
        task = self.warm_timers.pop(uri, None)
        if task is not None and not task.done():
            task.cancel()

    async def _warm_later(self, uri: str, delay_ms: int, warm: Callable[[], Awaitable[None]]) -> None:
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)
        if self.warm_timers.get(uri) is asyncio.current_task():
            del self.warm_timers[uri]
        await warm()

    # -- cancel-previous and debounce

    def begin(self, uri: str, kind: str, request_id: str) -> Ticket:
        """Register a new request; supersede (cancel) the older one of this kind for this document."""
        self.counters["requests"] += 1
        old = self._current.get((uri, kind))
        if old is not None and not old.finished:
            old.superseded = True
            self.counters["superseded"] += 1
            if old.task is not None and not old.task.done():
                old.task.cancel()
        ticket = Ticket(uri, kind, request_id, asyncio.current_task())
        self._current[(uri, kind)] = ticket
        return ticket

    def end(self, ticket: Ticket) -> None:
        ticket.finished = True
        if self._current.get((ticket.uri, ticket.kind)) is ticket:
            del self._current[(ticket.uri, ticket.kind)]

    def forget_document(self, uri: str) -> None:
        """The document closed: cancel whatever is still running or waiting for it."""
        self.cancel_warm(uri)
        for key in [k for k in self._current if k[0] == uri]:
            ticket = self._current.pop(key)
            ticket.superseded = True
            if ticket.task is not None and not ticket.task.done():
                ticket.task.cancel()
        self.typed.forget(uri)
        self.cancel_speculation(uri)

    async def debounce(self) -> None:
        """Wait out the debounce delay; a superseding request cancels the waiting task."""
        if self.debounce_ms > 0:
            await asyncio.sleep(self.debounce_ms / 1000.0)

    # -- answers without the model

    def type_through(self, uri: str, offset: int, prefix: str, suffix: str) -> str | None:
        rest = self.typed.remainder(uri, offset, prefix, suffix)
        if rest is not None:
            self.counters["type_through_hits"] += 1
        return rest

    def lookup(self, key: str) -> Cached | None:
        """A cached suggestion for this context; a speculative one counts once as a speculative hit."""
        hit = self.cache.get(key)
        if hit is None:
            self.counters["cache_misses"] += 1
            return None
        if hit.origin == "speculative":
            self.counters["speculative_hits"] += 1
            self.cache.put(key, hit.text, "model")  # asked for now: from here on an ordinary entry
            return Cached(hit.text, "speculative")
        self.counters["cache_hits"] += 1
        return hit

    def holds(self, key: str) -> bool:
        """Is a suggestion for this context cached? (Not counted as a hit or a miss.)"""
        return self.cache.get(key) is not None

    def remember(self, key: str, text: str | None, origin: str = "model") -> None:
        self.cache.put(key, text, origin)

    def shown(self, uri: str, offset: int, prefix: str, suffix: str, text: str | None) -> None:
        if text:
            self.typed.show(uri, offset, prefix, suffix, text)
        else:
            self.typed.forget(uri)

    # -- speculation

    def start_speculation(self, uri: str,
                          run: Callable[[Speculation], Awaitable[None]] | None = None) -> Speculation:
        """A record for a new speculation of `uri`, running `run(record)` in the background; the older
        one, for a suggestion no longer shown, stops."""
        self.cancel_speculation(uri)
        spec = Speculation(uri)
        self.speculations[uri] = spec
        self.counters["speculations"] += 1
        if run is not None:
            spec.task = self.background(run(spec))
        return spec

    def speculation(self, uri: str) -> Speculation | None:
        spec = self.speculations.get(uri)
        if spec is not None and spec.task is not None and spec.task.done():
            del self.speculations[uri]
            return None
        return spec

    def cancel_speculation(self, uri: str) -> None:
        spec = self.speculations.pop(uri, None)
        if spec is not None and spec.task is not None and not spec.task.done():
            spec.task.cancel()
            self.counters["speculations_cancelled"] += 1

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {"in_flight": sum(1 for t in self._current.values() if not t.finished),
                "counters": dict(c),
                "hits": {"cache": c["cache_hits"], "type_through": c["type_through_hits"],
                         "speculative": c["speculative_hits"], "model_calls": c["model_calls"],
                         "warms": c["warms"]},
                "cache": {"entries": len(self.cache), "capacity": self.cache.capacity},
                "speculating": sorted(u for u, s in self.speculations.items()
                                      if s.task is not None and not s.task.done()),
                "latency_ms": self.latency.summary()}
