"""Turn a model's raw middle into the text the editor shows, or None when nothing is worth showing.

A masked-diffusion canvas has a fixed length, so the model fills it to the end: past the enclosing
string, bracket or block, into a repeat of the code that follows the cursor. The rules below cut that
back, in this order: the enclosing string's closing delimiter; a bracket the suffix already closes;
the end of the line (line regions) or a dedent below the completion's indentation / the end of a
definition it starts (block regions); punctuation or lines the suffix already has; stray whitespace.
Then ``choose_best`` picks, among candidates of different canvas lengths, the one that leaves the
fewest parse errors (never more than the file has without it), the better-scored one on ties.

What it does not know: tokens, scores (candidates arrive best first), the document store. Which
brackets the suffix closes comes from the tree (the cursor's ancestors that end in a real closing
token) or, without one, from the closers that follow the cursor on its line or the next line.
"""

from __future__ import annotations

import re

from .regions import (BRACKET_CLOSERS, DEFAULT_LINE_COMMENTS, DEFAULT_QUOTES, LINE_COMMENTS, QUOTES,
                      Region, cursor_context, indent_width, line_bounds, opens_block)
from .syntax import SyntaxTree, is_supported

OPENERS = {"(": ")", "[": "]", "{": "}"}
# Punctuation the suffix may already hold, trimmed from the end of a middle that repeats it.
SEPARATORS = frozenset(":;,")
# Lines too common to call a repeat on their own; they count only as part of a two-line repeat.
TRIVIAL_LINES = frozenset({"}", ")", "]", "};", "});", "end", "pass", "else:", "else {", "} else {",
                           "break", "break;", "continue", "continue;", "return", "return;", "try:",
                           "finally:", "do", "then", "else"})
# How far to look for the closers and next lines that follow the cursor.
SUFFIX_SCAN_CHARS = 2000
NEXT_LINES = 3
# A definition is one unit: a block completion that starts one ends after it.
DEFINITION_HEADER = re.compile(
    r"^\s*(?:(?:export|pub|pub\(crate\)|async|static|public|private|protected|local|default)\s+)*"
    r"(?:def|class|function|fn|func|impl|struct|enum|trait|interface)\b")


def clean_completion(text: str, offset: int, middle: str, language_id: str, region: Region,
                     tree: SyntaxTree | None = None) -> str | None:
    """The cleaned middle to insert at ``offset``, or None when nothing useful is left."""
    if region.kind == "none" or not middle or not middle.strip():
        return None
    tree = tree if tree is not None and tree.tree is not None and tree.text == text else None
    start, end = line_bounds(text, offset)
    left, right = text[start:offset], text[offset:end]
    m = middle.replace("\r\n", "\n")

    context = cursor_context(text, offset, language_id, tree)
    if context.kind == "string" and context.closing:
        m = _cut_at_string_end(m, context.closing)
    elif context.kind == "code":
        closers = _suffix_closers(text, offset, tree)
        cut = _first_unmatched_closer(m, language_id, closers[0]) if closers else None
        if cut is not None:
            m = m[:cut]

    if region.kind == "line":
        m = m.split("\n", 1)[0]
    else:
        m = _cut_block(m, left, language_id, text)

    m = _trim_repeated_separators(m, right)
    m = _trim_whitespace(m, left)
    if m is None:
        return None
    m = _drop_repeated_lines(m, left, right, text, end, region)
    if m is None or not m.strip():
        return None
    if _uses_crlf(text, offset):
        m = m.replace("\n", "\r\n")
    return m


def choose_best(text: str, offset: int, candidates: list[str], language_id: str, region: Region,
                tree: SyntaxTree | None = None) -> str | None:
    """The cleaned candidate that leaves the fewest parse errors, ties to the better-scored one;
    a candidate that adds errors to the file is never shown.

    Candidates come best model score first. The baseline often has an error at the cursor itself
    (`x = █` does not parse), so "no worse" alone would pass a truncated `(1 +`; fewest errors
    prefers the candidate that completes the statement. Without a grammar the first cleaned
    candidate wins. The error count is coarse: two small errors count worse than one big one.
    """
    cleaned: list[str] = []
    for candidate in candidates:
        c = clean_completion(text, offset, candidate, language_id, region, tree)
        if c is not None and c not in cleaned:
            cleaned.append(c)
    if not cleaned:
        return None
    if tree is None or tree.tree is None or tree.text != text:
        if not is_supported(language_id):
            return cleaned[0]
        tree = SyntaxTree(language_id, text)
    best, best_errors = None, tree.error_count()
    for c in cleaned:
        errors = tree.error_count_with_insert(offset, c)
        if errors < best_errors or (best is None and errors == best_errors):
            best, best_errors = c, errors
            if errors == 0:
                break
    return best


# -- the enclosing string or bracket ------------------------------------------------------------

def _cut_at_string_end(m: str, closing: str) -> str:
    i = 0
    while i < len(m):
        if m[i] == "\\":
            i += 2
            continue
        if m.startswith(closing, i):
            return m[:i]
        if m[i] == "\n" and len(closing) == 1 and closing in "\"'":
            return m[:i]  # a one-line string cannot go on past the line
        i += 1
    return m


def _suffix_closers(text: str, offset: int, tree: SyntaxTree | None) -> list[str]:
    """Brackets around the cursor that the text after it closes, innermost first."""
    if tree is not None:
        b = tree.byte_offset(offset)
        closers = []
        node = tree.tree.root_node.descendant_for_byte_range(b, b)
        while node is not None:
            last = node.child(node.child_count - 1) if node.child_count else None
            if node.start_byte < b and last is not None and last.start_byte >= b and \
                    last.type in (")", "]", "}") and not last.is_missing and not node.has_error:
                closers.append(last.type)
            node = node.parent
        if closers or not tree.has_error:
            return closers
    # Without a usable tree: the closers right after the cursor, or opening the next line.
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    closers = _leading_closers(text[offset:line_end])
    if closers or text[offset:line_end].strip(" \t\r" + "".join(SEPARATORS)):
        return closers
    nxt = _next_lines(text, line_end)
    return _leading_closers(nxt[0]) if nxt else []


def _leading_closers(s: str) -> list[str]:
    closers = []
    for ch in s:
        if ch in BRACKET_CLOSERS:
            closers.append(ch)
        elif not (ch.isspace() or ch in SEPARATORS):
            break
    return closers


def _first_unmatched_closer(m: str, language_id: str, closer: str) -> int | None:
    """Index of the first ``closer`` in ``m`` whose opener is before the cursor: where the middle
    reaches the bracket that the suffix closes. An unmatched closer of another kind closes a
    bracket the suffix leaves open (`foo(█` inside `{ }`), so it stays.

    Skips strings and line comments inside the middle, so `")"` or `# )` do not count.
    """
    quotes = QUOTES.get(language_id, DEFAULT_QUOTES)
    comments = LINE_COMMENTS.get(language_id, DEFAULT_LINE_COMMENTS)
    stack: list[str] = []
    i, n = 0, len(m)
    while i < n:
        ch = m[i]
        if m.startswith(comments, i):
            nl = m.find("\n", i)
            if nl < 0:
                break
            i = nl
            continue
        if ch in quotes:
            delim = ch * 3 if language_id == "python" and m.startswith(ch * 3, i) else ch
            j = i + len(delim)
            while j < n and not m.startswith(delim, j):
                if m[j] == "\n" and len(delim) == 1 and ch != "`":
                    break
                j += 2 if m[j] == "\\" else 1
            i = j + len(delim)
            continue
        if ch in OPENERS:
            stack.append(OPENERS[ch])
        elif ch in BRACKET_CLOSERS:
            if stack:
                stack.pop()  # a mismatched pair is the model's error; keep counting depth
            elif ch == closer:
                return i
        i += 1
    return None


# -- blocks ---------------------------------------------------------------------------------------

def _cut_block(m: str, left: str, language_id: str, text: str) -> str:
    """Cut at the first line indented less than the completion's body, or after a definition.

    The dedented line is kept when it closes a bracket that the document leaves open (`{` typed
    with no `}` anywhere): then the completion is what closes it."""
    lines = m.split("\n")
    first = left + lines[0]
    opener_line = bool(left.strip()) and opens_block(left, language_id)
    # The body's indentation is set by the first non-blank line the completion writes.
    ref = None
    header = None
    for i, line in enumerate(lines):
        full = first if i == 0 else line
        if full.strip():
            if opener_line and i == 0:
                continue  # the opener's own line; the body starts below it
            ref = indent_width(full)
            header = (i, full) if DEFINITION_HEADER.match(full) and opens_block(full, language_id) else None
            break
    if ref is None:
        return m
    if opener_line:
        ref = max(ref, indent_width(left) + 1)
    start = header[0] if header else 0
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        width = indent_width(line)
        if width < ref:
            return "\n".join(lines[:i + 1] if _closes_open_bracket(line, text) else lines[:i])
        if header and width == ref:
            # A definition ends at the next line back at its own indentation; its closer stays.
            keep = i + 1 if _is_closer_line(line) else i
            return "\n".join(lines[:keep])
    return m


def _closes_open_bracket(line: str, text: str) -> bool:
    # A count, blind to brackets in strings and comments: it only has to tell "the file has an
    # unclosed brace" from "the suffix closes it", and an error either way keeps the old rule.
    code = line.strip()
    if not code or code[0] not in BRACKET_CLOSERS or code.lstrip(BRACKET_CLOSERS + ";,") != "":
        return False
    closer = code[0]
    opener = {v: k for k, v in OPENERS.items()}[closer]
    return text.count(opener) > text.count(closer)


def _is_closer_line(line: str) -> bool:
    code = line.strip()
    return code[:1] in BRACKET_CLOSERS or code == "end" or code.startswith("end ")


# -- repeats of the suffix ------------------------------------------------------------------------

def _trim_repeated_separators(m: str, right: str) -> str:
    """`x = █;` with middle `1;` -> `1`: the suffix's `;`/`:`/`,` is already there."""
    rest = right.strip()
    k = 0
    while k < len(rest) and rest[k] in SEPARATORS:
        k += 1
    body = m.rstrip()
    for size in range(k, 0, -1):
        if body.endswith(rest[:size]):
            return body[:-size]
    return m


def _drop_repeated_lines(m: str, left: str, right: str, text: str, line_end: int,
                         region: Region) -> str | None:
    """Cut the middle where it starts to repeat the lines after the cursor; None if it is all repeat."""
    nxt = _next_lines(text, line_end)
    rest = right.strip()
    lines = m.split("\n")
    # The completed cursor line, as the editor will show it.
    shown = [(left + lines[0]).strip()] + [line.strip() for line in lines[1:]]
    if rest and region.kind == "line" and lines[0].strip() == rest:
        return None
    if not nxt:
        return m
    for i, line in enumerate(shown):
        if i == 0 and left.strip():
            continue  # a completed partial line is new text even if it reads like the next one
        if line != nxt[0] or not line:
            continue
        if line in TRIVIAL_LINES and (i + 1 >= len(shown) or len(nxt) < 2 or shown[i + 1] != nxt[1]):
            continue
        return "\n".join(lines[:i]).rstrip() or None
    # The canvas ended partway through a repeat of the next line.
    last = shown[-1]
    if len(shown) > 1 and len(last) >= 3 and len(last) < len(nxt[0]) and nxt[0].startswith(last):
        return "\n".join(lines[:-1]).rstrip() or None
    return m


def _next_lines(text: str, line_end: int) -> list[str]:
    window = text[line_end:line_end + SUFFIX_SCAN_CHARS].split("\n")[1:]
    return [line.strip() for line in window if line.strip()][:NEXT_LINES]


# -- whitespace and line endings ------------------------------------------------------------------

def _trim_whitespace(m: str, left: str) -> str | None:
    m = "\n".join(line.rstrip() for line in m.split("\n")).rstrip()
    if not left.strip():
        # On an indented empty line, leading blank lines and the indentation already typed are noise.
        m = m.lstrip("\n")
        if left and m.startswith(left):
            m = m[len(left):]
    elif left[-1] in " \t":
        m = m.lstrip(" \t")  # `x = █` with middle ` 1`: one space, not two
    return m if m.strip() else None


def _uses_crlf(text: str, offset: int) -> bool:
    nl = text.find("\n", offset)
    if nl < 0:
        nl = text.rfind("\n", 0, offset)
    return nl > 0 and text[nl - 1] == "\r"
