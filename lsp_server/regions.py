"""Decide whether to complete at a cursor, and how much: nothing, one line, or a block.

The decision reads the line around the cursor and its neighbours (indentation, a block opener on the
line above, what is right of the cursor) and asks the parse tree one question: is the cursor inside a
string or a comment? Line rules are used for block starts because they survive the broken parses of
code being typed; the tree is used for strings and comments because they span lines. Without a tree
(unsupported language, or a tree for other text) a small line lexer answers that question instead.

What it does not know: the model, tokens (the checkpoint's sampler.json sets the canvas lengths), the
document store, or LSP positions: offsets are Python ``str`` offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .syntax import SyntaxTree

# The longest middle for each kind of region, in tokens (block decoding extends the best canvas up to it).
# The canvas lengths tried in parallel are the checkpoint's (sampler.json): the model was trained on them.
LINE_MAX_TOKENS = 32
BLOCK_MAX_TOKENS = 128

# Right of the cursor, only these may follow for a completion to make sense (closers, separators).
CLOSERS = frozenset(")]}>\"'`:;,")
BRACKET_CLOSERS = ")]}"
# A line ending with one of these continues onto the next line: complete a line, not a block.
CONTINUATION_ENDINGS = ("(", "[", ",", "\\", "+", "-", "*", "/", "=", "&&", "||", "and", "or")

PYTHON_OPENER = re.compile(
    r"^\s*(?:async\s+)?(?:def|class|if|elif|else|for|while|try|except|finally|with|match|case)\b"
    r".*:\s*(?:#.*)?$|^\s*(?:else|try|finally)\s*:\s*(?:#.*)?$")
BRACE_OPENER = re.compile(r"\{\s*(?://.*|/\*.*\*/\s*)?$")
LUA_OPENER = re.compile(r"(?:\b(?:then|do|else|repeat)|\bfunction\b[^()]*\([^()]*\)|\{)\s*(?:--.*)?$")
COLON_OR_BRACE_OPENER = re.compile(r"[:{]\s*$")

BRACE_LANGUAGES = frozenset({"javascript", "javascriptreact", "jsx", "typescript", "typescriptreact",
                             "tsx", "rust", "go", "c", "cpp", "java", "csharp", "kotlin", "swift",
                             "scala", "php", "dart"})
# Line comment markers for the fallback lexer; unknown languages get DEFAULT_LINE_COMMENTS.
LINE_COMMENTS = {"python": ("#",), "lua": ("--",), "ruby": ("#",), "shellscript": ("#",),
                 "yaml": ("#",), "toml": ("#",), "r": ("#",), "perl": ("#",), "sql": ("--",),
                 "haskell": ("--",)}
LINE_COMMENTS.update({lang: ("//",) for lang in BRACE_LANGUAGES})
DEFAULT_LINE_COMMENTS = ("#", "//")
BLOCK_COMMENT_LANGUAGES = BRACE_LANGUAGES
# Rust and Go use ' for chars/lifetimes (runes), which a quote-pairing lexer would misread.
QUOTES = {"rust": '"', "go": '"`', "javascript": "\"'`", "javascriptreact": "\"'`", "jsx": "\"'`",
          "typescript": "\"'`", "typescriptreact": "\"'`", "tsx": "\"'`"}
DEFAULT_QUOTES = "\"'"

STRING_TYPES = frozenset({"string", "template_string", "string_literal", "raw_string_literal",
                          "interpreted_string_literal", "char_literal", "rune_literal"})
COMMENT_TYPES = frozenset({"comment", "line_comment", "block_comment"})
# Code nested inside a string: the cursor there is in code, not in the string.
CODE_IN_STRING_TYPES = frozenset({"interpolation", "template_substitution"})

IDENTIFIER_CHAR = re.compile(r"\w")


@dataclass(frozen=True)
class Region:
    kind: str  # "none" | "line" | "block"
    max_tokens: int
    reason: str

    @classmethod
    def none(cls, reason: str) -> "Region":
        return cls("none", 0, reason)

    @classmethod
    def line(cls, reason: str) -> "Region":
        return cls("line", LINE_MAX_TOKENS, reason)

    @classmethod
    def block(cls, reason: str) -> "Region":
        return cls("block", BLOCK_MAX_TOKENS, reason)


@dataclass(frozen=True)
class Context:
    """What the cursor is in: code, a string (with its closing delimiter) or a comment."""
    kind: str  # "code" | "string" | "comment"
    closing: str = ""  # the string's closing delimiter
    at_content_start: bool = False  # the cursor is right after the string's opening delimiter


# -- lines ------------------------------------------------------------------------------------------

def line_bounds(text: str, offset: int) -> tuple[int, int]:
    """[start, end) of the cursor's line, end excluding the newline (and a CR before it)."""
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    if end < 0:
        end = len(text)
    if end > start and text[end - 1] == "\r" and end - 1 >= offset:
        end -= 1
    return start, end


def indent_width(line: str) -> int:
    ws = line[:len(line) - len(line.lstrip(" \t"))]
    return len(ws.expandtabs(8))


def _neighbour_line(text: str, offset: int, step: int, limit: int = 200) -> str | None:
    """The nearest non-blank line above (step=-1) or below (step=+1) the cursor's line."""
    start, end = line_bounds(text, offset)
    for _ in range(limit):
        if step < 0:
            if start == 0:
                return None
            end = start - 1
            start = text.rfind("\n", 0, end) + 1
        else:
            nl = text.find("\n", end)
            if nl < 0:
                return None
            start = nl + 1
            end = text.find("\n", start)
            if end < 0:
                end = len(text)
        line = text[start:end].rstrip("\r")
        if line.strip():
            return line
    return None


def opens_block(line: str, language_id: str) -> bool:
    code = line.rstrip()
    if language_id == "python":
        return bool(PYTHON_OPENER.search(code))
    if language_id == "lua":
        return bool(LUA_OPENER.search(code))
    if language_id in BRACE_LANGUAGES:
        return bool(BRACE_OPENER.search(code))
    return bool(COLON_OR_BRACE_OPENER.search(code))


def _continues(line: str) -> bool:
    code = line.rstrip()
    return code.endswith(CONTINUATION_ENDINGS) and not code.endswith(("//", "--", "++"))


# -- strings and comments -------------------------------------------------------------------------

def cursor_context(text: str, offset: int, language_id: str, tree: SyntaxTree | None = None) -> Context:
    """Is the cursor in code, a string or a comment? The tree first; the line lexer where the tree
    cannot tell (no tree, or a parse with errors, as with an unclosed string being typed)."""
    tree = _usable(tree, text)
    if tree is not None:
        found = _tree_context(tree, offset)
        if found is not None:
            return found
        if not tree.has_error:
            return Context("code")
    start, _ = line_bounds(text, offset)
    return _line_context(text[start:offset], language_id)


def _usable(tree: SyntaxTree | None, text: str) -> SyntaxTree | None:
    if tree is None or tree.tree is None or tree.text != text:
        return None
    return tree


def _tree_context(tree: SyntaxTree, offset: int) -> Context | None:
    b = tree.byte_offset(offset)
    root = tree.tree.root_node
    # A zero-width lookup at the end of a comment returns its parent, so also look one byte back.
    for node in (root.descendant_for_byte_range(b, b), root.descendant_for_byte_range(max(b - 1, 0), b)):
        found = _context_from(node, b)
        if found is not None:
            return found
    return None


def _context_from(node, b: int) -> Context | None:
    while node is not None:
        if node.type in CODE_IN_STRING_TYPES and node.start_byte < b < node.end_byte:
            return Context("code")
        if node.is_named and node.type in COMMENT_TYPES and node.start_byte < b:
            closed = node.text.endswith((b"*/", b"]]", b"]=]"))
            if b < node.end_byte or (b == node.end_byte and not closed):
                return Context("comment")
        if node.is_named and node.type in STRING_TYPES and node.start_byte < b < node.end_byte:
            opening, closing = _string_delimiters(node)
            if node.start_byte + opening <= b <= node.end_byte - closing:
                delim = node.text[len(node.text) - closing:].decode("utf-8", "replace")
                return Context("string", delim, b == node.start_byte + opening)
            return Context("code")  # inside a prefix or a delimiter, e.g. between f and "
        node = node.parent
    return None


RAW_STRING_OPENING = re.compile(rb'^[A-Za-z]*(#*)"')


def _string_delimiters(node) -> tuple[int, int]:
    """Byte lengths of a string node's opening and closing delimiters."""
    children = node.children
    if len(children) >= 2 and not _is_content(children[0]) and not _is_content(children[-1]):
        return (children[0].end_byte - node.start_byte, node.end_byte - children[-1].start_byte)
    m = RAW_STRING_OPENING.match(node.text)  # Rust raw strings carry no delimiter children
    if m:
        return len(m.group(0)), 1 + len(m.group(1))
    return 1, 1


def _is_content(node) -> bool:
    return node.is_named and node.type not in ("string_start", "string_end")


def _line_context(left: str, language_id: str) -> Context:
    """Scan the line left of the cursor for an unclosed string or a started comment."""
    comments = LINE_COMMENTS.get(language_id, DEFAULT_LINE_COMMENTS)
    quotes = QUOTES.get(language_id, DEFAULT_QUOTES)
    block_comments = language_id in BLOCK_COMMENT_LANGUAGES
    i, n = 0, len(left)
    while i < n:
        if left.startswith(comments, i):
            return Context("comment")
        if block_comments and left.startswith("/*", i):
            close = left.find("*/", i + 2)
            if close < 0:
                return Context("comment")
            i = close + 2
            continue
        ch = left[i]
        if ch in quotes:
            delim = ch * 3 if language_id == "python" and left.startswith(ch * 3, i) else ch
            j = i + len(delim)
            while j < n and not left.startswith(delim, j):
                j += 2 if left[j] == "\\" else 1
            if j >= n:
                return Context("string", delim, i + len(delim) == n)
            i = j + len(delim)
            continue
        i += 1
    return Context("code")


# -- the decision ---------------------------------------------------------------------------------

def decide_region(text: str, offset: int, language_id: str, tree: SyntaxTree | None = None) -> Region:
    """none / line / block for a completion at ``offset`` (a str offset into ``text``)."""
    start, end = line_bounds(text, offset)
    left, right = text[start:offset], text[offset:end]
    right_code = right.strip()

    context = cursor_context(text, offset, language_id, tree)
    if context.kind == "comment":
        return Region.none("comment")
    if context.kind == "string":
        # An empty string invites a value (a path, a key); text being typed inside one is prose
        # that the user is writing, and a guess at it is noise.
        if context.at_content_start and right_code.startswith(context.closing):
            return Region.line("empty string")
        return Region.none("inside string")
    if right[:1] and IDENTIFIER_CHAR.match(right[0]):
        return Region.none("mid-word")
    if right_code and not all(ch in CLOSERS or ch.isspace() for ch in right_code):
        return Region.none("code right of cursor")
    if right_code:
        return Region.line("before closing")

    if left.strip():
        # A space typed after the opener says an inline value or statement follows.
        if not left[-1].isspace() and opens_block(left, language_id):
            return Region.block("after block opener")
        return Region.line("partial line")

    # An empty line (or only indentation left of the cursor).
    above = _neighbour_line(text, offset, -1)
    if above is not None and _continues(above):
        return Region.line("continuation")
    if above is not None and opens_block(above, language_id):
        return Region.block("block start")
    below = _neighbour_line(text, offset, +1)
    indent = indent_width(left)
    if below is None or indent_width(below) < indent or \
            (indent_width(below) == indent and _closes_block(below, language_id)):
        return Region.block("end of block")
    return Region.line("between statements")


def _closes_block(line: str, language_id: str) -> bool:
    code = line.strip()
    if code[:1] in BRACKET_CLOSERS:
        return True
    return language_id == "lua" and re.match(r"(?:end|else|elseif|until)\b", code) is not None
