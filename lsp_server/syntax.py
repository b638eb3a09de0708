"""One tree-sitter parse tree per document, kept current by incremental edits.

The document store hands us edits as Python ``str`` offsets (code points) into the text before the
edit, plus the whole text after it. tree-sitter wants UTF-8 byte offsets and (row, byte-column)
points, so this module owns that conversion: an :class:`OffsetIndex` of checkpoints every few
thousand characters makes one conversion cost O(checkpoint gap + line length), not O(document),
and is patched (not rebuilt) on each edit. The UTF-8 bytes live in a ``bytearray`` spliced in place;
the parser reads it through a callback, so an incremental reparse only reads what changed.

What it does not know: UTF-16 / LSP positions (the document store converts those to ``str`` offsets),
what a completion region is (``regions.py``), or any server state. Grammars come from the
per-language wheels (``tree-sitter-python`` ...), loaded lazily; a language without a wheel is
"unsupported" and callers fall back to line rules.
"""

from __future__ import annotations

import bisect
import copy
import importlib
from functools import lru_cache

from tree_sitter import Language, Node, Parser, Tree

# Characters between offset checkpoints: a conversion encodes at most this many characters
# (plus the current line). 4096 keeps a 5 MB document's index at ~1200 entries.
CHECKPOINT_CHARS = 4096
# After edits, a gap between checkpoints larger than this triggers a rebuild of the index.
MAX_GAP_CHARS = 4 * CHECKPOINT_CHARS
# Bytes handed to the parser per read callback.
READ_CHUNK_BYTES = 16 * 1024

# LSP language id -> (wheel module, function returning the grammar pointer).
GRAMMARS: dict[str, tuple[str, str]] = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "javascriptreact": ("tree_sitter_javascript", "language"),  # the JS grammar parses JSX
    "jsx": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "typescriptreact": ("tree_sitter_typescript", "language_tsx"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "rust": ("tree_sitter_rust", "language"),
    "go": ("tree_sitter_go", "language"),
    "lua": ("tree_sitter_lua", "language"),
}


@lru_cache(maxsize=None)
def get_language(language_id: str) -> Language | None:
    """The grammar for an LSP language id, or None when no wheel provides it."""
    entry = GRAMMARS.get(language_id)
    if entry is None:
        return None
    module_name, func_name = entry
    try:
        module = importlib.import_module(module_name)
        return Language(getattr(module, func_name)())
    except (ImportError, AttributeError, ValueError):
        return None


def is_supported(language_id: str) -> bool:
    return get_language(language_id) is not None


def utf8_len(s: str) -> int:
    # isascii() is O(1) in CPython (a flag on the string object), so ASCII text costs nothing.
    if s.isascii():
        return len(s)
    return len(s.encode("utf-8", "surrogatepass"))


def byte_offset(text: str, offset: int) -> int:
    """UTF-8 byte offset of ``str`` offset ``offset`` (O(offset); use OffsetIndex for repeated calls)."""
    if text.isascii():
        return offset
    return utf8_len(text[:offset])


def str_offset(text: str, byte: int) -> int:
    """Inverse of :func:`byte_offset`; a byte inside a multi-byte character maps to that character."""
    if text.isascii():
        return byte
    return len(text.encode("utf-8", "surrogatepass")[:byte].decode("utf-8", "ignore"))


def str_offsets(text: str, bytes_: list[int]) -> list[int]:
    """Convert many byte offsets at once, encoding the text once (for hole lists, node ranges)."""
    if text.isascii():
        return list(bytes_)
    data = text.encode("utf-8", "surrogatepass")
    return [len(data[:b].decode("utf-8", "ignore")) for b in bytes_]


class OffsetIndex:
    """str offset -> (byte offset, (row, byte column)), with checkpoints every CHECKPOINT_CHARS.

    Rows count ``\\n`` only, as tree-sitter does; a ``\\r`` before it is an ordinary byte of the line.
    """

    def __init__(self, text: str):
        self.rebuild(text)

    def rebuild(self, text: str) -> None:
        self.text = text
        chars, bytes_, rows = [0], [0], [0]
        b = r = 0
        for c in range(0, len(text), CHECKPOINT_CHARS):
            chunk = text[c:c + CHECKPOINT_CHARS]
            b += utf8_len(chunk)
            r += chunk.count("\n")
            if c + len(chunk) < len(text):
                chars.append(c + len(chunk))
                bytes_.append(b)
                rows.append(r)
        self._chars, self._bytes, self._rows = chars, bytes_, rows

    def _checkpoint(self, offset: int) -> int:
        return bisect.bisect_right(self._chars, offset) - 1

    def byte(self, offset: int) -> int:
        k = self._checkpoint(offset)
        return self._bytes[k] + utf8_len(self.text[self._chars[k]:offset])

    def locate(self, offset: int) -> tuple[int, tuple[int, int]]:
        """(byte offset, (row, byte column)) of a str offset."""
        text = self.text
        k = self._checkpoint(offset)
        seg = text[self._chars[k]:offset]
        b = self._bytes[k] + utf8_len(seg)
        row = self._rows[k] + seg.count("\n")
        line_start = text.rfind("\n", 0, offset) + 1
        return b, (row, utf8_len(text[line_start:offset]))

    def update(self, start: int, old_end: int, new_text: str, text_after: str,
               start_byte: int, old_end_byte: int, old_rows: tuple[int, int]) -> None:
        """Patch the checkpoints for an edit instead of rebuilding them: O(checkpoints)."""
        dc = len(new_text) - (old_end - start)
        db = utf8_len(new_text) - (old_end_byte - start_byte)
        dr = new_text.count("\n") - (old_rows[1] - old_rows[0])
        chars, bytes_, rows = [], [], []
        for c, b, r in zip(self._chars, self._bytes, self._rows):
            if c <= start:
                chars.append(c), bytes_.append(b), rows.append(r)
            elif c >= old_end:
                chars.append(c + dc), bytes_.append(b + db), rows.append(r + dr)
        self._chars, self._bytes, self._rows = chars, bytes_, rows
        self.text = text_after
        # Typing in one place widens one gap; re-split when it costs more than a rebuild saves.
        k = self._checkpoint(start)
        nxt = self._chars[k + 1] if k + 1 < len(self._chars) else len(text_after)
        if nxt - self._chars[k] > MAX_GAP_CHARS:
            self.rebuild(text_after)


class SyntaxTree:
    """A document's parse tree. ``supported`` is False (and ``tree`` None) for unknown languages."""

    def __init__(self, language_id: str, text: str):
        self.language_id = language_id
        self.language = get_language(language_id)
        self._parser = Parser(self.language) if self.language is not None else None
        self.tree: Tree | None = None
        self.set_text(text)

    @property
    def supported(self) -> bool:
        return self._parser is not None

    # -- text and edits ---------------------------------------------------------------------------

    def set_text(self, text: str) -> None:
        """Replace the whole text (full sync, or an edit we could not apply) and parse from scratch."""
        self.text = text
        self.index = OffsetIndex(text)
        if self._parser is None:
            return
        self._buf = bytearray(text.encode("utf-8", "surrogatepass"))
        self.tree = self._parse(None)

    def apply_edit(self, start: int, old_end: int, new_text: str, text_after: str) -> None:
        """Apply one edit: ``start``/``old_end`` are str offsets into the text *before* the edit."""
        old_len = len(self.text)
        if not (0 <= start <= old_end <= old_len) or \
                len(text_after) != old_len - (old_end - start) + len(new_text):
            # The edit does not describe text_after: trust the text, not the edit.
            self.set_text(text_after)
            return
        start_byte, start_point = self.index.locate(start)
        old_end_byte, old_end_point = self.index.locate(old_end)
        new_bytes = new_text.encode("utf-8", "surrogatepass")
        new_end_byte = start_byte + len(new_bytes)
        nl = new_text.count("\n")
        if nl:
            new_end_point = (start_point[0] + nl, utf8_len(new_text[new_text.rfind("\n") + 1:]))
        else:
            new_end_point = (start_point[0], start_point[1] + len(new_bytes))
        if len(new_text) > CHECKPOINT_CHARS:
            self.index.rebuild(text_after)
        else:
            self.index.update(start, old_end, new_text, text_after, start_byte, old_end_byte,
                              (start_point[0], old_end_point[0]))
        self.text = text_after
        if self._parser is None:
            return
        self._buf[start_byte:old_end_byte] = new_bytes
        self.tree.edit(start_byte=start_byte, old_end_byte=old_end_byte, new_end_byte=new_end_byte,
                       start_point=start_point, old_end_point=old_end_point,
                       new_end_point=new_end_point)
        self.tree = self._parse(self.tree)

    def with_insert(self, offset: int, new_text: str, text_after: str) -> "SyntaxTree":
        """A copy with ``new_text`` inserted at ``offset`` (``text_after`` is the result), reparsed
        incrementally: the document as it would be if a suggestion were accepted. This tree is left alone."""
        clone = copy.copy(self)
        clone.index = copy.copy(self.index)  # its updates replace its lists, never mutate them
        if self._parser is not None:
            clone._parser = Parser(self.language)
            clone._buf = bytearray(self._buf)
            clone.tree = self.tree.copy()
        clone.apply_edit(offset, offset, new_text, text_after)
        return clone

    def _parse(self, old_tree: Tree | None) -> Tree:
        buf = self._buf

        def read(byte: int, _point) -> bytes:
            return bytes(buf[byte:byte + READ_CHUNK_BYTES])

        if old_tree is None:
            return self._parser.parse(read)
        return self._parser.parse(read, old_tree)

    # -- queries ------------------------------------------------------------------------------------

    def byte_offset(self, offset: int) -> int:
        return self.index.byte(offset)

    def str_offset(self, byte: int) -> int:
        return str_offset(self.text, byte)

    def node_at(self, offset: int, named: bool = False) -> Node | None:
        """The smallest node spanning the str offset (a zero-width range at the cursor)."""
        if self.tree is None:
            return None
        b = self.index.byte(offset)
        root = self.tree.root_node
        if named:
            return root.named_descendant_for_byte_range(b, b)
        return root.descendant_for_byte_range(b, b)

    @property
    def has_error(self) -> bool:
        return self.tree is not None and self.tree.root_node.has_error

    def error_count(self) -> int:
        return error_count(self.tree)

    def error_count_with_insert(self, offset: int, middle: str) -> int:
        """Errors of the text with ``middle`` inserted at ``offset``, reparsed incrementally from a
        copy of this tree (the document's own tree is left alone)."""
        if self._parser is None:
            return 0
        b, point = self.index.locate(offset)
        mid = middle.encode("utf-8", "surrogatepass")
        nl = middle.count("\n")
        if nl:
            end_point = (point[0] + nl, utf8_len(middle[middle.rfind("\n") + 1:]))
        else:
            end_point = (point[0], point[1] + len(mid))
        data = bytes(self._buf[:b]) + mid + bytes(self._buf[b:])
        tree = self.tree.copy()
        tree.edit(start_byte=b, old_end_byte=b, new_end_byte=b + len(mid),
                  start_point=point, old_end_point=point, new_end_point=end_point)
        return error_count(self._parser.parse(data, tree))


def error_count(tree: Tree | None) -> int:
    """ERROR and MISSING nodes in a tree; only subtrees flagged ``has_error`` are visited."""
    if tree is None:
        return 0
    count = 0
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            count += 1
        stack.extend(child for child in node.children if child.has_error)
    return count


def parse(language_id: str, text: str) -> Tree | None:
    """A one-off parse (tests, fill requests on text that is not an open document)."""
    language = get_language(language_id)
    if language is None:
        return None
    return Parser(language).parse(text.encode("utf-8", "surrogatepass"))
