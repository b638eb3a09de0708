"""Training examples in the infill layout, and their packing into fixed-length rows.

A source file's text becomes examples exactly as the engine will see them at a cursor: a span is cut
at character positions (mid-word included), prefix / middle / suffix are tokenized separately, the
context is built by `model/layout.py`, and the middle is written into one canvas block by the same
block rule the sampler uses (earlier blocks committed into the causal context, the rest PAD-ended).
Examples for step s are a pure function of (seed, step), so the data position of a run is its step.

The prompt around a hole (windows, budget shares, preamble, line-start rule) is model/prompt.py's,
which the server uses too. This module knows text, the tokenizer (`tokenizers.Tokenizer`, through
model/tokenizer.py) and tree-sitter's Python grammar. It does not know the network, the loss or the optimizer: it hands
the loop token ids, targets, flags and weights as tensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import layout, prompt
from .. import tokens as T
from ..tokenizer import decode, encode_plain


@dataclass(frozen=True)
class ExampleConfig:
    seq_len: int = 512  # tokens per packed row
    batch_size: int = 8  # rows per step
    # (a) rest of a line, (b) 2-8 lines, (c) a syntax node, (d) any 1-200 chars, (e) 2-3 holes at once
    kind_weights: tuple[tuple[str, float], ...] = (
        ("line", 0.30), ("lines", 0.20), ("node", 0.25), ("span", 0.15), ("multi", 0.10))
    # Canvas lengths: 1 trains the autoregressive baseline (same weights, one slot per step);
    # 8/16/32 are the lengths the sampler refines (SamplerConfig.canvas_lengths, block_size).
    canvas_buckets: tuple[int, ...] = (1, 8, 16, 32)
    canvas_weights: tuple[float, ...] = (0.15, 0.25, 0.30, 0.30)
    multi_buckets: tuple[int, ...] = (8, 16, 32)  # one canvas per hole, the smallest that holds middle + PAD
    min_context: int = 64  # shortest context budget drawn (log-uniform up to what the row leaves)
    max_committed_frac: float = 0.25  # committed earlier blocks take at most this share of a row
    span_max_chars: int = 200  # kind (d)
    lines_min: int = 2  # kind (b)
    lines_max: int = 8
    node_max_chars: int = 1000  # kind (c): bigger nodes are long middles the sampler rarely writes
    multi_holes: tuple[int, int] = (2, 3)
    multi_window_chars: int = 1500  # holes of one example lie this close, so their segments fit a row
    mask_eps: float = 1e-3  # t ~ U(eps, 1)
    files_per_step: int = 0  # 0: 2 * batch_size; each step reads its own slice of the file permutation
    window_chars_per_token: int = 8  # tokenize only this many chars per budget token around the span
    filler_frac: float = 0.25  # a row with more free room than this share is topped up with a shorter example
    ctx_fraction: float = 0.25  # share of context positions given a next-token target (the lm_head is costly)


NODE_TYPES = frozenset({
    # statements
    "expression_statement", "return_statement", "if_statement", "for_statement", "while_statement",
    "try_statement", "with_statement", "function_definition", "class_definition", "decorated_definition",
    "import_statement", "import_from_statement", "raise_statement", "assert_statement", "delete_statement",
    "elif_clause", "else_clause", "except_clause", "finally_clause",
    # blocks
    "block",
    # expressions
    "assignment", "augmented_assignment", "call", "attribute", "subscript", "binary_operator",
    "boolean_operator", "comparison_operator", "unary_operator", "not_operator", "conditional_expression",
    "lambda", "list", "dictionary", "tuple", "set", "list_comprehension", "dictionary_comprehension",
    "set_comprehension", "generator_expression", "string", "parenthesized_expression", "await",
    "keyword_argument", "pair", "integer", "float", "identifier",
    # argument lists
    "argument_list", "parameters",
})


@dataclass
class Example:
    tokens: list[int]  # model input: context, then the canvas region with MASK at masked slots
    targets: list[int]  # the true token at canvas slots (middle or PAD); -1 at context and sentinels
    masked: list[bool]  # canvas slots whose input is MASK: these carry the diffusion loss
    is_canvas: list[bool]  # the canvas region, sentinels included
    t: float  # masking rate drawn for this example
    kind: str
    canvas_lengths: list[int]  # per hole, document order
    committed: int  # middle tokens committed before the canvas (block k > 0)
    holes: list[tuple[int, int]] = field(default_factory=list)  # char spans of the middles in the file

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------- spans


class Source:
    """One file's text with its lazily built syntax tree (parsed at most once per step)."""

    _parser = None

    def __init__(self, text: str, index: int | None = None):
        self.text = text
        self.index = index  # the file's position in its corpus split, for Neighbours; None outside a corpus
        self._data: bytes | None = None
        self._tree = None

    @property
    def data(self) -> bytes:
        if self._data is None:  # surrogatepass: JSON may carry lone surrogates; offsets stay consistent
            self._data = self.text.encode("utf-8", "surrogatepass")
        return self._data

    @property
    def ascii(self) -> bool:
        return len(self.data) == len(self.text)

    def tree(self):
        if self._tree is None:
            if Source._parser is None:
                import tree_sitter
                import tree_sitter_python

                Source._parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))
            self._tree = Source._parser.parse(self.data)
        return self._tree

    def char_to_byte(self, c: int) -> int:
        return c if self.ascii else len(self.text[:c].encode("utf-8", "surrogatepass"))

    def byte_to_char(self, b: int) -> int:
        # tree-sitter offsets are bytes; node boundaries always fall on character boundaries
        return b if self.ascii else len(self.data[:b].decode("utf-8", "surrogatepass"))


def _line_bounds(text: str, p: int) -> tuple[int, int]:
    """Start and end (the newline's index, or len) of the line holding char p."""
    start = text.rfind("\n", 0, p) + 1
    end = text.find("\n", p)
    return start, (len(text) if end < 0 else end)


def _random_nonblank_line(text: str, rng: random.Random, tries: int = 12) -> tuple[int, int] | None:
    for _ in range(tries):
        s, e = _line_bounds(text, rng.randrange(len(text)))
        if text[s:e].strip():
            return s, e
    return None


def span_line(src: Source, rng: random.Random, cfg: ExampleConfig) -> tuple[int, int] | None:
    """(a) cursor anywhere inside a non-blank line; the middle is the rest of the line."""
    line = _random_nonblank_line(src.text, rng)
    if line is None:
        return None
    s, e = line
    return rng.randrange(s, e), e


def span_lines(src: Source, rng: random.Random, cfg: ExampleConfig) -> tuple[int, int] | None:
    """(b) from a cursor to the end of a line 2-8 lines on (the middle spans that many lines)."""
    line = _random_nonblank_line(src.text, rng)
    if line is None:
        return None
    s, e = line
    start = rng.randrange(s, e + 1)
    for _ in range(rng.randint(cfg.lines_min, cfg.lines_max) - 1):
        if e >= len(src.text):
            break
        e = _line_bounds(src.text, e + 1)[1]
    return (start, e) if src.text[start:e].strip() else None


def span_node(src: Source, rng: random.Random, cfg: ExampleConfig) -> tuple[int, int] | None:
    """(c) the text of a random statement / block / expression / argument list around a random point."""
    b = src.char_to_byte(rng.randrange(len(src.text)))
    node = src.tree().root_node.descendant_for_byte_range(b, min(b + 1, len(src.data)))
    cands = []
    while node is not None:  # the ancestors of a random leaf: walking the whole tree costs too much per example
        if node.type in NODE_TYPES and 0 < node.end_byte - node.start_byte <= 4 * cfg.node_max_chars:
            cands.append(node)
        node = node.parent
    if not cands:
        return None
    node = rng.choice(cands)
    s, e = src.byte_to_char(node.start_byte), src.byte_to_char(node.end_byte)
    return (s, e) if 0 < e - s <= cfg.node_max_chars else None


def span_chars(src: Source, rng: random.Random, cfg: ExampleConfig) -> tuple[int, int] | None:
    """(d) any 1-200 characters starting anywhere, mid-word included."""
    s = rng.randrange(len(src.text))
    return s, min(len(src.text), s + rng.randint(1, cfg.span_max_chars))


SPANS = {"line": span_line, "lines": span_lines, "node": span_node, "span": span_chars}


# ------------------------------------------------------------------------------------------- examples


def _encode(tokenizer, text: str) -> list[int]:
    return encode_plain(tokenizer, text) if text else []


def hole_context(text: str, start: int, end: int, tokenizer, budget: int, preamble: str = "",
                 window_chars_per_token: int = ExampleConfig.window_chars_per_token) -> list[int]:
    """The layout's context for a hole at [start, end) of `text` within `budget` tokens, with chunks of
    other files (`preamble`) before the prefix: the server's prompt (model/prompt.py), token for token."""
    prefix_text, suffix_text = prompt.span_window(text, start, end, window_chars_per_token * budget + 256)
    first, last = prompt.context_ids(lambda t: _encode(tokenizer, t), lambda ids: decode(tokenizer, ids), preamble,
                                     prefix_text, suffix_text, budget)
    return layout.single_hole_context(first, last)


def _draw_mask(n: int, t: float, rng: random.Random) -> list[bool]:
    masked = [rng.random() < t for _ in range(n)]
    if not any(masked):  # every example must train something
        masked[rng.randrange(n)] = True
    return masked


def _draw_budget(rng: random.Random, cfg: ExampleConfig, room: int) -> int:
    """Context budget, log-uniform from min_context to what the row leaves: short and long contexts both."""
    if room <= cfg.min_context:
        return room
    return int(math.exp(rng.uniform(math.log(cfg.min_context), math.log(room))))


def single_hole_example(src: Source, span: tuple[int, int], tokenizer, rng: random.Random,
                        cfg: ExampleConfig, kind: str, max_len: int, neighbours=None) -> Example | None:
    text = src.text
    s, e = span
    m = _encode(tokenizer, text[s:e])
    c = rng.choices(cfg.canvas_buckets, cfg.canvas_weights)[0]
    # The middle followed by PAD needs ceil((len+1)/c) blocks; the sampler writes them in order, so
    # block k sees blocks 0..k-1 as committed context. Blocks whose committed part would crowd the
    # row are not drawn (long middles then train their early blocks only).
    n_blocks = (len(m) + 1 + c - 1) // c
    max_k = min(n_blocks - 1, int(cfg.max_committed_frac * cfg.seq_len) // c)
    k = rng.randint(0, max_k)
    committed = m[: k * c]
    block = m[k * c: (k + 1) * c]
    truth = block + [T.PAD_ID] * (c - len(block))  # no PAD: the middle goes on in the next block
    room = max_len - c - len(committed)
    if room < 8:
        return None
    budget = _draw_budget(rng, cfg, room)
    preamble, preamble_tokens = _preamble(src, s, e, tokenizer, rng, neighbours, room)
    budget = max(budget, min(room, 2 * preamble_tokens))  # a preamble never leaves the prefix with nothing
    context = hole_context(text, s, e, tokenizer, budget, preamble, cfg.window_chars_per_token) + committed
    t = rng.uniform(cfg.mask_eps, 1.0)
    masked = _draw_mask(c, t, rng)
    canvas = [T.MASK_ID if mk else tok for tok, mk in zip(truth, masked)]
    n = len(context)
    return Example(tokens=context + canvas, targets=[-1] * n + truth, masked=[False] * n + masked,
                   is_canvas=[False] * n + [True] * c, t=t, kind=kind, canvas_lengths=[c],
                   committed=len(committed), holes=[span])


def _preamble(src: Source, s: int, e: int, tokenizer, rng: random.Random, neighbours,
              room: int) -> tuple[str, int]:
    """Cross-file chunks to put before the prefix, as the server does, and their token count; ("", 0) for
    none (see neighbours.py)."""
    if neighbours is None or src.index is None:
        return "", 0
    line_start = src.text.rfind("\n", 0, s) + 1
    line_end = src.text.find("\n", e)
    text = neighbours.preamble(src.index, src.text[line_start: len(src.text) if line_end < 0 else line_end], rng)
    tokens = len(_encode(tokenizer, text))
    return (text, tokens) if tokens <= neighbours.cfg.max_share * room else ("", 0)


def multi_hole_example(src: Source, tokenizer, rng: random.Random, cfg: ExampleConfig,
                       max_len: int) -> Example | None:
    """(e) 2-3 holes of kinds a/c/d near each other, each with its own canvas, none committed."""
    text = src.text
    want = rng.randint(*cfg.multi_holes)
    lo = rng.randrange(max(1, len(text) - cfg.multi_window_chars))
    win = Source(text[lo: lo + cfg.multi_window_chars])  # parsed on its own: a fragment's tree is mostly right
    if not win.text.strip():
        return None
    spans: list[tuple[int, int]] = []
    middles: list[list[int]] = []
    for _ in range(4 * want):
        if len(spans) == want:
            break
        sp = SPANS[rng.choice(("line", "node", "span"))](win, rng, cfg)
        if sp is None or sp[1] - sp[0] < 1:
            continue
        # one char of gap at least: two touching holes would leave an empty segment between them
        if any(sp[0] <= b and a <= sp[1] for a, b in spans):
            continue
        mid = _encode(tokenizer, win.text[sp[0]: sp[1]])
        if len(mid) + 1 > max(cfg.multi_buckets):
            continue
        spans.append(sp)
        middles.append(mid)
    if len(spans) < 2:
        return None
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    spans = [(lo + spans[i][0], lo + spans[i][1]) for i in order]
    middles = [middles[i] for i in order]
    lengths = [min(b for b in cfg.multi_buckets if b >= len(mid) + 1) for mid in middles]
    region, starts = layout.canvas_region(lengths)
    inner = [_encode(tokenizer, text[spans[i][1]: spans[i + 1][0]]) for i in range(len(spans) - 1)]
    room = max_len - len(region) - sum(len(x) + 1 for x in inner)
    if room < 8:
        return None
    budget = _draw_budget(rng, cfg, room)
    prefix_text, suffix_text = prompt.span_window(text, spans[0][0], spans[-1][1],
                                                  cfg.window_chars_per_token * budget + 256)
    prefix, suffix = prompt.truncate_context(_encode(tokenizer, prefix_text), _encode(tokenizer, suffix_text), budget)
    context = layout.multi_hole_context([prefix, *inner, suffix])
    truth = [-1] * len(region)  # sentinels stay -1: fixed input, no loss
    slot = [False] * len(region)
    for mid, c, st in zip(middles, lengths, starts):
        truth[st: st + c] = mid + [T.PAD_ID] * (c - len(mid))
        slot[st: st + c] = [True] * c
    t = rng.uniform(cfg.mask_eps, 1.0)
    drawn = iter(_draw_mask(sum(slot), t, rng))
    masked = [next(drawn) if sl else False for sl in slot]
    canvas = [T.MASK_ID if mk else (tok if tok >= 0 else reg) for tok, mk, reg in zip(truth, masked, region)]
    n = len(context)
    return Example(tokens=context + canvas, targets=[-1] * n + truth, masked=[False] * n + masked,
                   is_canvas=[False] * n + [True] * len(region), t=t, kind="multi", canvas_lengths=lengths,
                   committed=0, holes=spans)


def make_example(text: str | Source, tokenizer, rng: random.Random, cfg: ExampleConfig,
                 max_len: int | None = None, kind: str | None = None, neighbours=None) -> Example | None:
    """One example from one file, at most max_len tokens; None when the draw does not fit the file."""
    src = text if isinstance(text, Source) else Source(text)
    if not src.text.strip() or any(tok in src.text for tok in (T.MID, T.PRE, T.SUF, T.PAD, T.MASK, T.ENDOFTEXT)):
        return None  # a literal special token in the text would be encoded as the token itself
    max_len = cfg.seq_len if max_len is None else max_len
    if kind is None:
        kind = rng.choices([k for k, _ in cfg.kind_weights], [w for _, w in cfg.kind_weights])[0]
    if kind == "multi":
        return multi_hole_example(src, tokenizer, rng, cfg, max_len)
    span = SPANS[kind](src, rng, cfg)
    if span is None or span[1] <= span[0]:
        return None
    return single_hole_example(src, span, tokenizer, rng, cfg, kind, max_len, neighbours)


# -------------------------------------------------------------------------------------------- packing


@dataclass
class Row:
    tokens: list[int] = field(default_factory=list)
    example: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    is_canvas: list[bool] = field(default_factory=list)
    target: list[int] = field(default_factory=list)  # masked canvas slots only
    weight: list[float] = field(default_factory=list)  # 1 / (t * slots): the ELBO's per-slot weight
    ctx_target: list[int] = field(default_factory=list)

    def add(self, ex: Example, eid: int, rng: random.Random, cfg: ExampleConfig) -> None:
        n_slots = sum(1 for tg in ex.targets if tg >= 0)
        w = 1.0 / (ex.t * n_slots)
        self.tokens += ex.tokens
        self.example += [eid] * len(ex)
        self.position += range(len(ex))
        self.is_canvas += ex.is_canvas
        self.target += [tg if mk else -1 for tg, mk in zip(ex.targets, ex.masked)]
        self.weight += [w if mk else 0.0 for mk in ex.masked]
        # Next-token targets inside the causal context (committed blocks included): position i
        # predicts i+1. Layout tokens (<|pre|>, <|mid|>: where a truncated suffix ends) are not targets.
        n_ctx = ex.is_canvas.index(True)
        for i in range(len(ex)):
            ok = i + 1 < n_ctx and ex.tokens[i + 1] >= T.NUM_SPECIAL and rng.random() < cfg.ctx_fraction
            self.ctx_target.append(ex.tokens[i + 1] if ok else -1)

    def pad_to(self, n: int, eid: int) -> None:
        k = n - len(self.tokens)  # a dummy example of its own: attends only to itself, no loss
        self.tokens += [T.ENDOFTEXT_ID] * k
        self.example += [eid] * k
        self.position += range(k)
        self.is_canvas += [False] * k
        self.target += [-1] * k
        self.weight += [0.0] * k
        self.ctx_target += [-1] * k


def pack(rows: list[Row]) -> dict[str, Tensor]:
    """Rows of equal length -> (B, T) tensors, the (B, 1, T, T) attention mask, and the example count."""
    batch = {
        "tokens": torch.tensor([r.tokens for r in rows], dtype=torch.long),
        "example": torch.tensor([r.example for r in rows], dtype=torch.long),
        "positions": torch.tensor([r.position for r in rows], dtype=torch.long),
        "is_canvas": torch.tensor([r.is_canvas for r in rows], dtype=torch.bool),
        "targets": torch.tensor([r.target for r in rows], dtype=torch.long),
        "weights": torch.tensor([r.weight for r in rows], dtype=torch.float32),
        "ctx_targets": torch.tensor([r.ctx_target for r in rows], dtype=torch.long),
    }
    batch["mask"] = layout.packed_mask(batch["example"], batch["is_canvas"])
    batch["n_examples"] = torch.tensor(len({e for r in rows for e in r.example if e != DUMMY_EXAMPLE}))
    return batch


DUMMY_EXAMPLE = 1_000_000  # example id of a row's padding


# --------------------------------------------------------------------------------------------- corpus


class Corpus:
    """A JSON-lines split read lazily by byte offset: a site-packages corpus need not fit in memory.

    Reads are positional (`os.pread`), never seek-then-read, so one Corpus can be shared by threads
    and by forked DataLoader workers, which share its file offset.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                    self.lengths.append(len(line))
                pos += len(line)
        if not self.offsets:
            raise ValueError(f"{self.path} holds no files")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets)

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._fd)

    def record(self, i: int) -> dict:
        return json.loads(os.pread(self._fd, self.lengths[i], self.offsets[i]))

    def text(self, i: int) -> str:
        return self.record(i)["text"]


class Batches:
    """The batch of step s, a pure function of (seed, step): resuming at step s replays the same data."""

    def __init__(self, corpus: Corpus, tokenizer, cfg: ExampleConfig, seed: int = 0, neighbours=None):
        self.corpus, self.tokenizer, self.cfg, self.seed = corpus, tokenizer, cfg, seed
        self.neighbours = neighbours  # a Neighbours over the same corpus: cross-file preambles
        self._perm: tuple[int, list[int]] | None = None

    def _file(self, j: int) -> int:
        """The j-th file read by the run: epochs walk the corpus in their own seeded permutation."""
        epoch, i = divmod(j, len(self.corpus))
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(len(self.corpus)))
            random.Random(f"{self.seed}:perm:{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][i]

    def examples_for(self, step: int) -> tuple[random.Random, list[Source]]:
        cfg = self.cfg
        nf = cfg.files_per_step or 2 * cfg.batch_size
        idx = [self._file(step * nf + j) for j in range(nf)]
        files = [Source(self.corpus.text(i), index=i) for i in idx]
        return random.Random(f"{self.seed}:step:{step}"), files

    def batch(self, step: int) -> dict[str, Tensor]:
        rng, files = self.examples_for(step)
        return build_batch(files, self.tokenizer, rng, self.cfg, neighbours=self.neighbours)


class StepBatches(torch.utils.data.IterableDataset):
    """Batches of steps first_step, first_step + 1, ... built by DataLoader workers, in step order.

    Worker w of k builds steps first_step + w, + w + k, ...; a DataLoader takes one item from each
    worker in turn, so the steps arrive in order and each batch is still `Batches.batch(step)`:
    resuming is unchanged. `make_batches` runs in each worker (its own file handle and index) and
    must be picklable (a module-level function, or a functools.partial of one).
    """

    def __init__(self, make_batches, first_step: int, last_step: int = 2**62):
        super().__init__()
        self.make_batches, self.first_step, self.last_step = make_batches, first_step, last_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.make_batches()
        for step in range(self.first_step + worker, self.last_step, workers):
            yield step, batches.batch(step)


def build_batch(files: list[Source | str], tokenizer, rng: random.Random, cfg: ExampleConfig,
                keep: list[Example] | None = None, neighbours=None) -> dict[str, Tensor]:
    """Fill batch_size rows with examples drawn round-robin from `files`.

    An example that does not fit the rest of its row starts a new row; a row left with more than
    filler_frac of its length free is first topped up with a shorter draw from the same file, so
    little compute goes to padding. `keep` collects the examples (for tests).
    """
    files = [f if isinstance(f, Source) else Source(f) for f in files]
    rows = [Row()]
    eid, j, misses = 0, 0, 0
    while True:
        if misses > 50 * len(files):
            raise ValueError("no file in this step yields an example: is the corpus all tiny files?")
        src = files[j % len(files)]
        j += 1
        ex = make_example(src, tokenizer, rng, cfg, neighbours=neighbours)
        if ex is None:
            misses += 1
            continue
        misses = 0
        row = rows[-1]
        free = cfg.seq_len - len(row.tokens)
        if len(ex) > free and free > cfg.filler_frac * cfg.seq_len:
            for _ in range(4):  # top up the row: the same kind of draw, capped to the room left
                filler = make_example(src, tokenizer, rng, cfg, max_len=free, neighbours=neighbours)
                if filler is not None:
                    row.add(filler, eid, rng, cfg)
                    eid += 1
                    keep is not None and keep.append(filler)
                    break
            free = cfg.seq_len - len(row.tokens)
        if len(ex) > free:
            row.pad_to(cfg.seq_len, DUMMY_EXAMPLE)
            if len(rows) == cfg.batch_size:
                break
            rows.append(Row())
            row = rows[-1]
        row.add(ex, eid, rng, cfg)
        eid += 1
        if keep is not None:
            keep.append(ex)
    return pack(rows)
