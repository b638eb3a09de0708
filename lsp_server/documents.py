"""Open documents: full and incremental sync, LSP positions, offsets and the context window.

Text is held as a Python str; offsets are code-point indices into it. A line index (the
offset where each line starts) is kept up to date edit by edit, so an edit in a 5 MB file
costs the size of the edit plus a shift of the later line starts, not a rescan. Lines end at
"\\n", "\\r\\n" or "\\r" and nowhere else (LSP 3.17; not str.splitlines, which also breaks at
U+2028 and form feeds). Positions count UTF-16 code units by default, or UTF-8 bytes or
code points when the client negotiated those.

Text from the client is made safe here, once: a lone UTF-16 surrogate (legal in JSON, so a
client may send one) becomes U+FFFD, which takes the same one UTF-16 unit, one code point and
three UTF-8 bytes (as the surrogate does under "surrogatepass"), so every position the client
sends still lands where it meant. Nothing downstream (the extra-context chunks of one document
in another's request, msgpack to the worker, the tokenizer) then meets text it cannot encode.

The store keeps no document above `LIMITS.max_document_chars` (worker/protocol.py): one opened
larger is refused, one that grows past it is let go, each with one log line; requests on it get a
`too_large` error naming the limit, until it is closed or replaced whole by a text that fits.

Plain data in, plain data out: positions are (line, character) pairs. This module knows
nothing of pygls, models or sockets.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from ..worker.protocol import LIMITS
from .errors import DlmError

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
ENCODINGS = (UTF8, UTF16, UTF32)
_BREAK = re.compile(r"\n|\r(?!\n)")  # the character ending each line; "\r\n" ends at its "\n"

Position = tuple[int, int]
Range = tuple[Position, Position]

log = logging.getLogger("dlm_ls.documents")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str from JSON holds pairs as one code point


def safe_text(text: str) -> tuple[str, int]:
    """`text` with each lone surrogate replaced by U+FFFD, and how many there were."""
    if text.isascii():
        return text, 0
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        return _LONE_SURROGATE.subn("\ufffd", text)


# --------------------------------------------------------------------------- columns within a line


def col_to_index(line: str, col: int, encoding: str = UTF16) -> int:
    """Code-point index of column `col` (in `encoding` units) in `line`, clamped to its end.

    A column inside a character (half a surrogate pair, part of a UTF-8 sequence) rounds down
    to the start of that character.
    """
    if col <= 0:
        return 0
    if encoding == UTF32 or line.isascii():
        return min(col, len(line))
    head = line[:col]  # at least one unit per code point, so the answer lies within the first `col`
    if encoding == UTF16:
        units = head.encode("utf-16-le", "surrogatepass")[: 2 * col]
        return len(units.decode("utf-16-le", "ignore"))
    units = head.encode("utf-8", "surrogatepass")[:col]
    return len(units.decode("utf-8", "ignore"))


def index_to_col(line: str, index: int, encoding: str = UTF16) -> int:
    """Column (in `encoding` units) of code-point `index` in `line`."""
    head = line[:index]
    if encoding == UTF32 or head.isascii():
        return len(head)
    if encoding == UTF16:
        return len(head.encode("utf-16-le", "surrogatepass")) // 2
    return len(head.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------- one document


def _scan_starts(text: str, lo: int, hi: int) -> list[int]:
    """Line starts p with lo <= p <= hi (p > 0), found from the characters at p-1 and p."""
    if hi < lo:
        return []
    found = (m.end() for m in _BREAK.finditer(text, max(lo - 1, 0), min(hi + 1, len(text))))
    return [p for p in found if lo <= p <= hi]


@dataclass
class Document:
    uri: str
    text: str = ""
    language_id: str = ""
    version: int = 0
    encoding: str = UTF16
    starts: list[int] = field(default_factory=list)  # offset of each line's first character
    # Kept in step with every edit when set: an object with set_text(text) and
    # apply_edit(start, old_end, new_text, text_after) taking offsets into the text before the edit
    # (the parse tree of syntax.py). A tree that fails is dropped, never the edit.
    syntax: Any = None

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise DlmError("invalid_params", f"unknown position encoding {self.encoding!r}")
        self.starts = [0] + _scan_starts(self.text, 1, len(self.text))

    # -- lines

    @property
    def line_count(self) -> int:
        return len(self.starts)

    def line_end(self, line: int) -> int:
        """Offset just past the line's last character, before its line break."""
        if line + 1 >= len(self.starts):
            return len(self.text)
        nxt = self.starts[line + 1]
        return nxt - 2 if self.text.startswith("\r\n", nxt - 2) else nxt - 1

    def line_text(self, line: int) -> str:
        return self.text[self.starts[line]:self.line_end(line)]

    # -- positions

    def offset_at(self, position: Position, strict: bool = False) -> int:
        """Offset of an LSP position.

        A character past the line's end means the end of the line (as the LSP spec asks). A
        line past the last means the end of the document for edits (lenient), and raises
        `invalid_position` for requests at a cursor (strict).
        """
        line, char = position
        if line < 0 or char < 0:
            raise DlmError("invalid_position", f"position {line}:{char} is negative")
        if line >= len(self.starts):
            if strict:
                raise DlmError("invalid_position",
                               f"line {line} is past the end of the document ({len(self.starts)} lines)")
            return len(self.text)
        start, end = self.starts[line], self.line_end(line)
        return start + col_to_index(self.text[start:min(end, start + char)], char, self.encoding)

    def position_at(self, offset: int) -> Position:
        offset = max(0, min(offset, len(self.text)))
        line = bisect_right(self.starts, offset) - 1
        start = self.starts[line]
        return line, index_to_col(self.text[start:offset], offset - start, self.encoding)

    # -- edits

    def apply(self, rng: Range | None, new_text: str) -> None:
        """Apply one content change: a whole new text (rng None) or a replacement of a range."""
        if rng is None:
            self.text = new_text
            self.starts = [0] + _scan_starts(new_text, 1, len(new_text))
            self._tell_syntax("set_text", new_text)
            return
        a, b = self.offset_at(rng[0]), self.offset_at(rng[1])
        if b < a:
            raise DlmError("invalid_params", f"edit range ends before it starts: {rng}")
        old_starts = self.starts
        self.text = self.text[:a] + new_text + self.text[b:]
        n, delta = len(new_text), len(new_text) - (b - a)
        # A line start p depends only on the characters at p-1 and p: those before the edit
        # (p < a) and after it (p > b) keep their meaning; only [a, a+n] is scanned again.
        i = bisect_left(old_starts, a)
        j = bisect_left(old_starts, b + 1)
        head = old_starts[:i] if i > 0 else [0]
        mid = _scan_starts(self.text, max(a, 1), a + n)
        self.starts = head + mid + [p + delta for p in old_starts[j:]] if delta else head + mid + old_starts[j:]
        self._tell_syntax("apply_edit", a, b, new_text, self.text)

    def _tell_syntax(self, method: str, *args: Any) -> None:
        if self.syntax is None:
            return
        try:
            getattr(self.syntax, method)(*args)
        except Exception:  # noqa: BLE001 - completion falls back to line rules without a tree
            self.syntax = None


def word_start(text: str, offset: int) -> int:
    """Start of the identifier that ends at `offset` (for completion items that clients filter)."""
    i = offset
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):
        i -= 1
    return i




# --------------------------------------------------------------------------- the store


class DocumentStore:
    """The open documents of one client, by URI."""

    def __init__(self, encoding: str = UTF16, max_chars: int = LIMITS.max_document_chars):
        self.encoding = encoding
        self.max_chars = max_chars
        self.docs: dict[str, Document] = {}
        # Open in the client, too large to keep here: uri -> (why, language id)
        self.refused: dict[str, tuple[str, str]] = {}
        self._warned: set[str] = set()  # documents whose lone surrogates were logged already

    def _refuse(self, uri: str, chars: int, language_id: str, what: str) -> None:
        self.docs.pop(uri, None)
        why = (f"document {uri} is {chars} characters, above the limit max_document_chars={self.max_chars}; "
               "dlm-ls does not complete in it")
        self.refused[uri] = (why, language_id)
        log.warning("%s: %s", what, why)

    def _safe(self, uri: str, text: str) -> str:
        text, replaced = safe_text(text)
        if replaced and uri not in self._warned:
            self._warned.add(uri)
            log.warning("%s: %d lone UTF-16 surrogate(s) replaced by U+FFFD (positions unchanged)", uri, replaced)
        return text

    def open(self, uri: str, text: str, language_id: str = "", version: int = 0) -> Document | None:
        """The document now held, or None when it is above the size limit (refused, and logged)."""
        self._warned.discard(uri)
        self.refused.pop(uri, None)
        if len(text) > self.max_chars:
            self._refuse(uri, len(text), language_id, "didOpen refused")
            return None
        doc = Document(uri, self._safe(uri, text), language_id, version, self.encoding)
        self.docs[uri] = doc
        return doc

    def change(self, uri: str, version: int | None, changes: list[tuple[Range | None, str]]) -> Document | None:
        """The document after `changes`, or None when it is not held for its size (let go now or before)."""
        if uri in self.refused:
            # Only a whole new text that fits can bring it back: the edits since were not kept.
            whole = [text for rng, text in changes if rng is None]
            if not whole or len(whole[-1]) > self.max_chars:
                return None
            self.open(uri, whole[-1], self.refused[uri][1], version or 0)
            changes = changes[max(i for i, (rng, _) in enumerate(changes) if rng is None) + 1:]
        doc = self.get(uri)
        for rng, text in changes:
            doc.apply(rng, self._safe(uri, text))
            if len(doc.text) > self.max_chars:
                self._refuse(uri, len(doc.text), doc.language_id, "didChange: let go of a document that grew")
                return None
        if version is not None:
            doc.version = version
        return doc

    def close(self, uri: str) -> None:
        self.docs.pop(uri, None)
        self.refused.pop(uri, None)
        self._warned.discard(uri)

    def get(self, uri: str) -> Document:
        doc = self.docs.get(uri)
        if doc is None:
            if uri in self.refused:
                raise DlmError("too_large", self.refused[uri][0])
            raise DlmError("unknown_document", f"document {uri} is not open (send didOpen first)")
        return doc

    def __len__(self) -> int:
        return len(self.docs)
