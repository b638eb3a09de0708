"""Find the holes of a multi-hole fill: the spans of a document that the model should write.

A hole is an explicit marker (``<|hole|>`` by default, configurable), or, in Python, a lone ``...``
statement: the conventional "fill me in" body (``def f(x): ...``). The latter comes from the parse
tree, so an ellipsis in a subscript, an argument or a type hint (``tuple[int, ...]``) is not a hole.
A selection in the editor is one hole (``holes_from_range``).

Holes are ``(start, end)`` Python ``str`` offsets of the text to replace, sorted and disjoint;
``segments_around`` gives the fixed text s_0..s_k between them, as the fill request sends it.

What it does not know: the model's hole-token format, canvas sizes per hole, or LSP positions.
"""

from __future__ import annotations

from .syntax import get_language, str_offsets

DEFAULT_MARKER = "<|hole|>"


def find_holes(text: str, language_id: str, marker: str = DEFAULT_MARKER,
               python_ellipsis: bool = True, tree=None) -> list[tuple[int, int]]:
    """Sorted, disjoint (start, end) str offsets of every hole marker in ``text``. ``tree``, a
    tree-sitter tree of exactly ``text`` when the caller has one, saves a parse."""
    holes = []
    if marker:
        i = text.find(marker)
        while i >= 0:
            holes.append((i, i + len(marker)))
            i = text.find(marker, i + len(marker))
    if python_ellipsis and language_id == "python":
        holes.extend(_ellipsis_statements(text, tree))
    return _disjoint(sorted(holes))


def _ellipsis_statements(text: str, tree=None) -> list[tuple[int, int]]:
    if tree is None:
        language = get_language("python")
        if language is None:
            return []
        from tree_sitter import Parser

        tree = Parser(language).parse(text.encode("utf-8", "surrogatepass"))
    spans = []
    # Only nodes that can hold statements are walked; expressions are skipped whole, which keeps
    # this fast on large files and excludes `x[...]` / `f(...)` / `tuple[int, ...]` by construction.
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "expression_statement":
            children = node.children
            if len(children) == 1 and children[0].type == "ellipsis":
                spans.append((children[0].start_byte, children[0].end_byte))
            continue
        stack.extend(c for c in node.children if _holds_statements(c.type))
    flat = [b for span in spans for b in span]
    offsets = str_offsets(text, flat)
    return [(offsets[i], offsets[i + 1]) for i in range(0, len(offsets), 2)]


def _holds_statements(node_type: str) -> bool:
    return node_type in ("block", "module", "expression_statement") or \
        node_type.endswith(("_statement", "_clause", "_definition"))


def _disjoint(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in holes:
        if out and start < out[-1][1]:
            continue  # an ellipsis inside a marker (`<|...|>`-style markers) is the marker's
        out.append((start, end))
    return out


def segments_around(text: str, holes: list[tuple[int, int]]) -> list[str]:
    """The k+1 fixed segments s_0..s_k around k holes: text = s_0 h_1 s_1 ... h_k s_k."""
    segments, pos = [], 0
    for start, end in holes:
        if not pos <= start <= end <= len(text):
            raise ValueError(f"holes must be sorted, disjoint and inside the text: {(start, end)}")
        segments.append(text[pos:start])
        pos = end
    segments.append(text[pos:])
    return segments


def holes_from_range(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """A selection as one hole: ordered, clamped to the text. A selection of whole lines keeps its
    final line break outside the hole, so the filled lines stay lines."""
    start, end = sorted((max(0, min(start, len(text))), max(0, min(end, len(text)))))
    at_line_start = start == 0 or text[start - 1] == "\n"
    if end > start and at_line_start and text[end - 1] == "\n":
        end -= 2 if end - 1 > start and text[end - 2] == "\r" else 1
    return [(start, end)]
