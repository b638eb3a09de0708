"""Pick short chunks of other open documents to show the model before the prefix.

Retrieval is the "Jaccard similarity" scheme of llm-ls and Copilot-style completers: the identifiers
in a window of lines around the cursor are compared with those of fixed-size line windows of every
other open document, and the windows with the largest overlap win. Two bonuses sharpen it: a window
that defines a name used on the cursor line (the completion will likely call it), and a window of a
document the current file imports (Python ``import``/``from``, JS/TS ``import``/``require``, Lua
``require``), more so where it defines an imported name. Chunks are taken best first, without
overlaps, until the character budget (measured on the formatted preamble) is spent.

The chunk format itself is the prompt module's (model/prompt.py), which training shares.

What it does not know: the workspace beyond the open documents, types, scopes, or tokens (the budget
is characters; the worker converts). Rust ``use`` and Go ``import`` are not resolved: those
languages rank by overlap and definitions only.
"""

from __future__ import annotations

import posixpath
import re
from collections import OrderedDict

from ..model import prompt
from ..model.prompt import Chunk, uri_path
from .regions import DEFAULT_LINE_COMMENTS, LINE_COMMENTS

# The query: lines around the cursor whose identifiers are matched against the other documents.
QUERY_LINES_BEFORE = 30
QUERY_LINES_AFTER = 5
# Candidate chunks: windows of this many lines every STRIDE lines, plus one at each definition of
# a name the cursor line uses or the file imports.
WINDOW_LINES = 20
WINDOW_STRIDE = 10
MAX_CHUNK_CHARS = 2000  # minified files have huge lines; a chunk is a glance, not a file
MAX_LINES_PER_DOCUMENT = 5000  # bounds the cost per request on huge open files
MIN_TRIMMED_LINES = 3  # a chunk cut to fit the budget keeps at least this many lines
MAX_CANDIDATES = 256  # best-scored windows tried against the budget; the rest cannot matter
# Score = Jaccard overlap (0..1) + bonuses.
DEFINES_CURSOR_NAME_BONUS = 1.0
DEFINES_IMPORTED_NAME_BONUS = 0.5
IMPORTED_DOCUMENT_BONUS = 0.2
CACHE_DOCUMENTS = 64  # per-document line identifiers, keyed by the text itself

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFINITION = re.compile(
    r"^\s*(?:(?:export|pub|async|static|public|private|protected|default|local|const|let|var)\s+)*"
    r"(?:def|class|function|fn|func(?:\s*\([^)]*\))?|struct|enum|trait|interface|type|impl|"
    r"const|let|var|local)\s+(?:[A-Za-z_][\w]*[.:])?([A-Za-z_]\w*)"
    r"|^([A-Za-z_]\w*)\s*(?::[^=]*)?=[^=]")  # module-level assignments only: not every local
ASSIGNMENT = re.compile(r"^\s*(?:(?:let|const|var|local|mut)\s+)*([A-Za-z_]\w*)\s*(?::[^=]*)?:?=[^=]")
# Words that every file shares say nothing about relevance.
STOP_WORDS = frozenset("""
and as assert async await break case catch class const continue def default del do elif else end enum
except export extends false finally fn for from func function if impl import in interface is let
local match mod new nil none not null or pass pub raise return self static struct super switch then
this throw true try type typeof undefined use var void while with yield int str bool float string
None True False
""".split())

PY_IMPORT = re.compile(r"^\s*import\s+([\w., ]+)", re.M)
PY_FROM = re.compile(r"^\s*from\s+(\.*[\w.]*)\s+import\s+(\([^)]*\)|[^\n#]+)", re.M)
JS_IMPORT = re.compile(r"""(?:import\s+(?:([\w$]+)\s*,?\s*)?(?:\{([^}]*)\}|\*\s+as\s+[\w$]+)?\s*from\s*|"""
                       r"""require\s*\(\s*|import\s*\(\s*|import\s+)['"]([^'"]+)['"]""")
LUA_REQUIRE = re.compile(r"""require\s*\(?\s*['"]([\w./-]+)['"]""")
JS_EXTENSIONS = (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", "/index.ts", "/index.tsx", "/index.js")


# -- identifiers ----------------------------------------------------------------------------------

def identifiers(text: str) -> set[str]:
    return {w for w in IDENTIFIER.findall(text) if len(w) > 1 and w not in STOP_WORDS}


def defined_names(line: str) -> set[str]:
    m = DEFINITION.match(line)
    if not m:
        return set()
    return {name for name in m.groups() if name}


_line_cache: OrderedDict = OrderedDict()


def _analyse(uri: str, text: str) -> tuple[list[str], list[set[str]], list[set[str]]]:
    """Lines, identifiers per line and names defined per line; cached per (uri, text)."""
    key = (uri, len(text), hash(text))  # CPython caches a str's hash, so repeat lookups are O(1)
    hit = _line_cache.get(key)
    if hit is not None and hit[0] == text:
        _line_cache.move_to_end(key)
        return hit[1]
    lines = text.split("\n")[:MAX_LINES_PER_DOCUMENT]
    lines = [line.rstrip("\r") for line in lines]
    result = (lines, [identifiers(line) for line in lines], [defined_names(line) for line in lines])
    _line_cache[key] = (text, result)
    if len(_line_cache) > CACHE_DOCUMENTS:
        _line_cache.popitem(last=False)
    return result


# -- imports --------------------------------------------------------------------------------------

def imported_documents(current_text: str, language_id: str, others: dict[str, str],
                       current_uri: str | None = None) -> dict[str, set[str]]:
    """uri -> names imported from it, for the other open documents the current file imports."""
    here = posixpath.dirname(uri_path(current_uri)) if current_uri else None
    wanted: list[tuple[list[str], set[str]]] = []  # (path suffixes that match, names)
    if language_id == "python":
        for m in PY_IMPORT.finditer(current_text):
            for part in m.group(1).split(","):
                module = part.strip().split(" as ")[0].strip()
                if module:
                    wanted.append((_py_paths(module, here), set()))
        for m in PY_FROM.finditer(current_text):
            module, names = m.group(1), m.group(2).strip("() \n")
            names = {n.strip().split(" as ")[0].strip() for n in names.replace("\n", ",").split(",")}
            names.discard("")
            paths = _py_paths(module, here)
            for name in names:  # `from pkg import mod` imports a module too
                paths = paths + _py_paths(module.rstrip(".") + "." + name if module.strip(".")
                                          else module + name, here)
            wanted.append((paths, names))
    elif language_id in ("javascript", "javascriptreact", "typescript", "typescriptreact", "tsx", "jsx"):
        for m in JS_IMPORT.finditer(current_text):
            default, named, spec = m.group(1), m.group(2) or "", m.group(3)
            names = {n.strip().split(" as ")[0].strip() for n in named.split(",")} | {default or ""}
            names.discard("")
            if spec.startswith("."):
                base = posixpath.normpath(posixpath.join(here, spec)) if here else spec.lstrip("./")
                wanted.append(([base + ext for ext in JS_EXTENSIONS] + [base], names))
    elif language_id == "lua":
        for m in LUA_REQUIRE.finditer(current_text):
            base = m.group(1).replace(".", "/")
            wanted.append(([base + ".lua", base + "/init.lua"], set()))
    found: dict[str, set[str]] = {}
    for uri in others:
        path = uri_path(uri)
        for suffixes, names in wanted:
            if any(_path_matches(path, s) for s in suffixes):
                found.setdefault(uri, set()).update(names)
    return found


def _py_paths(module: str, here: str | None) -> list[str]:
    dots = len(module) - len(module.lstrip("."))
    rel = module[dots:].replace(".", "/")
    if dots and here:
        base = here
        for _ in range(dots - 1):
            base = posixpath.dirname(base)
        rel = posixpath.join(base, rel) if rel else base
    if not rel:
        return []
    return [rel + ".py", rel + ".pyi", rel + "/__init__.py"]


def _path_matches(path: str, suffix: str) -> bool:
    if suffix.startswith("/"):
        return path == suffix
    return path == suffix or path.endswith("/" + suffix)


# -- selection ------------------------------------------------------------------------------------

def select_chunks(current_text: str, offset: int, language_id: str, others: dict[str, str],
                  budget_chars: int, current_uri: str | None = None,
                  root: str | None = None, min_score: float = 0.0) -> list[Chunk]:
    """Chunks of ``others`` (uri -> text), most relevant first, whose formatted preamble
    (``format_chunks`` with the same ``root``) fits in ``budget_chars``. ``current_uri`` resolves
    relative imports and is skipped if it is among ``others``. Chunks scoring under ``min_score``
    are left out (a score of 1 or more means the chunk defines a name the cursor line uses)."""
    if budget_chars <= 0 or not others:
        return []
    query = identifiers(_lines_around(current_text, offset, QUERY_LINES_BEFORE, QUERY_LINES_AFTER))
    # Names the cursor line uses (not the one it assigns): their definitions are what it needs.
    left = current_text[current_text.rfind("\n", 0, offset) + 1:offset]
    assigned = ASSIGNMENT.match(left)
    cursor_names = identifiers(left) - defined_names(left) - {assigned.group(1) if assigned else ""}
    imports = imported_documents(current_text, language_id, others, current_uri)

    scored: list[Chunk] = []
    for uri, text in others.items():
        if uri == current_uri or not text.strip():
            continue
        scored.extend(_score_windows(uri, text, query, cursor_names, imports.get(uri)))
    scored = [c for c in scored if c.score >= min_score]  # below it a chunk is more noise than help
    scored.sort(key=lambda c: (-c.score, c.uri, c.start_line))

    chosen: list[Chunk] = []
    taken: dict[str, list[tuple[int, int]]] = {}
    remaining = budget_chars
    for chunk in scored[:MAX_CANDIDATES]:
        span = (chunk.start_line, chunk.start_line + chunk.text.count("\n") + 1)
        if any(span[0] < b and a < span[1] for a, b in taken.get(chunk.uri, ())):
            continue
        fitted = _fit(chunk, language_id, remaining, root)
        if fitted is None:
            continue
        chosen.append(fitted)
        taken.setdefault(chunk.uri, []).append(span)
        remaining -= len(format_chunk(fitted, language_id, root))
    return chosen


def _lines_around(text: str, offset: int, before: int, after: int) -> str:
    """The cursor's line with ``before`` lines above and ``after`` below, without splitting the
    whole document."""
    start = text.rfind("\n", 0, offset)
    for _ in range(before):
        if start < 0:
            break
        start = text.rfind("\n", 0, start)
    end = text.find("\n", offset)
    for _ in range(after):
        if end < 0:
            break
        end = text.find("\n", end + 1)
    end = len(text) if end < 0 else end
    return text[start + 1:end]


def _score_windows(uri: str, text: str, query: set[str], cursor_names: set[str],
                   imported_names: set[str] | None) -> list[Chunk]:
    lines, idents, defs = _analyse(uri, text)
    starts = set(range(0, max(1, len(lines) - WINDOW_LINES // 2), WINDOW_STRIDE))
    # Windows starting at a definition, only for names the cursor or an import wants (cost).
    wanted = cursor_names | (imported_names or set())
    starts.update(i for i, d in enumerate(defs) if d and not d.isdisjoint(wanted))
    chunks = []
    for start in sorted(starts):
        end = min(len(lines), start + WINDOW_LINES)
        while start < end and not lines[start].strip():
            start += 1
        while end > start and not lines[end - 1].strip():
            end -= 1
        if start >= end:
            continue
        window = set().union(*idents[start:end])
        if not window:
            continue
        score = len(window & query) / len(window | query) if query else 0.0
        score += DEFINES_CURSOR_NAME_BONUS * _definition_weight(defs, start, end, cursor_names)
        if imported_names is not None:
            score += IMPORTED_DOCUMENT_BONUS
            score += DEFINES_IMPORTED_NAME_BONUS * _definition_weight(defs, start, end, imported_names)
        if score <= 0:
            continue
        body = "\n".join(lines[start:end])[:MAX_CHUNK_CHARS]
        chunks.append(Chunk(uri, body, round(score, 6), start))
    return chunks


def _definition_weight(defs: list[set[str]], start: int, end: int, names: set[str]) -> float:
    """1 for a window that starts with a definition of one of ``names``, less the later it comes,
    so the window that shows the definition from its first line outranks one that cuts it off."""
    for i in range(start, end):
        if defs[i] & names:
            return 1.0 - (i - start) / WINDOW_LINES
    return 0.0


def _fit(chunk: Chunk, language_id: str, budget: int, root: str | None) -> Chunk | None:
    """The chunk, or its first lines, if that fits in ``budget`` characters once formatted."""
    formatted = format_chunk(chunk, language_id, root)
    if len(formatted) <= budget:
        return chunk
    # format_chunk writes a header line, then one line per chunk line: keep the lines that fit.
    lines = formatted.split("\n")[:-1]
    cost = len(lines[0]) + 1
    keep = 0
    for line in lines[1:]:
        cost += len(line) + 1
        if cost > budget:
            break
        keep += 1
    if keep < MIN_TRIMMED_LINES:
        return None
    text = "\n".join(chunk.text.split("\n")[:keep])
    return Chunk(chunk.uri, text, chunk.score, chunk.start_line)


# -- formatting -----------------------------------------------------------------------------------

def comment_prefix(language_id: str) -> str:
    return LINE_COMMENTS.get(language_id, DEFAULT_LINE_COMMENTS)[0]


def format_chunk(chunk: Chunk, language_id: str, root: str | None = None) -> str:
    """One chunk in the prompt's chunk format, commented in the document's language."""
    return prompt.format_chunk(chunk, comment_prefix(language_id), root)


def format_chunks(chunks: list[Chunk], language_id: str, root: str | None = None) -> str:
    """The preamble to prepend to the prefix (empty when there are no chunks)."""
    return "".join(format_chunk(chunk, language_id, root) for chunk in chunks)
