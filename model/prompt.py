"""What the model is shown around a cursor, written once for serving and for training.

- Windows cut at whole lines (`line_window`, `span_window`), then fitted to the token budget's
  share in characters (`fit_window`, `prompt_chars`): the language server sends them, and the
  training example builder cuts its files the same way.
- The budget shares: the suffix gets at most SUFFIX_SHARE of the context tokens, chunks of other
  files (the preamble) at most EXTRA_CONTEXT_SHARE of the prefix's.
- The extra-context chunk format (`Chunk`, `format_chunk`): comment lines naming the other file.
- The token context of one hole (`context_ids`): preamble, prefix and suffix tokenized apart and
  fitted to the budget by `truncate_context`; after a preamble the prefix starts at a line start
  (`LINE_START` rule), since the server puts whole lines there.

Torch-free and tokenizer-agnostic (an `encode` callable comes in). It knows nothing of LSP,
documents, sockets or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlparse

MODES = ("line", "block", "auto")  # what a request asks the model to write: one line, a block, or its choice
# The engine's context budget when neither the request nor the checkpoint says one.
DEFAULT_CONTEXT_TOKENS = 2048
# The engine keeps the prefix's end and gives the suffix at most this share of its token budget.
SUFFIX_SHARE = 0.25
PREFIX_SHARE = 1 - SUFFIX_SHARE
# Code tokenizes to about 3.6 characters a token with the trained tokenizer; 3 errs toward fitting, so
# chunks shown before the prefix are not the first thing the engine cuts.
CHARS_PER_TOKEN = 3.0
EXTRA_CONTEXT_SHARE = 1 / 3  # chunks of other documents take at most this much of the prefix budget
EXTRA_CONTEXT_CHARS = 1500  # ... and at most this many characters (the server's extra_context_chars)
SPECIAL_SLOTS = 3  # <|suf|>, <|pre|>, <|mid|> around a one-hole context


# --------------------------------------------------------------------------- character windows


def prompt_chars(context_tokens: int | None) -> int:
    """Characters of preamble + prefix that the engine's token budget keeps whole."""
    return int((context_tokens or DEFAULT_CONTEXT_TOKENS) * PREFIX_SHARE * CHARS_PER_TOKEN)


def line_window(text: str, offset: int, max_chars: int) -> tuple[str, str]:
    """The prefix and suffix around `offset`, each cut to `max_chars`, at a line break where one is near.

    This keeps a request's size bounded by the budget, not by the document: a cursor in a
    5 MB file sends about 2 x max_chars characters.
    """
    start = max(0, offset - max_chars)
    if start > 0:
        nl = text.find("\n", start, offset)
        if nl != -1:
            start = nl + 1
    end = min(len(text), offset + max_chars)
    if end < len(text):
        nl = text.rfind("\n", offset, end)
        if nl != -1:
            end = nl + 1
    return text[start:offset], text[offset:end]


def fit_window(prefix: str, suffix: str, preamble: str, max_prompt_chars: int) -> tuple[str, str]:
    """Cut a window further, at line breaks, to what the engine's budget keeps.

    The prefix gives up its oldest whole lines so that preamble + prefix fit `max_prompt_chars`, and
    the suffix its last lines so that it fits its share. Were they left longer, the engine would cut
    them token by token, and the prefix's first kept token would move with every keystroke: the
    worker's context cache (longest common prefix) would then recompute the whole prefix per key. Cut
    at lines, the window start moves once per line, and only the typed tail is recomputed.
    """
    if len(preamble) + len(prefix) > max_prompt_chars:
        room = max(0, max_prompt_chars - len(preamble))
        prefix = line_window(prefix, len(prefix), room)[0]
    suffix_room = int(max_prompt_chars * SUFFIX_SHARE / PREFIX_SHARE)
    if len(suffix) > suffix_room:
        suffix = line_window(suffix, 0, suffix_room)[1]
    return prefix, suffix


def span_window(text: str, start: int, end: int, nchars: int) -> tuple[str, str]:
    """Prefix and suffix of the span [start, end), at least about `nchars` each, cut at line starts.

    Training tokenizes this much instead of a whole file; the token budget then cuts it further.
    """
    lo = 0 if start <= nchars else text.rfind("\n", 0, start - nchars) + 1
    hi = text.find("\n", end + nchars) if end + nchars < len(text) else -1
    return text[lo:start], text[end:] if hi < 0 else text[end:hi]


# --------------------------------------------------------------------------- tokens


def truncate_context(prefix: list[int], suffix: list[int], budget: int,
                     suffix_share: float = SUFFIX_SHARE) -> tuple[list[int], list[int]]:
    """Fit prefix and suffix into `budget` tokens: keep the prefix's end and the suffix's start.

    The suffix gets at most `suffix_share` of the budget unless the prefix leaves room, because
    the code just above the cursor predicts the middle best.
    """
    budget = max(0, budget - SPECIAL_SLOTS)
    if len(prefix) + len(suffix) <= budget:
        return prefix, suffix
    suffix_room = max(budget - len(prefix), int(budget * suffix_share))
    suffix = suffix[: min(len(suffix), suffix_room)]
    prefix = prefix[len(prefix) - min(len(prefix), budget - len(suffix)):]
    return prefix, suffix


def from_line_start(text: str) -> str:
    """The line-start rule: what follows a preamble begins at a line start, so a prefix cut mid-line
    gives up its partial first line (a merged newline+indent token must not be split either)."""
    cut = text.find("\n")
    return text[cut + 1:] if cut >= 0 else text


def context_ids(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], preamble: str,
                prefix: str, suffix: str, budget: int) -> tuple[list[int], list[int]]:
    """The (preamble + prefix, suffix) token ids of one hole within `budget` context tokens.

    Each part is tokenized apart, as the layout separates them; the preamble is kept whole and the
    prefix and suffix share what it leaves (truncate_context). When a preamble is there and the
    prefix was cut, the prefix restarts at a line start, as a server window would.
    """
    head = encode(preamble) if preamble else []
    whole = encode(prefix) if prefix else []
    first, last = truncate_context(whole, encode(suffix) if suffix else [], budget - len(head))
    if head and len(first) < len(whole):
        first = encode(from_line_start(decode(first)))
    return head + first, last


# --------------------------------------------------------------------------- chunks of other files


@dataclass(frozen=True)
class Chunk:
    uri: str
    text: str
    score: float
    start_line: int = 0  # 0-based line of the chunk's first line in its document


def uri_path(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme else uri


def display_path(uri: str, root: str | None = None) -> str:
    path = uri_path(uri)
    if root:
        root_path = uri_path(root).rstrip("/") + "/"
        if path.startswith(root_path):
            return path[len(root_path):]
    return "/".join(path.split("/")[-3:])  # enough to tell files apart without a workspace root


def format_chunk(chunk: Chunk, comment: str, root: str | None = None) -> str:
    """One chunk as lines commented with `comment`: the model reads it as context, the prefix still parses."""
    body = "".join(f"{comment} {line}".rstrip() + "\n" for line in chunk.text.split("\n"))
    return f"{comment} Compare this snippet from {display_path(chunk.uri, root)}:\n{body}"
