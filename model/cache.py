"""Context caches: the keys and values of each live context, reused across requests.

A context is causal (model/layout.py), so its keys and values never depend on what follows:
the cache is exact. Each entry holds one context's tokens and per-layer key/value buffers that
grow in place by appending. A new request reuses the longest common token prefix of the entry
under its key (typing at the cursor only appends to the prefix) and computes only the rest.
Entries are evicted least-recently-used under a byte budget; an entry in use by a running job
is pinned and never truncated under it (a diverging request gets its own copy instead).

Knows tensors and token ids; knows nothing of the network's internals, text or requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

KV = tuple[Tensor, Tensor]

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024  # a 29M-parameter model's cache is ~64 KB per token in fp32


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class ContextKV:
    """One context: its tokens and, per layer, (1, n_kv_heads, capacity, head_dim) key/value buffers."""

    tokens: list[int] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    pins: int = 0  # running jobs that read this entry

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def segments(self, length: int | None = None) -> list[KV]:
        """Per layer, views of the first `length` cached keys and values."""
        n = self.length if length is None else length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values)]

    def truncate(self, length: int) -> None:
        del self.tokens[length:]  # the buffers keep their bytes; later appends overwrite them

    def append(self, new_tokens: list[int], new_kv: list[KV]) -> None:
        """Append tokens and their per-layer (1, Hkv, T, D) keys/values, growing buffers by doubling."""
        start, end = self.length, self.length + len(new_tokens)
        if not self.keys:
            self.keys = [torch.empty(0) for _ in new_kv]
            self.values = [torch.empty(0) for _ in new_kv]
        for i, (k, v) in enumerate(new_kv):
            if self.keys[i].numel() == 0 or self.keys[i].shape[2] < end:
                capacity = max(end, 2 * (self.keys[i].shape[2] if self.keys[i].numel() else 0), 64)
                self.keys[i] = _grow(self.keys[i], k, capacity, start)
                self.values[i] = _grow(self.values[i], v, capacity, start)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
        self.tokens.extend(new_tokens)

    def copy(self, length: int) -> "ContextKV":
        """An independent entry holding the first `length` tokens (for a request that diverges from a pinned one)."""
        return ContextKV(list(self.tokens[:length]), [k[:, :, :length].clone() for k in self.keys],
                         [v[:, :, :length].clone() for v in self.values])


def _grow(old: Tensor, like: Tensor, capacity: int, keep: int) -> Tensor:
    shape = (1, like.shape[1], capacity, like.shape[3])
    new = torch.empty(shape, dtype=like.dtype, device=like.device)
    if old.numel() and keep:
        new[:, :, :keep] = old[:, :, :keep]
    return new


@dataclass
class CacheStats:
    hits: int = 0  # requests that reused at least one cached token
    misses: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    evictions: int = 0


class ContextCacheStore:
    """Context entries by key (a document, say), least-recently-used first out under a byte budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[str, ContextKV] = OrderedDict()
        self.stats = CacheStats()
        self._anonymous = 0

    def claim(self, key: str | None, tokens: list[int]) -> tuple[ContextKV, int]:
        """The entry to extend for `tokens` and how many of its tokens are reusable as they are."""
        if key is None:
            self._anonymous += 1
            key = f"\0anonymous-{self._anonymous}"  # still cached, so a batch command's repeats are cheap
        entry = self.entries.get(key)
        if entry is None:
            entry = ContextKV()
            reuse = 0
        else:
            reuse = common_prefix_length(entry.tokens, tokens)
            if reuse < entry.length and entry.pins:
                entry = entry.copy(reuse)  # a running job still reads the old tokens: leave them alone
            else:
                entry.truncate(reuse)
        self.entries[key] = entry
        self.entries.move_to_end(key)
        if reuse:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        self.stats.reused_tokens += reuse
        self.stats.computed_tokens += len(tokens) - reuse
        return entry, reuse

    def evict(self) -> None:
        """Drop least-recently-used unpinned entries until the store fits its budget."""
        total = self.nbytes
        for key in list(self.entries):
            if total <= self.budget_bytes:
                break
            entry = self.entries[key]
            if entry.pins:
                continue
            total -= entry.nbytes
            del self.entries[key]
            self.stats.evictions += 1

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def summary(self) -> dict:
        s = self.stats
        return {"entries": len(self.entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": s.hits, "misses": s.misses, "reused_tokens": s.reused_tokens,
                "computed_tokens": s.computed_tokens, "evictions": s.evictions}
