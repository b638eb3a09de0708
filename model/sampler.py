"""The refinement sampler: which canvas slots to commit after a step, and when a canvas is finished.

One canvas candidate is a `Row`. Each step the engine runs the network over every live row and
hands each row its slots' chosen tokens and confidences; `Row.commit` then applies the rule:

  * commit every masked slot whose confidence clears the threshold, and at least the most
    confident one, so every step makes progress;
  * at the last allowed step of a block, commit everything still masked;
  * a committed <|pad|> ends its hole's middle, so the slots after it become pad at once
    (they can no longer change the result, and refining them would waste steps);
  * a block without a pad is full: it joins the context (as `pending` tokens, cached by the
    next forward pass) and a fresh block of masks follows, until `max_tokens`.

The `ar` strategy is the same rule with one-slot blocks and one step per block: one forward
pass per token, the baseline every speed figure is compared with.

Knows token ids and confidences; knows nothing of the network, the cache or text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import tokens as T
from .config import SamplerConfig


def choose_commits(masked: list[bool], above: list[bool], confidence: list[float], commit_all: bool,
                   tokens: list[int] | None = None, pad_id: int = T.PAD_ID) -> list[int]:
    """Indices of the slots to commit this step: the shared rule of every strategy.

    A chosen pad also takes the masked slots just before it whose best guess is pad too: they are
    the same decision (where the middle ends), and one pad per step wastes a step per tail slot
    whenever no pad clears the threshold (seen on undertrained models: a 32-slot canvas spent 16
    steps shortening itself by one slot each).
    """
    candidates = [i for i, m in enumerate(masked) if m]
    if not candidates or commit_all:
        return candidates
    chosen = [i for i in candidates if above[i]] or [max(candidates, key=lambda i: confidence[i])]
    if tokens is not None:
        extra = set()
        for i in chosen:
            j = i - 1
            while tokens[i] == pad_id and j >= 0 and masked[j] and tokens[j] == pad_id:
                extra.add(j)
                j -= 1
        chosen = sorted(set(chosen) | extra)
    return chosen


@dataclass
class Row:
    """One canvas candidate: its current block of slots, what it committed before, and its score."""

    region: list[int]  # the block's tokens: MASK where undecided, fixed sentinels for multi-hole
    spans: list[tuple[int, int]]  # per hole in document order: (first slot, length) within region
    block_size: int  # length of every block after the first
    max_tokens: int
    max_steps: int
    stop_ids: frozenset[int] = frozenset()  # e.g. tokens holding a newline, in line mode
    committed: list[int] = field(default_factory=list)  # earlier blocks, already part of the context
    pending: list[int] = field(default_factory=list)  # committed blocks not yet in this row's cache
    log_confidence: float = 0.0
    scored_tokens: int = 0
    steps_in_block: int = 0
    done: bool = False

    @classmethod
    def single(cls, length: int, opts: SamplerConfig, stop_ids: frozenset[int] = frozenset()) -> "Row":
        length = min(length, opts.max_tokens)
        return cls([T.MASK_ID] * length, [(0, length)], opts.block_size, opts.max_tokens, opts.max_steps, stop_ids)

    @property
    def masked(self) -> list[bool]:
        return [t == T.MASK_ID for t in self.region]

    @property
    def score(self) -> float:
        """Mean log-confidence of the committed slots (the pad that ends the middle included)."""
        return self.log_confidence / self.scored_tokens if self.scored_tokens else -math.inf

    def commit(self, tokens: list[int], confidence: list[float], above: list[bool]) -> None:
        """Apply one step's predictions for this row's region slots."""
        self.steps_in_block += 1
        masked = self.masked
        for i in choose_commits(masked, above, confidence, self.steps_in_block >= self.max_steps, tokens):
            self.region[i] = tokens[i]
            self.log_confidence += math.log(max(confidence[i], 1e-30))
            self.scored_tokens += 1
        self._pad_after_first_pad()
        if any(t == T.MASK_ID for t in self.region):
            if self._stopped_early():
                self.done = True
            return
        self._finish_block()

    def _pad_after_first_pad(self) -> None:
        for start, length in self.spans:
            span = self.region[start : start + length]
            if T.PAD_ID in span:
                first = span.index(T.PAD_ID)
                self.region[start + first : start + length] = [T.PAD_ID] * (length - first)

    def _stopped_early(self) -> bool:
        """Single hole: a stop token is committed and every slot before it too (line mode ends there)."""
        if not self.stop_ids or len(self.spans) != 1:
            return False
        for t in self.region:
            if t == T.MASK_ID:
                return False
            if t in self.stop_ids:
                return True
        return False

    def _finish_block(self) -> None:
        if len(self.spans) != 1 or T.PAD_ID in self.region:
            self.done = True
            return
        block, self.region, self.spans = self.region, [], [(0, 0)]
        self.committed += block
        if len(self.committed) >= self.max_tokens or any(t in self.stop_ids for t in block):
            self.done = True
            return
        self.pending += block
        n = min(self.block_size, self.max_tokens - len(self.committed))
        self.region = [T.MASK_ID] * n
        self.spans = [(0, n)]
        self.steps_in_block = 0

    def middles(self) -> list[list[int]]:
        """Per hole in document order, the middle's tokens: everything before its first pad."""
        if len(self.spans) == 1:
            decided = self.region[: self.region.index(T.MASK_ID)] if T.MASK_ID in self.region else self.region
            return [_until_pad(self.committed + decided)]
        return [_until_pad(self.region[s : s + n]) for s, n in self.spans]

    def preview(self) -> list[list[int]]:
        """Per hole, the tokens so far with MASK where still undecided (for streaming the refinement)."""
        if len(self.spans) == 1:
            return [_until_pad(self.committed + self.region)]
        return [_until_pad(self.region[s : s + n]) for s, n in self.spans]


def _until_pad(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(T.PAD_ID)] if T.PAD_ID in tokens else tokens
